"""The long base `make base` caches, base_detector reusing it, and base_detector_report on the
val frames outside every slice and inside each: real Dagster materializations on a small table
(the `base_run` fixture), and the figures and verdicts from stored matches alone.

The val views are stand-ins, as in conftest's trained_rider: plain Lance tables holding the val
frames a view would hold (riders; pedestrians at night), with the frames' stable row ids as
`__source_row_id`. `dhash` is curation's own function over each frame, NULL where a frame does
not decode, as the Geneva backfill leaves it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import lance
import pyarrow as pa
import pytest

from avperception_assets import synthetic
from avperception_assets.curation import maintenance, udfs
from avperception_assets.defs import evaluation_assets, training_assets
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.evaluation import base_report, bootstrap, frame_errors
from avperception_assets.failure_modes.registry import get_mode
from avperception_assets.formats.taxonomy import COCO_IDS
from avperception_assets.ingest import frames as ingest
from avperception_assets.model import checkpoints, detector
from avperception_assets.model.detections import coco_category_names, mode_class_ids
from avperception_assets.slices import views as slices
from avperception_assets.storage import pixels, tables as storage
from avperception_assets.workspace import Workspace

from .conftest import RIDER, TINY_TRAINING, append_rows, damaged_inside
from .test_bootstrap import _exact
from .test_detections import CAR, PERSON
from .test_reports import _jittered, _random_targets

NIGHT = get_mode("nighttime_person")
MODES = (RIDER, NIGHT)
# Which val frames each stand-in view holds, by the frame's labels, as the modes' filters take them
IN_VIEW = {RIDER.name: lambda frame: "rider" in frame["ann_categories"],
           NIGHT.name: lambda frame: frame["timeofday"] == "night" and "pedestrian" in frame["ann_categories"]}
DAMAGED = "damaged-val-frame"


@lance.batch_udf()
def _dhash(batch: pa.RecordBatch) -> pa.RecordBatch:
    values = []
    for frame in batch["image_bytes"].to_pylist():
        try:
            values.append(udfs.dhash(frame))
        except RuntimeError:  # does not decode: no dhash, so in no slice and not scored
            values.append(None)
    return pa.RecordBatch.from_arrays([pa.array(values, pa.uint64())], ["dhash"])


def _with_a_damaged_val_frame(table) -> None:
    val = table.to_lance().to_table(filter="split = 'val'", limit=1).to_pylist()[0]
    seq = max(table.to_lance().to_table(columns=["ingest_seq"])["ingest_seq"].to_pylist()) + 1
    append_rows(table, [{**val, "image_id": DAMAGED, "ingest_seq": seq,
                         "image_bytes": damaged_inside(val["image_bytes"])}])


def _stand_in_val_views(conn) -> dict[str, list[str]]:
    """Each mode's val view as a plain table; returns the image ids each holds."""
    frames = conn.open_table(storage.FRAMES_TABLE).to_lance().to_table(
        filter="split = 'val' AND dhash IS NOT NULL", with_row_id=True).drop_columns(["image_bytes"])
    frames = frames.rename_columns([pixels.SOURCE_ROW_ID if n == "_rowid" else n for n in frames.column_names])
    held = {}
    for mode, keeps in IN_VIEW.items():
        view = frames.filter(pa.array([keeps(f) for f in frames.to_pylist()]))
        conn.create_table(slices.view_name(mode, "val"), view, storage_options=storage.STABLE_ROW_IDS)
        held[mode] = view["image_id"].to_pylist()
    return held


@dataclass
class BaseRun:
    root: Path
    val_ids: list[str]  # the curated val frames
    held: dict[str, list[str]]  # mode -> the frames its val view holds
    categories: dict[str, list[str]]
    long_base: dict
    reused: dict
    report: dict
    summary: dict


