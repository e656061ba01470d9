"""The data location on an S3 server (moto's standalone server on 127.0.0.1, conftest's
`s3_server`): a footage run (landing → raw_frames and its checks → curation backfills on Ray →
slice views → maintenance) with everything in the bucket, two ingestions in two processes
committing to the same table in the bucket at once, a fine-tune whose checkpoints and report
live in the bucket (the local cache only a working copy), and the working copy's pull, push
and clean-up."""

import os
import shutil
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
from avperception_assets.defs import (curation_assets, evaluation_assets, ingest_assets, maintenance_assets, sensors,
                                      slice_assets, training_assets)
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.failure_modes.registry import default_failure_modes
from avperception_assets.ingest import frames as ingest
from avperception_assets.slices import views as slices
from avperception_assets.storage import artifacts, locations, pixels, tables as storage
from avperception_assets.workspace import Workspace

from .conftest import RIDER, TINY_FINETUNE, TINY_TRAINING, source_ids, view_ids

MODES = default_failure_modes()[:1]  # rider: each view refresh is a Geneva job
FRAME_SIZE = dict(width=320, height=180)


def _land(tmp_path: Path, location: str, batch_id: str, frames: int, seed: int, val_fraction: float = 0.2) -> None:
    """A synthetic batch written locally, then copied to the location's landing prefix."""
    local = tmp_path / "landing"
    synthetic.write_batch(local, batch_id, frames, seed=seed, val_fraction=val_fraction, **FRAME_SIZE)
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


def _keys(s3_server, location: str, folder: str) -> set[str]:
    """The keys under `<location>/<folder>/`, relative to it."""
    prefix = f"{location.split('/', 3)[3]}/{folder}/"
    return {key[len(prefix):] for key in s3_server.keys(prefix)}


def _rider_stand_in_views(conn) -> None:
    """The rider views as plain tables of each split's frames, as conftest's `trained_rider`
    makes them (the real Geneva views run in the footage test above)."""
    frames = conn.open_table(storage.FRAMES_TABLE).to_lance().to_table(with_row_id=True).drop_columns(["image_bytes"])
    frames = frames.rename_columns([pixels.SOURCE_ROW_ID if n == "_rowid" else n for n in frames.column_names])
    for split in ("train", "val"):
        conn.create_table(slices.view_name(RIDER, split), frames.filter(pc.equal(frames["split"], split)),
                          storage_options=storage.STABLE_ROW_IDS)


