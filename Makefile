# The two commands of the README: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip
PIN     = -c constraints.txt

.PHONY: demo test test-oldest bench bench-extra clean

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

# the suite on the oldest releases pyproject.toml admits, in its own venv and cache (the mini
# suite's pixels depend on Pillow's drawing, so a cache built by newer Pillow is not shared)
OLDEST_PYTHON ?= python3.10
OLDEST        ?= .venv-oldest
$(OLDEST)/.test: pyproject.toml constraints-oldest.txt
	$(OLDEST_PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q -c constraints-oldest.txt -e '.[test]'
	touch $@

test-oldest: $(OLDEST)/.test
	SENSITUNE_CACHE=$${SENSITUNE_CACHE_OLDEST:-$(CURDIR)/.cache/sensitune-oldest} $(OLDEST)/bin/python -m pytest -q

# the project's benchmark (8 columns, lr chosen on val, 3 seeds, CIs); the other methods, one seed
bench: $(VENV)/.base
	$(VENV)/bin/sensitune demo --bench --jobs 2 --threads 1

bench-extra: $(VENV)/.base
	$(VENV)/bin/sensitune demo --bench-extra --jobs 2 --threads 1

clean:
	rm -rf $(VENV) $(OLDEST) build *.egg-info src/*.egg-info