def _metadata(result: dg.ExecuteInJobResult, asset: str) -> dict:
    [event] = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in event.metadata.items()}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> BaseRun:
    """`make base`'s run (tiny), then base_detector as `make demo` runs it, then the base report
    and the summary, on 32 frames (19 val: 6 riders, 4 pedestrians at night, 2 frames in both)."""
    root = tmp_path_factory.mktemp("base-report")
    workspace = Workspace(data_location=str(root))
    synthetic.write_batch(workspace.landing_dir, "b1", 32, seed=5, width=320, height=180, val_fraction=0.5)
    conn = storage.connect(workspace.lancedb_uri)
    ingest.ingest_batches(conn, workspace.landing_dir)
    table = conn.open_table(storage.FRAMES_TABLE)
    _with_a_damaged_val_frame(table)
    table.to_lance().add_columns(_dhash, read_columns=["image_bytes"])
    held = _stand_in_val_views(conn)
    val = conn.open_table(storage.FRAMES_TABLE).to_lance().to_table(
        columns=["image_id", "ann_categories"], filter="split = 'val' AND dhash IS NOT NULL").to_pylist()
    resources = {"workspace": WorkspaceResource(data_location=str(root))}
    with dg.instance_for_test() as instance:
        def materialize(assets, config=None):
            result = dg.materialize(assets, instance=instance, resources=resources, run_config={"ops": config or {}})
            assert result.success
            return result

        long_base = materialize([training_assets.base_detector],
                                {"base_detector": {"config": {**TINY_TRAINING, "profile": detector.LONG_BASE_PROFILE}}})
        reused = materialize([training_assets.base_detector], {"base_detector": {"config": TINY_TRAINING}})
        report = materialize([*evaluation_assets.build_base_report_defs(MODES).assets,
                              evaluation_assets.build_summary_asset(MODES)])
        yield BaseRun(root, [f["image_id"] for f in val], held, {f["image_id"]: f["ann_categories"] for f in val},
                      _metadata(long_base, "base_detector"), _metadata(reused, "base_detector"),
                      _metadata(report, "base_detector_report"), _metadata(report, "failure_mode_summary"))


def test_make_base_trains_the_long_base_into_its_own_folder(base_run):
    long_base = base_run.long_base
    assert Path(long_base["checkpoint_dir"]).parent == base_run.root / "checkpoints" / "base_long"
    assert long_base["profile"] == "cpu_long" and long_base["reused_long_base"] is False
    assert checkpoints.read_metadata(Path(long_base["checkpoint_dir"]))["status"] == checkpoints.COMPLETE


def test_base_detector_reuses_the_cached_long_base_and_says_so(base_run):
    reused, long_base = base_run.reused, base_run.long_base
    assert reused["reused_long_base"] is True and "nothing trained" in reused["note"]
    assert reused["weights"] == long_base["weights"] == str(Path(long_base["checkpoint_dir"]) / checkpoints.BEST_FILE)
    assert reused["epoch_val_map_50"] == long_base["epoch_val_map_50"]
    assert not list((base_run.root / "checkpoints" / "base").glob(f"*/{checkpoints.BEST_FILE}"))  # trained nothing
    # Only a base of the profile's own network is reused: the gpu profile's would not take it.
    long_dir = base_run.root / "checkpoints" / "base_long"
    assert checkpoints.latest_complete(long_dir, detector.get_profile("cpu").architecture) == Path(long_base["checkpoint_dir"])
    assert checkpoints.latest_complete(long_dir, detector.get_profile("gpu").architecture) is None


def _report(base_run) -> dict:
    return json.loads(Path(base_run.report["report_json"]).read_text())


def test_the_report_scores_every_curated_val_frame_once_from_the_cached_base(base_run):
    data, meta = _report(base_run), base_run.report
    assert Path(meta["report_dir"]) == base_run.root / "reports" / "base" / str(data["frames_table"]["version"])
    assert (Path(meta["report_dir"]) / base_report.REPORT_MD).read_text().startswith("# Base detector outside")
    assert data["model"]["weights"] == base_run.long_base["weights"] and meta["reused_long_base"] is True
    assert data["model"]["input_size"] == [96, 160]  # its own profile's, as deployed
    conn = storage.connect(str(base_run.root / "lancedb"))
    stored = frame_errors.read_table(conn, "base", meta["eval_frames_version"])
    assert meta["eval_frames_table"] == "base_eval_frames" == data["eval_frames"]["table"]
    # Frames in two views are scored once; the frame that does not decode is in no set.
    assert sorted(stored["image_id"].to_pylist()) == sorted(base_run.val_ids)
    assert DAMAGED not in base_run.val_ids and data["num_images"] == meta["dagster/row_count"] == len(base_run.val_ids)
    # Table maintenance keeps the versions the report measured.
    workspace = Workspace(data_location=str(base_run.root))
    pins = maintenance.pinned_versions(conn, workspace.checkpoints_dir, workspace.reports_dir, views=[])
    assert data["frames_table"]["version"] in pins[storage.FRAMES_TABLE] and pins["base_eval_frames"] == {
        meta["eval_frames_version"]}