@pytest.mark.dagster_run
@pytest.mark.training
def test_a_fine_tune_keeps_its_checkpoints_and_report_in_the_bucket(s3_server, s3_location, tmp_path, monkeypatch):
    """base_detector and rider_checkpoint on a data location in the bucket: their files land
    there, the local disk holds only the cache. With the cache emptied, as on a fresh machine,
    rider_checkpoint reuses the bucket's finished run and rider_eval_report reads the bucket's
    checkpoints and writes its report there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AVP_DATA_DIR", str(tmp_path / "data"))  # a data folder nothing may write to
    cache = tmp_path / "cache"
    workspace = WorkspaceResource(data_location=s3_location, storage_options=_storage_options(s3_server),
                                  cache_dir=str(cache))
    _land(tmp_path / "staging", s3_location, "b1", 16, seed=0, val_fraction=0.5)
    conn = workspace.connect()
    ingest.ingest_batches(conn, workspace.layout.landing, storage_options=workspace.storage_options)
    _rider_stand_in_views(conn)
    train_version = conn.open_table(slices.view_name(RIDER, "train")).version
    val_version = conn.open_table(slices.view_name(RIDER, "val")).version
    assets = [*training_assets.build_training_defs([RIDER]).assets, *evaluation_assets.build_evaluation_defs([RIDER]).assets]
    ops = {"base_detector": {"config": TINY_TRAINING}, "rider_checkpoint": {"config": TINY_FINETUNE},
           "rider_eval_report": {"config": {"batch_size": 4, "panel_count": 1, "worst_count": 0, "tiling": False}}}

    def materialize(*names):
        return dg.materialize(assets, selection=dg.AssetSelection.assets(*names), instance=instance,
                              run_config={"ops": {name: ops[name] for name in names}}, resources={"workspace": workspace})

    with dg.instance_for_test() as instance:
        trained = materialize("base_detector", "rider_checkpoint")
        assert trained.success
        assert {f"{train_version}/best.pt", f"{train_version}/metadata.json"} <= _keys(s3_server, s3_location, "checkpoints/rider")
        assert {"best.pt", "metadata.json"} <= {key.split("/")[-1] for key in _keys(s3_server, s3_location, "checkpoints/base")}
        [checkpoint] = trained.asset_materializations_for_node("rider_checkpoint")
        assert checkpoint.metadata["checkpoint_dir"].value == f"{s3_location}/checkpoints/rider/{train_version}"

        shutil.rmtree(cache)
        again = materialize("rider_checkpoint", "rider_eval_report")
        assert again.success
        logs = [event.user_message for event in instance.all_logs(again.run_id)]
    assert any("already holds this run (complete); nothing to train" in line for line in logs)
    assert f"{val_version}/report.json" in _keys(s3_server, s3_location, "reports/rider")
    [report] = again.asset_materializations_for_node("rider_eval_report")
    assert report.metadata["report_json"].value == f"{s3_location}/reports/rider/{val_version}/report.json"
    assert report.metadata["checkpoint"].value == f"{s3_location}/checkpoints/rider/{train_version}/best.pt"
    assert not (tmp_path / "data").exists() and sorted(os.listdir(tmp_path)) == ["cache", "staging"]


def test_pull_and_push_copy_only_what_the_other_side_lacks_or_holds_otherwise(s3_server, s3_location, tmp_path):
    workspace = Workspace(data_location=s3_location, storage_options=_storage_options(s3_server),
                          cache_dir=str(tmp_path / "cache"))
    run = workspace.checkpoints_dir_for("rider") / "3"
    (run / "tensorboard").mkdir(parents=True)
    (run / "best.pt").write_bytes(b"weights")
    (run / "metadata.json").write_text("{}")
    (run / "tensorboard" / "events").write_text("loss")
    (run / "last.pt.tmp").write_bytes(b"half a file")  # an atomic write under way: never uploaded
    rider = workspace.checkpoints_dir_for("rider")
    assert sorted(artifacts.push(workspace, rider)) == ["3/best.pt", "3/metadata.json", "3/tensorboard/events"]
    assert _keys(s3_server, s3_location, "checkpoints/rider") == {"3/best.pt", "3/metadata.json", "3/tensorboard/events"}
    assert artifacts.push(workspace, rider) == [] and artifacts.pull(workspace, rider) == []

    (run / "metadata.json").write_text('{"epochs": [1]}')
    assert artifacts.push(workspace, run / "metadata.json") == [""]
    shutil.rmtree(workspace.working_root)
    assert sorted(artifacts.pull(workspace, workspace.checkpoints_dir)) == [
        "rider/3/best.pt", "rider/3/metadata.json", "rider/3/tensorboard/events"]
    assert (run / "metadata.json").read_text() == '{"epochs": [1]}'
    assert artifacts.pull(workspace, workspace.checkpoints_dir) == []

    prefix = s3_location.split("/", 3)[3]
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{prefix}/checkpoints/rider/3/best.pt", Body=b"retrained")
    assert artifacts.pull(workspace, rider) == ["3/best.pt"] and (run / "best.pt").read_bytes() == b"retrained"
    assert artifacts.pull(workspace, workspace.reports_dir) == []  # nothing there yet


def test_clean_deletes_the_project_prefixes_and_the_cache_and_keeps_the_config(s3_server, s3_location, tmp_path):
    workspace = Workspace(data_location=s3_location, cache_dir=str(tmp_path / "cache"))  # the AWS variables
    prefix = s3_location.split("/", 3)[3]
    for folder in (*artifacts.PROJECT_FOLDERS, "config"):
        s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{prefix}/{folder}/a/file", Body=b"x")
    (workspace.reports_dir / "rider").mkdir(parents=True)
    removed = artifacts.remove(workspace)
    assert removed == [f"{s3_location}/{folder}" for folder in artifacts.PROJECT_FOLDERS] + [str(workspace.working_root)]
    assert {key for key in s3_server.keys(f"{prefix}/") if not key.endswith("/")} == {f"{prefix}/config/a/file"}
    assert not workspace.working_root.exists()
    assert artifacts.remove(workspace) == []


def test_a_local_data_location_has_no_working_copy_and_no_cache(tmp_path):
    workspace = Workspace(data_location=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    run = workspace.checkpoints_dir_for("rider") / "3"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(b"weights")
    assert workspace.checkpoints_dir == tmp_path / "data" / "checkpoints"
    assert artifacts.push(workspace, run) == [] and artifacts.pull(workspace, run) == []
    assert workspace.location_of(run / "best.pt") == str(run / "best.pt")
    assert not (tmp_path / "cache").exists()
