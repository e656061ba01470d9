"""Patches of other libraries' behaviour, one module per library (`lancedb`, `kubernetes`,
`geneva`, `dagster`, `ray`), each written against exact versions (pinned in pyproject.toml) and
checked against the installed ones (`versions`). Each module's docstring says the version, the
symptom and the upstream issue; each has a test in `test_patches_<library>.py` that fails once
the library no longer needs it.

Importing this package changes nothing. Entry points apply the patches explicitly:
`apply_at_startup` in every process that loads the code location or runs a command, and
`setup_ray_worker` in every Ray worker (Ray's `worker_process_setup_hook`).
"""

from __future__ import annotations

from avperception_assets.patches import dagster, geneva, kubernetes, lancedb, ray
from avperception_assets.patches.versions import PatchVersionError

PATCHES = (*lancedb.PATCHES, *kubernetes.PATCHES, *geneva.PATCHES, *dagster.PATCHES, *ray.PATCHES)


def apply_at_startup() -> None:
    """Check every patch against the installed versions, then defer the imports this process
    never needs (before they are first imported). A patch skipped on another version logs a
    warning; a correctness patch on another version raises `PatchVersionError` naming every such
    patch and version, so the process stops here."""
    refused = []
    for patch in PATCHES:
        try:
            patch.applies()
        except PatchVersionError as error:
            refused.append(str(error))
    if refused:
        raise PatchVersionError("\n".join(["patches met versions they were not written for:", *refused]))
    lancedb.defer_rest_client()
    kubernetes.defer_client()


def setup_ray_worker() -> None:
    """Ray's `worker_process_setup_hook`: the import deferrals, and Geneva's refresh patch once
    its pipeline is imported."""
    lancedb.defer_rest_client()
    kubernetes.defer_client()
    geneva.keep_view_checkpoints_on_import()
