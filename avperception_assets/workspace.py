"""Where all state lives. One setting, `AVP_DATA_DIR`, relocates everything."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_DIR = "data"


def data_dir() -> Path:
    """Root of all state: landing zone, LanceDB, checkpoints, reports, Dagster storage."""
    return Path(os.environ.get("AVP_DATA_DIR", DEFAULT_DATA_DIR)).expanduser().absolute()


def landing_dir() -> Path:
    return data_dir() / "landing"


def lancedb_uri() -> str:
    """LanceDB location; `AVP_LANCEDB_URI` may point at an object store (s3://, gs://, az://)."""
    return os.environ.get("AVP_LANCEDB_URI") or str(data_dir() / "lancedb")


def checkpoints_dir() -> Path:
    return data_dir() / "checkpoints"


def reports_dir() -> Path:
    return data_dir() / "reports"