def test_outside_is_every_val_frame_no_view_holds(base_run):
    data = _report(base_run)
    in_views = set().union(*base_run.held.values())
    outside = [i for i in base_run.val_ids if i not in in_views]
    assert set(base_run.held[RIDER.name]) & set(base_run.held[NIGHT.name])  # the sets overlap: a real case
    assert 0 < len(outside) == data["outside"]["frames"] == base_run.report["outside_frames"]
    expected = Counter(c for i in outside for c in base_run.categories[i] if c in COCO_IDS)
    assert data["outside"]["objects_per_class"] == dict(expected) and "rider" not in expected
    for mode, held in base_run.held.items():
        assert data["modes"][mode]["frames"] == len(held)
        assert data["modes"][mode]["objects_per_class"] == dict(
            Counter(c for i in held for c in base_run.categories[i] if c in COCO_IDS))


def test_each_mode_gets_off_minus_on_with_its_interval_and_verdict(base_run):
    data, meta = _report(base_run), base_run.report
    key = bootstrap.VERDICT_METRIC
    # Riders occur only in their slice: compared with the base's all-class AP off the slices.
    assert data["modes"][RIDER.name]["reference"] == base_report.ALL_CLASSES_REFERENCE
    assert data["modes"][NIGHT.name]["reference"] == base_report.MODE_CLASSES
    assert data["modes"][RIDER.name]["intervals"][base_report.OFF] == data["outside"]["intervals"]
    for mode, figures in data["modes"].items():
        intervals = figures["intervals"]
        difference = intervals[base_report.OFF_MINUS_ON][key]
        assert difference["point"] == pytest.approx(
            100 * (intervals[base_report.OFF][key]["point"] - intervals[base_report.ON][key]["point"]))
        assert difference["frames"] == {base_report.OFF: data["outside"]["frames"], base_report.ON: figures["frames"]}
        assert figures["verdict"] == base_report.SLICE_VERDICTS[bootstrap.verdict(difference)]
        assert meta[f"{mode}_verdict"] == figures["verdict"]
        assert meta[f"{mode}_off_minus_on_{key}_points"] == pytest.approx(difference["point"])
    assert meta[f"outside_{key}"] == pytest.approx(data["outside"]["intervals"][key]["point"])
    assert meta["outside"].startswith("| outside every slice | frames | objects |")


def test_the_summary_shows_the_base_detector(base_run):
    summary = base_run.summary
    assert summary["base_detector_report"] is True and summary["modes_without_report"] == [RIDER.name, NIGHT.name]
    text = (base_run.root / "reports" / "summary.md").read_text()
    assert "## Base detector outside and inside the slices" in text and base_run.report["modes"] in text
    written = json.loads((base_run.root / "reports" / "summary.json").read_text())
    assert written["base_detector"]["outside"] == _report(base_run)["outside"]


def test_a_slice_the_base_does_worse_on_is_measurably_worse():
    """From stored matches alone: the base exact on the 50 frames outside, poor on a night slice
    of pedestrians and on a rider slice whose riders (COCO persons) occur nowhere else."""
    targets = _random_targets(90, seed=101)
    predictions = _exact(targets[:50]) + _jittered(targets[50:], seed=102)
    ids = [f"frame-{i}" for i in range(90)]
    names = coco_category_names()
    matches = {base_report.BASE: [frame_errors.match_frame(p, t, names) for p, t in zip(predictions, targets)]}
    rows = frame_errors.frame_rows(matches, ids, mode_class_ids(base_report.ALL_CLASSES), names)
    labels = {PERSON: "pedestrian", CAR: "car"}
    categories = {i: [labels[c] for c in t["labels"].tolist()] for i, t in zip(ids, targets)}
    categories.update({i: ["rider" if c == "pedestrian" else c for c in categories[i]] for i in ids[70:]})
    views = {NIGHT.name: ids[50:70], RIDER.name: ids[70:], "empty": []}
    sets = base_report.FrameSets(3, ids[:50], {mode: {"name": f"bdd100k_{mode}_val", "version": 1, "image_ids": held}
                                               for mode, held in views.items()}, categories)
    found = base_report.measure(rows, sets, {NIGHT.name: NIGHT.classes, RIDER.name: RIDER.classes,
                                             "empty": ("pedestrian",)})
    assert found["outside"]["intervals"]["map_50"]["point"] == 1.0 and found["outside"]["frames"] == 50
    assert found["outside"]["objects_per_class"] == dict(Counter(c for i in ids[:50] for c in categories[i]).most_common())
    night, rider = found["modes"][NIGHT.name], found["modes"][RIDER.name]
    assert (night["reference"], rider["reference"]) == (base_report.MODE_CLASSES, base_report.ALL_CLASSES_REFERENCE)
    for figures in (night, rider):
        difference = figures["intervals"][base_report.OFF_MINUS_ON]["map_50"]
        assert difference["low"] > 0 and figures["verdict"] == base_report.WORSE_ON_SLICE
    assert found["modes_without_frames"] == ["empty"] and "empty" not in found["modes"]
