"""Imports deferred in every process of the platform: the driver, Dagster run workers,
DataLoader workers, and each Ray worker (through `storage.ray_context`'s setup hook).

Each Geneva job (one backfill, one view refresh) starts two to four Ray worker processes, and
each imports geneva, so what an import costs is paid about 27 times a footage run. Two
packages that a local database and a local Ray never call cost most of it:

- lancedb 0.39 with lance-namespace-urllib3-client 0.13: `import lancedb` runs that REST
  client's package `__init__`, which imports every endpoint module (each wraps its methods
  in pydantic's `validate_call`): about 2 s of CPU per process.
- geneva 0.17 with kubernetes 35: `geneva.runners.ray.admission` imports the KubeRay cluster
  code, whose modules import `kubernetes` (its `__init__` imports every submodule; the client
  package imports all 721 models and 66 APIs, the config package google-auth and
  cryptography): a fresh Ray actor took 2.72 s of CPU to import geneva with it, 1.87 s
  without. Those modules read a few names at import time (annotations such as `client.V1Pod`,
  `parse_quantity`); they come from their own small modules.

Deferring such a package's `__init__` to the first attribute read that needs it keeps the
package whole for any caller that does use it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

_K8S_CLIENT = "kubernetes.client"

# package -> {name read from it at import time: the module that defines it}. Parents first.
DEFERRED_PACKAGES: dict[str, dict[str, str]] = {
    "lance_namespace_urllib3_client": {},
    "kubernetes": {},
    "kubernetes.config": {},
    "kubernetes.utils": {"parse_quantity": "kubernetes.utils.quantity"},
    _K8S_CLIENT: {
        "ApiClient": f"{_K8S_CLIENT}.api_client",
        "ApiException": f"{_K8S_CLIENT}.exceptions",
        "rest": f"{_K8S_CLIENT}.rest",
        "AuthorizationV1Api": f"{_K8S_CLIENT}.api.authorization_v1_api",
        "CoreV1Api": f"{_K8S_CLIENT}.api.core_v1_api",
        "CustomObjectsApi": f"{_K8S_CLIENT}.api.custom_objects_api",
        "SchedulingV1Api": f"{_K8S_CLIENT}.api.scheduling_v1_api",
        "V1ContainerStatus": f"{_K8S_CLIENT}.models.v1_container_status",
        "V1LocalSubjectAccessReview": f"{_K8S_CLIENT}.models.v1_local_subject_access_review",
        "V1Pod": f"{_K8S_CLIENT}.models.v1_pod",
        "V1ServiceAccount": f"{_K8S_CLIENT}.models.v1_service_account",
    },
    f"{_K8S_CLIENT}.api": {},
    f"{_K8S_CLIENT}.models": {},
}


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


def defer_unused_imports() -> None:
    """Also Ray's `worker_process_setup_hook`."""
    for name, early in DEFERRED_PACKAGES.items():
        defer_package_init(name, early)
