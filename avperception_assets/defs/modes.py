"""The code location's failure modes: the shipped defaults merged with the data location's
`config/failure_modes.toml`, read once when the definitions load (`definitions.py`) and passed
to every builder that grows the graph per mode."""

from avperception_assets.failure_modes.registry import FailureMode, load_registry
from avperception_assets.workspace import Workspace


def location_modes(workspace: Workspace | None = None) -> tuple[FailureMode, ...]:
    """The registry of the workspace's data location (default: the environment's)."""
    workspace = Workspace.from_env() if workspace is None else workspace
    return load_registry(workspace.config_dir, workspace.embedding_model)
