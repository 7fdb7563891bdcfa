# The two commands of the README: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip
PIN     = -c constraints.txt

.PHONY: demo test bench bench-extra clean

$(VENV)/.base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(PIN) torch torchvision
	$(PIP) install -q $(PIN) -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install -q $(PIN) -e '.[test]'
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/sensitune demo

test: $(VENV)/.test
	$(VENV)/bin/python -m pytest -q

# the project's benchmark (8 columns, lr chosen on val, 3 seeds, CIs); the other methods, one seed
bench: $(VENV)/.base
	$(VENV)/bin/sensitune demo --bench --jobs 2 --threads 1

bench-extra: $(VENV)/.base
	$(VENV)/bin/sensitune demo --bench-extra --jobs 2 --threads 1

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
