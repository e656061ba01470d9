"""Clip draws: which frames of each footage clip a run trains on (every K-th, or the novel ones by
embedding), read from a real Lance table and a Geneva view, never from the selection share;
recorded in the checkpoint and checked by `reproduce`."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from avperception_assets import synthetic
from avperception_assets.ingest import frames as ingest
from avperception_assets.ingest.landing import READY_MARKER
from avperception_assets.model import checkpoints, clip_draws, detector, loader, selection, training
from avperception_assets.model.recipe import Recipe
from avperception_assets.storage import tables as storage

SIZE = {"width": 320, "height": 180}
CLIP_FRAMES = 6
DIM = 4
TINY = dict(batch_size=2, max_steps_per_epoch=2, min_size=96, max_size=160, epochs=1, log_every_steps=1,
            warmup_steps=0)
SELECTION_PCT = 45  # holds out two of the four clips (buckets 40 and 43), trains on two (65 and 74)


@dataclass(frozen=True)
class Footage:
    uri: str
    ingested: int  # the frames table's version before any embedding was written


@pytest.fixture(scope="module")
def footage(tmp_path_factory) -> Footage:
    """Four 6-frame clips (all train), six detection stills that carry a clip but no position in
    it, and four YOLO frames without a clip. Tests that need embeddings write them (`_with_embeddings`)."""
    root = tmp_path_factory.mktemp("draws")
    landing = root / "landing"
    synthetic.write_clip_batch(landing, "clips", 4, CLIP_FRAMES, seed=3, val_fraction=0.0, **SIZE)
    synthetic.write_batch(landing, "stills", 6, seed=2, **SIZE)
    _write_yolo_batch(landing / "plain", 4)
    conn = storage.connect(str(root / "lancedb"))
    ingest.ingest_batches(conn, landing)
    return Footage(str(root / "lancedb"), int(conn.open_table(storage.FRAMES_TABLE).version))


def _write_yolo_batch(batch_dir, count: int) -> None:
    """A YOLO batch of `count` train frames, a car in each: frames that belong to no clip."""
    (batch_dir / "labels" / "train").mkdir(parents=True)
    (batch_dir / "images" / "train").mkdir(parents=True)
    (batch_dir / "classes.txt").write_text("car\n")
    for number in range(count):
        Image.new("RGB", (SIZE["width"], SIZE["height"]), (40 * number, 90, 90)).save(
            batch_dir / "images" / "train" / f"plain{number}.jpg", format="JPEG")
        (batch_dir / "labels" / "train" / f"plain{number}.txt").write_text("0 0.5 0.5 0.3 0.3\n")
    (batch_dir / READY_MARKER).write_text("")


def _frames(uri: str) -> list[dict]:
    columns = ["image_id", "clip_id", "clip_frame_index"]
    return loader.open_table(uri, storage.FRAMES_TABLE).to_lance().to_table(columns=columns).to_pylist()


def _rotation(degrees: float) -> list[float]:
    angle = np.radians(degrees)
    return [float(np.cos(angle)), float(np.sin(angle)), 0.0, 0.0]


def _embeddings(rows: list[dict]) -> dict[str, list[float]]:
    """A unit vector per frame. The clips in id order: the first repeats one frame; the second
    turns by 20 degrees a frame (each step small, the drift large); the third jumps to a new scene
    at frame 3, then stays near it; the fourth repeats one frame too. Frames outside a clip's
    sequence get random vectors of their own."""
    x, y = np.eye(DIM)[0], np.eye(DIM)[1]
    jumping = [x, x, x, y, y + 0.1 * x, x + y]
    by_clip = [lambda i: x, lambda i: _rotation(20 * i), lambda i: jumping[i], lambda i: y]
    clips = sorted({r["clip_id"] for r in rows if r["clip_frame_index"] is not None})
    rng = np.random.default_rng(0)
    vectors = {}
    for r in rows:
        index = r["clip_frame_index"]
        vector = rng.normal(size=DIM) if index is None else np.asarray(by_clip[clips.index(r["clip_id"])](index))
        vectors[r["image_id"]] = (vector / np.linalg.norm(vector)).tolist()
    return vectors


# With T = 1 - cos(35 deg): frames 0, 2, 4 of the turning clip (each 40 degrees past the last
# drawn); 0, 3, 5 of the jumping clip; the first frame of each repeating clip.
NOVELTY = 1 - np.cos(np.radians(35))
DRAWN_BY_NOVELTY = [{0}, {0, 2, 4}, {0, 3, 5}, {0}]


def _with_embeddings(uri: str, vectors: dict[str, list[float] | None]) -> int:
    """Write `vectors` into the frames table's `embedding` column; returns the new version."""
    table = loader.open_table(uri, storage.FRAMES_TABLE)
    column = pa.array(list(vectors.values()), type=pa.list_(pa.float32(), DIM))
    dataset = table.to_lance()
    if clip_draws.EMBEDDING in dataset.schema.names:
        dataset.drop_columns([clip_draws.EMBEDDING])
        table.checkout_latest()
        dataset = table.to_lance()
    dataset.merge(pa.table({"image_id": list(vectors), clip_draws.EMBEDDING: column}), "image_id")
    table.checkout_latest()
    return int(table.version)


