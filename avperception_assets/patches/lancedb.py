"""lancedb 0.39.0 with lance-namespace-urllib3-client 0.13.0: `import lancedb` imports lancedb's
REST namespace client whole, which a local database never calls.

Symptom: `lancedb.db` imports `lance_namespace`, which imports `lance_namespace_urllib3_client.models`;
that runs the client package's `__init__`, which imports every endpoint module (each wraps its
methods in pydantic's `validate_call`): about 2 s of CPU in every process that imports lancedb.
Each Geneva job (one backfill, one view refresh) starts two to four Ray worker processes that
all import it, about 27 times a footage run.

Patch: the client package's `__init__` is deferred (`imports.defer_package_init`), so
`.models` imports alone and the endpoints only when something reads them.

Upstream: none filed upstream for lancedb. pylance made its own import of the same client lazy
(lance-format/lance#9273, "perf(python): import the namespace client lazily"), the change that
`lance_namespace` would need too.
"""

from __future__ import annotations

from avperception_assets.patches.imports import defer_packages
from avperception_assets.patches.versions import Patch

DEFER_REST_CLIENT = Patch(
    "lancedb.defer_rest_client", {"lancedb": "0.39.0", "lance-namespace-urllib3-client": "0.13.0"},
    correctness=False, without="every process that imports lancedb spends about 2 s of CPU more")

PATCHES = (DEFER_REST_CLIENT,)

DEFERRED = {"lance_namespace_urllib3_client": {}}


def defer_rest_client() -> None:
    """Apply the patch of this module's docstring (skipped on other versions)."""
    if DEFER_REST_CLIENT.applies():
        defer_packages(DEFERRED)
