"""The data location on an S3 server (moto's standalone server on 127.0.0.1, conftest's
`s3_server`): a footage run (landing → raw_frames and its checks → curation backfills on Ray →
slice views → maintenance) with everything in the bucket, and two ingestions in two processes
committing to the same table in the bucket at once."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pytest

from avperception_assets import synthetic
from avperception_assets.curation import columns as curation
from avperception_assets.defs import curation_assets, ingest_assets, maintenance_assets, sensors, slice_assets
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.failure_modes.registry import default_failure_modes
from avperception_assets.ingest import frames as ingest
from avperception_assets.slices import views as slices
from avperception_assets.storage import locations, tables as storage
from avperception_assets.workspace import Workspace

from .conftest import source_ids, view_ids

MODES = default_failure_modes()[:1]  # rider: each view refresh is a Geneva job
FRAME_SIZE = dict(width=320, height=180)


def _land(tmp_path: Path, location: str, batch_id: str, frames: int, seed: int) -> None:
    """A synthetic batch written locally, then copied to the location's landing prefix."""
    local = tmp_path / "landing"
    synthetic.write_batch(local, batch_id, frames, seed=seed, **FRAME_SIZE)
    locations.copy_folder(local / batch_id, locations.join(location, "landing", batch_id))


def _storage_options(s3_server) -> dict[str, str]:
    """The workspace's storage options for the server: Geneva hands them to its Ray workers,
    whichever environment those were started in."""
    credentials = s3_server.credentials
    return {"aws_endpoint": s3_server.endpoint, "allow_http": "true", "aws_region": credentials["AWS_REGION"],
            "aws_access_key_id": credentials["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": credentials["AWS_SECRET_ACCESS_KEY"]}


@pytest.mark.ray
@pytest.mark.dagster_run
def test_a_footage_run_keeps_every_table_in_the_bucket(local_ray, s3_server, s3_location, tmp_path):
    """Ray started before the server's AWS variables were set (`local_ray` first): whatever a
    UDF opens in its workers must come with the workspace's storage options."""
    workspace = WorkspaceResource(data_location=s3_location, storage_options=_storage_options(s3_server))
    _land(tmp_path, s3_location, "b1", 12, seed=3)
    _land(tmp_path, s3_location, "b2", 2, seed=4)
    s3_server.client().delete_object(Bucket=s3_server.bucket, Key=f"{s3_location.split('/', 3)[3]}/landing/b2/_READY")
    conn = workspace.connect()
    assert ingest.pending_batches(conn, workspace.layout.landing, workspace.storage_options) == ["b1"]  # b2 still copying

    defs = dg.Definitions.merge(ingest_assets.defs, curation_assets.build_curation_defs(MODES),
                                slice_assets.build_slice_defs(MODES), maintenance_assets.build_maintenance_defs(MODES),
                                dg.Definitions(resources={"workspace": workspace}))
    selection = sensors.FOOTAGE_SELECTION.resolve(defs.resolve_asset_graph())
    ops = {"raw_frames": {"config": {"batch_ids": ["b1"]}},
           "curation_columns": {"config": {"concurrency": 1, "person_area_source": curation.SOURCE_ANNOTATIONS}}}
    with dg.instance_for_test() as instance:
        result = dg.materialize([*defs.assets, *defs.asset_checks], selection=dg.AssetSelection.assets(*selection),
                                instance=instance, resources={"workspace": workspace}, run_config={"ops": ops})
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert checks and all(check.passed for check in checks), [c.check_name for c in checks if not c.passed]

    assert ingest.pending_batches(conn, workspace.layout.landing, workspace.storage_options) == []
    table = conn.open_table(storage.FRAMES_TABLE)
    assert table.count_rows() == 12
    frames = table.to_lance().to_table(columns=list(curation.COLUMNS) + ["image_id"])
    assert all(frames[c].null_count == 0 for c in curation.COLUMNS if c in frames.column_names)
    for mode, split in slices.all_views(MODES):
        view = slices.open_view(conn, slices.view_name(mode, split))
        assert view_ids(view) == source_ids(conn, slices.view_filter(mode, split))
    prefix = s3_location.split("/", 3)[3]
    tables = {key.split("/")[2] for key in s3_server.keys(f"{prefix}/lancedb/")}
    assert {f"{storage.FRAMES_TABLE}.lance", *(f"{slices.view_name(m, s)}.lance" for m, s in slices.all_views(MODES))} <= tables


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from avperception_assets import patches
    patches.apply_at_startup()
    from avperception_assets.ingest import frames as ingest
    from avperception_assets.storage import tables as storage
    location, batch_id, go = sys.argv[1:4]
    conn = storage.connect(location + "/lancedb")
    Path(go + "." + batch_id).touch()  # imported and connected: ready
    while not Path(go).exists():
        time.sleep(0.01)
    ingest.ingest_batches(conn, location + "/landing", [batch_id])
""")


@pytest.mark.fresh_interpreter
def test_two_ingestions_in_two_processes_both_land_in_the_bucket(s3_server, s3_location, tmp_path):
    """Two processes, each ingesting its own batch into the same table in the bucket, commit at
    the same moment (both wait on one file): Lance's conditional commit makes the later one
    rebase onto the other's append, so both batches land whole, once."""
    sizes = {"w1": 30, "w2": 30}
    for seed, (batch_id, frames) in enumerate(sizes.items()):
        _land(tmp_path, s3_location, batch_id, frames, seed=seed)
    conn = storage.connect(f"{s3_location}/lancedb")
    storage.open_frames(conn)  # the table exists, as in a deployment: the writers only append
    go = tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, s3_location, batch_id, str(go)])
               for batch_id in sizes]
    try:
        while not all(Path(f"{go}.{batch_id}").exists() for batch_id in sizes):
            assert all(w.poll() is None for w in writers), "a writer exited before the start"
            time.sleep(0.05)
        go.touch()
        assert [w.wait(timeout=300) for w in writers] == [0, 0]
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
    dataset = conn.open_table(storage.FRAMES_TABLE).to_lance()
    appends = [t for t in dataset.get_transactions() if t is not None and type(t.operation).__name__ == "Append"]
    assert len(appends) == 2 and appends[0].read_version == appends[1].read_version, "the writers did not commit at once"
    rows = dataset.to_table(columns=["image_id", "batch_id", "ingest_seq"])
    counts = rows.group_by("batch_id").aggregate([("image_id", "count_distinct"), ("image_id", "count")])
    assert dict(zip(counts["batch_id"].to_pylist(), counts["image_id_count"].to_pylist())) == sizes
    assert counts["image_id_count_distinct"].to_pylist() == counts["image_id_count"].to_pylist()
    assert pc.count_distinct(rows["image_id"]).as_py() == sum(sizes.values())
    assert len(pc.unique(rows["ingest_seq"])) == sum(sizes.values())  # one ingestion order