def _expected(rows: list[dict], drawn_of_clip) -> set[str]:
    """Every frame outside a clip's sequence, and the clip frames `drawn_of_clip(clip number, index)` keeps."""
    clips = sorted({r["clip_id"] for r in rows if r["clip_frame_index"] is not None})
    return {r["image_id"] for r in rows
            if r["clip_frame_index"] is None or drawn_of_clip(clips.index(r["clip_id"]), r["clip_frame_index"])}


def test_a_draw_is_validated_and_recorded_in_one_spelling(footage):
    assert clip_draws.parse("all") is None
    assert clip_draws.canonical(" stride:04") == "stride:4" and clip_draws.canonical("novelty:.25") == "novelty:0.25"
    for bad in ("every:3", "stride:0", "stride:2.5", "novelty:0", "novelty:2.5", "novelty:", "all:2", ""):
        with pytest.raises(ValueError, match="is none of 'all', 'stride:K'"):
            clip_draws.parse(bad)
    view = loader.pin_view(footage.uri, storage.FRAMES_TABLE)
    profile = detector.get_profile("cpu", **TINY)
    assert Recipe.on(view, profile, clip_draw="stride:03").clip_draw == "stride:3"
    with pytest.raises(ValueError, match="clip_draw 'novelty:3'"):
        Recipe.on(view, profile, clip_draw="novelty:3")

    from avperception_assets.defs.training_assets import BaseDetectorConfig, FineTuneConfig

    assert FineTuneConfig().clip_draw == "all" and BaseDetectorConfig(clip_draw="stride:2").clip_draw == "stride:2"
    with pytest.raises(ValueError, match="clip_draw 'stride:-1'"):
        FineTuneConfig(clip_draw="stride:-1")


def test_a_recipe_saved_before_clip_draws_loads_as_every_frame(footage):
    recipe = Recipe.on(loader.pin_view(footage.uri, storage.FRAMES_TABLE), detector.get_profile("cpu", **TINY))
    saved = recipe.as_dict()
    del saved["clip_draw"]
    assert Recipe.from_dict(saved) == recipe and recipe.clip_draw == "all" and recipe.train.draw is None
    assert recipe.recorded_in(saved)  # the folder resumes under today's default
    assert not recipe.replace(clip_draw="stride:2").recorded_in(saved)


