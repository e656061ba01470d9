"""Curation columns on a real frames table with real Geneva backfills on the session's local Ray.

One module fixture does the expensive part once: ingest a batch (plus injected near-duplicate
copies), backfill every column, append a second batch (more copies and one corrupt frame),
backfill again. The tests then read what happened.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from avperception_assets.curation import columns as curation, checks as curation_checks, udfs as curation_udfs
from avperception_assets.ingest import image_checks, frames as ingest, checks as ingest_checks
from avperception_assets.storage import tables as storage
from avperception_assets import synthetic
from avperception_assets.formats.taxonomy import PERSON_CLASSES

from .conftest import (CURATED_SIZE, append_rows, build_frames_table, copy_curated_db, damaged_inside,
                       near_duplicate_rows)


def _frames(table) -> list[dict]:
    columns = ["image_id", "image_bytes", "ingest_seq", "ann_categories", "ann_bboxes", "width", "height",
               *(c for c in curation.COLUMNS if c in table.schema.names)]
    return sorted(table.to_lance().to_table(columns=columns).to_pylist(), key=lambda r: r["ingest_seq"])


@pytest.fixture(scope="module")
def curated(tmp_path_factory, curated_db):
    """The session's curated table (batch b1 with two near-duplicate copies of its first frame,
    every column backfilled once), copied; then a second batch with more copies and one corrupt
    frame lands and the columns are backfilled again."""
    conn, landing = copy_curated_db(curated_db, tmp_path_factory.mktemp("curation"))
    table = conn.open_table(storage.FRAMES_TABLE)
    first_ids, run1 = curated_db.first_ids, curated_db.run1
    config = curation.CurationConfig(person_area_source="annotations", concurrency=1)
    before = {r["image_id"]: r for r in _frames(table)}

    # Canary: an old row holding values no run would compute; a rerun that touched old rows would
    # fix them (the novelty UDF's version changes with every batch's reference set).
    canary, planted = first_ids[1], {"num_persons": 99, "uniqueness": 0.125}
    table.update(where=f"image_id = '{canary}'", values=planted)

    synthetic.write_batch(landing, "b2", 6, seed=4, **CURATED_SIZE)
    ingest.ingest_batches(conn, landing)
    table.checkout_latest()
    second_ids = [r["image_id"] for r in _frames(table) if r["image_id"] not in before]
    # Copies of an old frame (new vs old) and of a new frame (new vs new), plus one corrupt frame.
    copies = near_duplicate_rows(table, [(first_ids[3], 0.97, 50), (second_ids[0], 0.9, 90)], "b2dups")
    corrupt = dict(copies[0], image_id="corrupt-frame", image_bytes=damaged_inside(copies[0]["image_bytes"]),
                   source_file="images/corrupt-frame.jpg", ingest_seq=copies[-1]["ingest_seq"] + 1)
    append_rows(table, [*copies, corrupt])
    new_rows = table.count_rows() - len(before)
    run2 = curation.backfill_columns(table, config=config)
    canary_after = table.to_lance().to_table(columns=list(planted), filter=f"image_id = '{canary}'").to_pylist()[0]
    table.update(where=f"image_id = '{canary}'", values={c: before[canary][c] for c in planted})
    table.checkout_latest()
    return dict(table=table, conn=conn, run1=run1, run2=run2, before=before, new_rows=new_rows,
                canary_after=canary_after, first_ids=first_ids, second_ids=second_ids)


def test_columns_match_an_independent_computation(curated):
    for row in _frames(curated["table"]):
        persons = [b for c, b in zip(row["ann_categories"], row["ann_bboxes"]) if c in PERSON_CLASSES]
        assert row["has_person"] == bool(persons), row["image_id"]
        assert row["num_persons"] == len(persons)
        assert row["has_rider"] == ("rider" in row["ann_categories"])
        largest = max(((x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in persons), default=0.0)
        assert row["person_bbox_area_pct"] == pytest.approx(100 * largest / (row["width"] * row["height"]), rel=1e-5)
        if row["image_id"] == "corrupt-frame":
            continue
        grey = Image.open(io.BytesIO(row["image_bytes"])).convert("L").resize((9, 8), Image.Resampling.LANCZOS)
        pixels = np.asarray(grey, dtype=int)
        bits = "".join("1" if b else "0" for b in (pixels[:, 1:] > pixels[:, :-1]).flatten())
        # Same algorithm, full-resolution decode: a few bits may differ from the draft decode.
        assert bin(row["dhash"] ^ int(bits, 2)).count("1") <= 3, row["image_id"]
    frames = _frames(curated["table"])
    assert any(r["has_person"] for r in frames) and not all(r["has_person"] for r in frames)


def test_first_run_fills_every_row(curated):
    for name, stats in curated["run1"].items():
        assert stats.rows_processed == stats.rows_total == len(curated["before"]), name
        assert stats.coverage == 1.0 and stats.error_rows == 0, name
    jobs = {curated["run1"][c].job_id for c in curation.UDF_GROUPS["annotation_columns"]}
    assert len(jobs) == 1 and None not in jobs  # one Geneva job fills the whole group


def test_a_column_added_before_its_group_existed_is_rebuilt_with_the_group(tmp_path, local_ray, caplog):
    """Deployments from before `UDF_GROUPS` hold has_person as a column of its own UDF: the
    next run rebuilds the group whole (the values are recomputed from the annotations). The log
    holds no advice from Geneva to force a reprocess (`patches.geneva`, `geneva.where_advisory`)."""
    import geneva

    conn, _ = build_frames_table(tmp_path, [("b1", 3, 2)])
    table = conn.open_table(storage.FRAMES_TABLE)
    table.add_columns({"has_person": geneva.udf(curation_udfs.has_person, data_type=pa.bool_())})
    stats = curation.backfill_columns(table, ["num_persons"], curation.CurationConfig(concurrency=1))
    assert set(stats) == set(curation.UDF_GROUPS["annotation_columns"])
    assert all(s.coverage == 1.0 and s.rows_processed == 3 for s in stats.values())
    assert not [r for r in caplog.records if "where='1=1'" in r.getMessage()]
    for row in _frames(table):
        assert row["has_person"] == curation_udfs.has_person(row["ann_categories"])
        assert row["num_persons"] == curation_udfs.count_persons(row["ann_categories"])


def test_second_run_processes_only_new_rows(curated):
    table = curated["table"]
    for name, stats in curated["run2"].items():
        assert stats.rows_processed == curated["new_rows"] == 9, name
        assert stats.rows_total == len(curated["before"]) + 9
    assert curated["canary_after"] == {"num_persons": 99, "uniqueness": 0.125}  # the old row was not recomputed
    after = {r["image_id"]: r for r in _frames(table)}
    for image_id, old in curated["before"].items():  # old values never change
        assert {c: after[image_id][c] for c in curated["run1"]} == {c: old[c] for c in curated["run1"]}


def test_duplicates_caught_with_one_survivor_per_group(curated):
    frames = _frames(curated["table"])
    flagged = {r["image_id"] for r in frames if r["is_duplicate"]}
    copies = {r["image_id"] for r in frames if r["image_id"].startswith("copy-")}
    assert flagged == copies  # every copy caught, no distinct synthetic frame flagged
    originals = {curated["first_ids"][0], curated["first_ids"][3], curated["second_ids"][0]}
    assert all(not r["is_duplicate"] for r in frames if r["image_id"] in originals)
    outcome = curation_checks.check_duplicate_groups(curated["table"])
    assert outcome.passed, outcome.metadata
    hashes = np.array([r["dhash"] for r in frames if r["dhash"] is not None and r["image_id"] not in copies],
                      dtype=np.uint64)
    distances = curation_udfs.hamming(hashes[:, None], hashes[None, :])
    np.fill_diagonal(distances, 64)
    assert distances.min() > curation.CurationConfig().dup_threshold  # distinct frames stay distinct


def test_a_bad_row_is_recorded_not_fatal(curated):
    table, run2 = curated["table"], curated["run2"]
    corrupt = table.to_lance().to_table(columns=list(curation.COLUMNS), filter="image_id = 'corrupt-frame'")
    row = corrupt.to_pylist()[0]
    assert row["dhash"] is None and row["is_duplicate"] is None
    assert row["has_person"] is not None and row["person_bbox_area_pct"] is not None
    assert run2["dhash"].error_rows == 1 and run2["is_duplicate"].error_rows == 1
    assert run2["dhash"].errors[0]["image_id"] == "corrupt-frame"
    assert run2["dhash"].rows_filled == run2["dhash"].rows_total - 1
    coverage = curation_checks.check_coverage(table, "dhash")
    assert not coverage.passed and coverage.warn_only
    assert coverage.metadata["null_rows_with_recorded_error"] == 1
    assert curation_checks.check_coverage(table, "has_person").passed


def test_a_frame_that_does_not_decode_is_quarantined_once(curated):
    table, conn = curated["table"], curated["conn"]
    corrupt = table.to_lance().to_table(columns=["image_bytes", "batch_id"], filter="image_id = 'corrupt-frame'")
    assert image_checks.inspect_image(corrupt["image_bytes"][0].as_py())[0] == "jpeg"  # ingestion let it through
    assert ingest_checks.undecodable_frames(table) == ["corrupt-frame"]
    for _ in range(2):  # re-running never duplicates the record
        assert curation.quarantine_undecodable(conn, table) == 1
    records = conn.open_table(storage.QUARANTINE_TABLE).to_arrow().to_pylist()
    assert [(r["batch_id"], r["file"], r["reason"]) for r in records] == [
        (corrupt["batch_id"][0].as_py(), "images/corrupt-frame.jpg", "corrupt_image")]
    assert "Huffman table" in records[0]["detail"]


def test_checks_pass_on_the_curated_table(curated):
    table = curated["table"]
    for name in ("has_person", "has_rider", "num_persons"):
        assert curation_checks.check_annotation_consistency(table, name).passed
    assert curation_checks.check_area_range(table).passed


def test_checks_catch_wrong_values(curated, tmp_path):
    table = curated["table"]
    victim = curated["first_ids"][2]
    original = table.to_lance().to_table(columns=["has_person", "is_duplicate", "person_bbox_area_pct"],
                                         filter=f"image_id = '{victim}'").to_pylist()[0]
    try:
        table.update(where=f"image_id = '{victim}'", values={
            "has_person": not original["has_person"], "is_duplicate": True, "person_bbox_area_pct": 150.0})
        assert not curation_checks.check_annotation_consistency(table, "has_person").passed
        assert not curation_checks.check_area_range(table).passed
        assert not curation_checks.check_duplicate_groups(table).passed  # a flagged frame with no earlier twin
    finally:
        table.update(where=f"image_id = '{victim}'", values=original)


def test_source_is_recorded_and_never_mixed(curated, tmp_path):
    table = curated["table"]
    metadata = table.schema.field("person_bbox_area_pct").metadata
    assert metadata[curation.META_SOURCE.encode()] == b"annotations"
    assert curated["run2"]["person_bbox_area_pct"].params == {"source": "annotations", "crowd_boxes": "skipped"}
    checkpoint = tmp_path / "other.pt"
    checkpoint.write_bytes(b"weights")
    with pytest.raises(curation.CurationError, match="never mixes sources"):
        curation.backfill_columns(table, ["person_bbox_area_pct"],
                                  curation.CurationConfig(person_area_source=str(checkpoint)))


def test_auto_falls_back_to_annotations_without_cached_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    source = curation.resolve_person_area_source(curation.CurationConfig())
    assert (source.kind, source.label) == ("annotations", "annotations")
    with pytest.raises(FileNotFoundError, match="torch hub cache"):
        curation.resolve_person_area_source(curation.CurationConfig(person_area_source="coco"))


def test_bad_configuration_is_refused():
    with pytest.raises(curation.CurationError, match="unknown curation columns"):
        curation.ordered(["has_person", "nope"])
    with pytest.raises(curation.CurationError, match="dup_threshold"):
        curation.CurationConfig(dup_threshold=65)
    with pytest.raises(curation.CurationError, match="neither"):
        curation.resolve_person_area_source(curation.CurationConfig(person_area_source="/no/such/file.pt"))
    jobs = list(dict.fromkeys(curation.job_of(c) for c in curation.COLUMNS))  # three jobs in two waves
    assert curation.waves(jobs) == [["annotation_columns", "person_bbox_area_pct", "pixel_columns"], ["novelty_columns"]]


# --- detector path -------------------------------------------------------------------------


def _random_detector(path: Path, person_bias: float) -> Path:
    """A randomly initialised CPU-profile detector whose person logit is shifted by `person_bias`."""
    import torch

    from avperception_assets.model import detector

    torch.manual_seed(0)
    model = detector.build_detector(detector.get_profile("cpu"), detector.WEIGHTS_NONE)
    state = model.state_dict()
    state["roi_heads.box_predictor.cls_score.bias"][curation_udfs.COCO_PERSON_LABEL] += person_bias
    torch.save(state, path)
    return path


def _expected_pct(path: Path, jpegs: list[bytes], threshold: float) -> list[float]:
    """Independent reference: PIL decode, one image at a time."""
    import torch
    from torchvision.transforms.functional import pil_to_tensor

    from avperception_assets.model import detector

    model = detector.build_detector(detector.get_profile("cpu"), str(path)).eval()
    values = []
    for jpeg in jpegs:
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        with torch.inference_mode():
            out = model([pil_to_tensor(image).float() / 255])[0]
        keep = (out["labels"] == 1) & (out["scores"] >= threshold)
        areas = [(x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in out["boxes"][keep].tolist()]
        values.append(100 * max(areas, default=0.0) / (image.width * image.height))
    return values


def test_detector_udf_values_in_process(curated, tmp_path):
    jpegs = [r["image_bytes"] for r in _frames(curated["table"])[:3]]
    path = _random_detector(tmp_path / "random.pt", person_bias=8.0)
    for threshold in (0.3, 0.999999):
        udf = curation_udfs.PersonAreaDetector(str(path), "cpu", threshold, batch_size=2)
        got = udf(pa.array(jpegs, pa.large_binary())).to_pylist()
        expected = _expected_pct(path, jpegs, threshold)
        assert got == pytest.approx(expected, rel=1e-3, abs=1e-3)
        assert all(0 <= v <= 100 for v in got)
    assert any(v > 0 for v in _expected_pct(path, jpegs, 0.3))
    zero = curation_udfs.PersonAreaDetector(str(_random_detector(tmp_path / "plain.pt", 0.0)), "cpu", 0.5, 2)
    assert zero(pa.array(jpegs, pa.large_binary())).to_pylist() == [0.0, 0.0, 0.0]  # nothing detected


def test_detector_backfill_records_its_source(curated, tmp_path):
    frames = curated["table"].to_lance().to_table(columns=[f.name for f in storage.FRAMES_SCHEMA],
                                                  filter="batch_id = 'b1'", limit=4)
    conn = storage.connect(str(tmp_path / "lancedb"))
    table = storage.open_or_create(conn, storage.FRAMES_TABLE, storage.FRAMES_SCHEMA)
    table.add(frames)
    path = _random_detector(tmp_path / "random.pt", person_bias=8.0)
    config = curation.CurationConfig(person_area_source=str(path), detector_profile="cpu", score_threshold=0.3,
                                     concurrency=1)
    stats = curation.backfill_columns(table, ["person_bbox_area_pct"], config)["person_bbox_area_pct"]
    assert stats.rows_processed == 4 and stats.coverage == 1.0
    assert stats.params["source"].startswith("checkpoint:random.pt@")
    assert table.schema.field("person_bbox_area_pct").metadata[curation.META_SOURCE.encode()].decode() \
        == stats.params["source"]
    got = table.to_lance().to_table(columns=["image_bytes", "person_bbox_area_pct"]).to_pylist()
    expected = _expected_pct(path, [r["image_bytes"] for r in got], 0.3)
    assert [r["person_bbox_area_pct"] for r in got] == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert curation_checks.check_area_range(table).passed


def _error_table_exists(uri: Path) -> bool:
    return any(path.name.endswith("system$geneva_errors") for path in uri.iterdir())


class _Launched(Exception):
    pass


def test_the_error_table_exists_before_any_backfill_job_starts(tmp_path, local_ray, monkeypatch):
    """Every backfill's driver opens Geneva's error table and creates it when it is missing, so
    drivers started together on a fresh database raced to create it and one job failed (seen in
    CI). The state that prevents the race: the table exists before the first job is launched."""
    conn, _ = build_frames_table(tmp_path, [("b1", 2, 1)])
    table = conn.open_table(storage.FRAMES_TABLE)
    uri = tmp_path / "lancedb"
    assert not _error_table_exists(uri)  # a fresh database

    def launch(*args, **kwargs):
        raise _Launched(_error_table_exists(uri))

    monkeypatch.setattr(table, "backfill_async", launch)
    with pytest.raises(_Launched) as launched:
        curation.backfill_columns(table, ["has_person", "has_rider"], curation.CurationConfig(
            person_area_source="annotations"))
    assert launched.value.args == (True,)


@pytest.mark.fresh_interpreter
def test_plain_functions_never_start_ray(tmp_path):
    """Ray belongs to whoever runs the stage (the Dagster resource in runs): without one, a
    backfill and a view refresh fail with a message that says so, in a process with no Ray."""
    build_frames_table(tmp_path, [("b1", 2, 1)])
    probe = f"""
