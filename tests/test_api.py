"""The public names stay functions and classes even after every submodule has been imported.

Importing a submodule binds it as an attribute of its package; a public name equal to a
submodule's name would then silently turn into that module (``sensitune.engine.evaluate``
once was one).
"""
import importlib
import inspect
import pkgutil

import sensitune


def test_public_names_are_callables_after_importing_every_submodule():
    for info in pkgutil.walk_packages(sensitune.__path__, "sensitune."):
        importlib.import_module(info.name)
    packages = [sensitune] + [importlib.import_module(i.name) for i in pkgutil.walk_packages(sensitune.__path__, "sensitune.")
                              if i.ispkg]
    checked = 0
    for pkg in packages:
        for name in getattr(pkg, "__all__", []):
            if name.startswith("__"):
                continue
            value = getattr(pkg, name)
            assert not inspect.ismodule(value), f"{pkg.__name__}.{name} is a module, not the public object"
            checked += 1
    assert checked > 30
    assert callable(sensitune.evaluate) and callable(sensitune.engine.evaluate)
