"""Shared fixtures: every test runs against state under a temporary AVP_DATA_DIR."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before any project import reads it: nothing a test does may touch the repository's data/.
os.environ["AVP_DATA_DIR"] = tempfile.mkdtemp(prefix="avp-test-data-")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TQDM_DISABLE", "1")  # Geneva's progress bars; read when Geneva is imported

from avperception_assets import ingest, storage, synthetic  # noqa: E402


def build_frames_table(root: Path, batches: list[tuple[str, int, int]], layout: str = "det_20"):
    """Land and ingest synthetic batches [(batch_id, frames, seed)] under root; returns (conn, landing)."""
    landing = Path(root) / "landing"
    for batch_id, frames, seed in batches:
        synthetic.write_batch(landing, batch_id, frames, seed=seed, layout=layout)
    conn = storage.connect(str(Path(root) / "lancedb"))
    ingest.ingest_batches(conn, landing)
    return conn, landing


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """A fresh AVP_DATA_DIR for one test."""
    monkeypatch.setenv("AVP_DATA_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the whole session: its start costs seconds."""
    with storage.ray_context():
        yield
