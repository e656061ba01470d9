"""The import-time mechanisms of the patches, which entry points apply explicitly
(`patches.apply_at_startup`, Ray's worker set-up hook), never an import of this package.

`defer_package_init` (the `lancedb` and `kubernetes` patches): a deferred package is registered
in `sys.modules` as an empty module with the package's own spec and path, so its submodules
import as usual while its `__init__` runs on the first read of an attribute the package does
not have yet. Any caller that does use the package gets it whole; one that only imports a few
submodules (or reads the few names listed as early) never pays for the rest.

`patch_on_import` (Geneva's refresh patch): a patch that runs when the module it mends is first
imported, so a process that never imports that module does not import it for the patch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import threading
import types
from typing import Callable


def defer_package_init(name: str, early: dict[str, str] | None = None) -> None:
    """Register `name` as a package whose submodules import as usual while its own `__init__`
    runs on the first read of an attribute it does not have yet; a name in `early` is taken
    from the module that defines it, without that run. A no-op once the package is imported."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return
    package = types.ModuleType(name)
    package.__spec__, package.__file__, package.__package__ = spec, spec.origin, name
    package.__path__ = list(spec.submodule_search_locations)
    early, lock, ran = early or {}, threading.RLock(), []

    def read(attribute: str):
        with lock:  # another thread waits for the `__init__` rather than seeing half a package
            if attribute in early and not ran:
                module = importlib.import_module(early[attribute])
                return module if module.__name__ == f"{name}.{attribute}" else getattr(module, attribute)
            if not ran:
                ran.append(True)
                spec.loader.exec_module(package)
                if package.__dict__.get("__getattr__") is read:
                    del package.__getattr__
            try:
                return package.__dict__[attribute]
            except KeyError:
                raise AttributeError(f"module {name!r} has no attribute {attribute!r}") from None

    package.__getattr__ = read
    sys.modules[name] = package
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:  # as an import would bind it; `from parent import child` reads it
        setattr(sys.modules[parent], child, package)


def defer_packages(packages: dict[str, dict[str, str]]) -> None:
    """Defer each package of `packages` {package: early names}, parents before children."""
    for name, early in packages.items():
        defer_package_init(name, early)


def patch_on_import(name: str, patch: Callable) -> None:
    """Run `patch(module)` once module `name` is imported: now if it is, else right after its
    first import."""
    if name in sys.modules:
        patch(sys.modules[name])
    elif not any(isinstance(finder, _PatchOnImport) and finder.name == name for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(name, patch))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, patch: Callable):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, self.patch)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    """The module's own loader, then the patch."""

    def __init__(self, loader, patch: Callable):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)

    def __getattr__(self, attribute):  # get_source, get_filename, ... for inspect and tracebacks
        return getattr(self.loader, attribute)
