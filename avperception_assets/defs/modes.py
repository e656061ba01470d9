"""The code location's failure modes: the shipped defaults merged with the data location's
`config/failure_modes.toml`, read once when the definitions load (`definitions.py`) and passed
to every builder that grows the graph per mode."""

import tempfile
from pathlib import Path

from avperception_assets.failure_modes.registry import REGISTRY_FILE, FailureMode, load_registry
from avperception_assets.storage import locations
from avperception_assets.workspace import Workspace


def location_modes(workspace: Workspace | None = None) -> tuple[FailureMode, ...]:
    """The registry of the workspace's data location (default: the environment's); on an object
    store its `config/` prefix is read through a temporary copy."""
    workspace = Workspace.from_env() if workspace is None else workspace
    if not workspace.is_object_store:
        return load_registry(workspace.config_dir, workspace.embedding_model)
    with tempfile.TemporaryDirectory(prefix="avp-config-") as config_dir:
        config = workspace.location("config")
        if locations.is_file(locations.join(config, REGISTRY_FILE), workspace.storage_options):
            locations.copy_folder(config, config_dir, workspace.storage_options)
        return load_registry(Path(config_dir), workspace.embedding_model)