def test_stride_draws_the_clip_frames_on_stride_and_every_other_frame(footage):
    rows = _frames(footage.uri)
    view = loader.pin_view(footage.uri, storage.FRAMES_TABLE)
    for step in (1, 2, 4):
        strided = loader.ViewRef(view.uri, view.name, view.version, draw=clip_draws.parse(f"stride:{step}"))
        drawn = loader.image_ids(strided)
        assert set(drawn) == _expected(rows, lambda clip, index: index % step == 0) and len(drawn) == len(set(drawn))
    assert sum(r["clip_id"] is None for r in rows) == 4 and sum(r["clip_frame_index"] is None for r in rows) == 10
    # A stride reads no embedding: the first version has none.
    stride = loader.ViewRef(footage.uri, storage.FRAMES_TABLE, footage.ingested, draw=clip_draws.parse("stride:2"))
    assert set(loader.image_ids(stride)) == _expected(rows, lambda clip, index: index % 2 == 0)


def test_novelty_draws_what_moved_on_from_the_last_frame_drawn_of_the_clip(footage, tmp_path):
    draw = clip_draws.parse(f"novelty:{NOVELTY}")
    with pytest.raises(ValueError, match="needs curation's 'embedding' column"):
        loader.image_ids(loader.ViewRef(footage.uri, storage.FRAMES_TABLE, footage.ingested, draw=draw))

    rows = _frames(footage.uri)
    vectors = _embeddings(rows)
    version = _with_embeddings(footage.uri, vectors)
    view = loader.ViewRef(footage.uri, storage.FRAMES_TABLE, version, draw=draw)
    drawn = loader.image_ids(view)
    assert set(drawn) == _expected(rows, lambda clip, index: index in DRAWN_BY_NOVELTY[clip])
    assert loader.image_ids(view) == drawn and loader.count_rows(view) == len(drawn)  # deterministic

    # The same frames whatever order the rows come in: each clip is taken in frame order.
    clip_rows = [r for r in rows if r["clip_frame_index"] is not None]
    order = np.random.default_rng(1).permutation(len(clip_rows))
    shuffled = [clip_rows[i] for i in order]
    keeps = draw.keeps([r["clip_id"] for r in shuffled], [r["clip_frame_index"] for r in shuffled],
                       np.array([vectors[r["image_id"]] for r in shuffled]))
    clip_ids = {r["image_id"] for r in clip_rows}
    assert {r["image_id"] for r, kept in zip(shuffled, keeps) if kept} == set(drawn) & clip_ids

    # A clip frame without its embedding is a clear error, not a silent keep.
    missing = {**vectors, clip_rows[0]["image_id"]: None}
    version = _with_embeddings(footage.uri, missing)
    with pytest.raises(ValueError, match="1 frames of bdd100k@.* have none"):
        loader.image_ids(loader.ViewRef(footage.uri, storage.FRAMES_TABLE, version, draw=draw))
    _with_embeddings(footage.uri, vectors)


def test_a_geneva_view_draws_by_the_frames_tables_embeddings(footage, tmp_path, local_ray):
    """A view holds no embeddings: the draw takes its clip frames' from the frames table."""
    from avperception_assets.patches import geneva as geneva_patches
    from avperception_assets.slices.views import create_view

    rows = _frames(footage.uri)
    version = _with_embeddings(footage.uri, _embeddings(rows))
    conn = storage.connect(footage.uri)
    source = conn.open_table(storage.FRAMES_TABLE)
    view = create_view(conn, source, "clips_train", "split = 'train'")
    geneva_patches.release_job_tracker(view.refresh(src_version=source.version, concurrency=1).job_id)
    pinned = loader.pin_view(footage.uri, "clips_train")
    draw = clip_draws.parse(f"novelty:{NOVELTY}")
    assert clip_draws.EMBEDDING not in view.schema.names
    on_view = loader.image_ids(loader.ViewRef(footage.uri, "clips_train", pinned.version, draw=draw))
    on_table = loader.image_ids(loader.ViewRef(footage.uri, storage.FRAMES_TABLE, version, "split = 'train'",
                                               draw=draw))
    assert sorted(on_view) == sorted(on_table)
    assert set(on_view) == _expected(rows, lambda clip, index: index in DRAWN_BY_NOVELTY[clip])


