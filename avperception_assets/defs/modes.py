"""The code location's failure modes: the shipped defaults merged with the data location's
`config/failure_modes.toml`, read once when the definitions load (`definitions.py`) and passed
to every builder that grows the graph per mode."""

from pathlib import Path

from avperception_assets import workspace as settings
from avperception_assets.failure_modes.registry import FailureMode, load_registry


def config_dir() -> Path:
    """The data location's folder of user configuration (failure_modes.toml)."""
    return settings.data_dir() / "config"


def location_modes() -> tuple[FailureMode, ...]:
    return load_registry(config_dir())
