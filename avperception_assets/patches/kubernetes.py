"""kubernetes 35.0.0 as geneva 0.17.0 imports it: `import geneva` imports the Kubernetes client
whole, which a local Ray (or one reached by address) never calls.

Symptom: `geneva.runners.ray.admission` imports Geneva's KubeRay cluster code, whose modules
import `kubernetes`; its `__init__` imports every submodule, the client package all 721 models
and 66 APIs, the config package google-auth and cryptography. A fresh Ray actor took 2.72 s
of CPU to import geneva with it, 1.87 s without, and each Geneva job starts two to four.

Patch: the `__init__`s of `kubernetes` and of its `client`, `config` and `utils` packages are
deferred (`imports.defer_package_init`). Geneva's modules read a few names at import time
(annotations such as `client.V1Pod`, `parse_quantity`); those come from their own small modules
(`EARLY`). Code that uses the client (dagster-k8s, KubeRay tooling) gets the packages whole.

Upstream: kubernetes-client/python#771 ("RFC: Allow modular import of the api and models",
closed unresolved); kubernetes-client/gen#305 moves the client's generator to OpenAPI Generator 7
with `lazyImports`, which may make this patch unneeded in a later kubernetes release.
"""

from __future__ import annotations

from avperception_assets.patches.imports import defer_packages
from avperception_assets.patches.versions import Patch

DEFER_CLIENT = Patch(
    "kubernetes.defer_client", {"kubernetes": "35.0.0", "geneva": "0.17.0"},
    correctness=False, without="every process that imports geneva spends about 0.9 s of CPU more")

PATCHES = (DEFER_CLIENT,)

_CLIENT = "kubernetes.client"
# package -> {name Geneva reads from it at import time: the module that defines it}. Parents first.
DEFERRED: dict[str, dict[str, str]] = {
    "kubernetes": {},
    "kubernetes.config": {},
    "kubernetes.utils": {"parse_quantity": "kubernetes.utils.quantity"},
    _CLIENT: {
        "ApiClient": f"{_CLIENT}.api_client",
        "ApiException": f"{_CLIENT}.exceptions",
        "rest": f"{_CLIENT}.rest",
        "AuthorizationV1Api": f"{_CLIENT}.api.authorization_v1_api",
        "CoreV1Api": f"{_CLIENT}.api.core_v1_api",
        "CustomObjectsApi": f"{_CLIENT}.api.custom_objects_api",
        "SchedulingV1Api": f"{_CLIENT}.api.scheduling_v1_api",
        "V1ContainerStatus": f"{_CLIENT}.models.v1_container_status",
        "V1LocalSubjectAccessReview": f"{_CLIENT}.models.v1_local_subject_access_review",
        "V1Pod": f"{_CLIENT}.models.v1_pod",
        "V1ServiceAccount": f"{_CLIENT}.models.v1_service_account",
    },
    f"{_CLIENT}.api": {},
    f"{_CLIENT}.models": {},
}


def defer_client() -> None:
    """Apply the patch of this module's docstring (skipped on other versions)."""
    if DEFER_CLIENT.applies():
        defer_packages(DEFERRED)