def test_the_selection_share_is_never_drawn(footage):
    view = loader.pin_view(footage.uri, storage.FRAMES_TABLE)
    profile = detector.get_profile("cpu", **TINY)
    plain = Recipe.on(view, profile, selection_pct=SELECTION_PCT)
    strided = plain.replace(clip_draw="stride:4")
    assert loader.image_ids(strided.selection) == loader.image_ids(plain.selection)
    held_out_clips = {r["clip_id"] for r in _frames(footage.uri) if r["image_id"] in loader.image_ids(plain.selection)}
    left_out = set(loader.image_ids(plain.train)) - set(loader.image_ids(strided.train))
    assert left_out and not {r["clip_id"] for r in _frames(footage.uri) if r["image_id"] in left_out} & held_out_clips


@pytest.mark.training
def test_a_run_records_its_draw_and_reproduce_rebuilds_and_checks_it(footage, tmp_path):
    view = loader.pin_view(footage.uri, storage.FRAMES_TABLE)
    profile = detector.get_profile("cpu", **TINY)
    recipe = Recipe.on(view, profile, weights="none", seed=1, selection_pct=SELECTION_PCT, clip_draw="stride:4")
    out = tmp_path / "ckpt"
    metadata = training.train(recipe, out, log=lambda _: None)

    rows = {r["image_id"]: r for r in _frames(footage.uri)}
    held_out = {i for i, r in rows.items() if selection.bucket(i, r["clip_id"]) < SELECTION_PCT}
    drawn = {i for i, r in rows.items() if i not in held_out
             and (r["clip_frame_index"] is None or r["clip_frame_index"] % 4 == 0)}
    saved = checkpoints.read_metadata(out)
    assert saved["clip_draw"] == "stride:4" and saved["train_rows"] == len(drawn)
    assert saved["frames_before_draw"] == len(rows) - len(held_out) > len(drawn)
    assert saved["drawn_frames_sha256"] == clip_draws.digest(sorted(drawn, reverse=True))
    summary = checkpoints.run_summary(metadata, out)
    assert (summary["clip_draw"], summary["frames_before_draw"], summary["frames_after_draw"]) == \
        ("stride:4", len(rows) - len(held_out), len(drawn))
    assert summary["dagster/row_count"] == len(rows)  # the view's rows: the retrain policy's measure

    order = training.reproduce_order(out, epoch=0)
    seen = [i for batch in training.epoch_loader(recipe.train, profile, 1, 0) for i in batch.image_ids]
    assert order == seen and set(order) == drawn
    assert set(training.selection_frames(out)) == held_out  # every held-out frame, off-stride ones too

    # A record the time-travelled view no longer gives: reproduce says so rather than print other frames.
    (out / checkpoints.METADATA_FILE).write_text(json.dumps({**saved, "clip_draw": "stride:3"}))
    with pytest.raises(training.DrawMismatch, match=r"'stride:3' now draws \d+ of \d+ frames .* recorded"):
        training.reproduce_order(out)
    (out / checkpoints.METADATA_FILE).write_text(json.dumps({**saved, "drawn_frames_sha256": "0" * 64}))
    cli = subprocess.run([sys.executable, "-m", "avperception_assets.model.training", "reproduce", str(out)],
                         capture_output=True, text=True)
    assert cli.returncode != 0 and "DrawMismatch" in cli.stderr and "(000000000000)" in cli.stderr

    # A folder from before draws were recorded reproduces unchecked, as every frame.
    before = {k: v for k, v in saved.items() if k not in ("clip_draw", "frames_before_draw", "drawn_frames_sha256")}
    (out / checkpoints.METADATA_FILE).write_text(json.dumps(before))
    assert set(training.reproduce_order(out)) == set(rows) - held_out
    assert checkpoints.run_summary(before, out)["frames_before_draw"] == before["train_rows"]
