"""Imports deferred in every process of the platform: the driver, Dagster run workers,
DataLoader workers, and each Ray worker (through `storage.ray_context`'s setup hook).

Each Geneva job (one backfill, one view refresh) starts about four Ray actor processes, and
each imports geneva. With lancedb 0.39 and lance-namespace-urllib3-client 0.13,
`import lancedb` runs that REST client's package `__init__`, which imports every endpoint
module (each wraps its methods in pydantic's `validate_call`): about 2 s of CPU per process,
a fifth of a small job's time on two cores, though a local database never calls it.
Deferring that `__init__` to the first attribute read keeps the package whole for any
caller that does use it.
"""

from __future__ import annotations

import importlib.util
import sys
import types

DEFERRED_PACKAGES = ("lance_namespace_urllib3_client",)


def defer_package_init(name: str) -> None:
    """Register `name` as a package whose submodules import as usual while its own `__init__`
    runs on the first attribute read. A no-op once the package is imported."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return
    package = types.ModuleType(name)
    package.__spec__, package.__file__, package.__package__ = spec, spec.origin, name
    package.__path__ = list(spec.submodule_search_locations)

    def run_init(attribute: str):
        del package.__getattr__
        spec.loader.exec_module(package)
        return getattr(package, attribute)

    package.__getattr__ = run_init
    sys.modules[name] = package


def defer_unused_imports() -> None:
    """Also Ray's `worker_process_setup_hook`."""
    for name in DEFERRED_PACKAGES:
        defer_package_init(name)