import ray
from avperception_assets.curation import columns as curation
from avperception_assets.failure_modes.registry import default_failure_modes
from avperception_assets.slices import views as slices
from avperception_assets.storage import tables as storage
conn = storage.connect({str(tmp_path / "lancedb")!r})
for call in (lambda: curation.backfill_columns(conn.open_table(storage.FRAMES_TABLE), ["has_person"]),
             lambda: slices.refresh_views(conn, slices.all_views(default_failure_modes()))):
    try:
        call()
    except RuntimeError as error:
        print(error)
print("ray started:", ray.is_initialized())
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("curation backfills run on Ray, and none is running"), result.stderr
    assert lines[1].startswith("view refreshes run on Ray, and none is running")
    assert lines[2] == "ray started: False"


def test_a_retried_bad_row_is_not_the_next_run_rows(curated):
    """The corrupt frame of batch 2 stays NULL and Geneva retries it in the next run; it is not
    that run's row, so the run's checks (which look at rows from `first_ingest_seq` on) do not
    report it again. Run last: it backfills the module's table once more."""
    table, run2 = curated["table"], curated["run2"]
    corrupt_seq = table.to_lance().to_table(columns=["ingest_seq"], filter="image_id = 'corrupt-frame'")[0][0].as_py()
    assert run2["dhash"].first_ingest_seq == min(r["ingest_seq"] for r in _frames(table)
                                                 if r["image_id"] not in curated["before"])
    assert curation_checks.check_coverage(table, "dhash", storage.rows_since(corrupt_seq)).warn_only
    run3 = curation.backfill_columns(table, ["dhash"], curation.CurationConfig(concurrency=1))
    assert run3["dhash"].rows_processed == 1 and run3["dhash"].first_ingest_seq is None
    assert run3["dhash"].as_metadata().get("first_ingest_seq") is None
