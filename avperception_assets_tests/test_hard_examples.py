"""Hard-example mining on a real Lance table: scores incremental and keyed by model, weights from
difficulty and look-alikes, a weighted order that is deterministic, train-only and rebuilt by
`reproduce`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from avperception_assets.formats import taxonomy as bdd100k
from avperception_assets.model import checkpoints, detector, loader, training
from avperception_assets.model.recipe import Recipe
from avperception_assets.discovery import hard_examples
from avperception_assets.storage import tables as storage
from avperception_assets.discovery.vector_index import VECTOR_COLUMN

from .conftest import build_frames_table

PERSON = bdd100k.COCO_IDS["pedestrian"]
CLASSES = ("pedestrian",)


class Blind(torch.nn.Module):
    """Stands in for a starting model that finds nothing: a frame's difficulty is its number of
    persons (each one a miss). Counts the frames it is shown."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.shown = 0

    def forward(self, images):
        self.shown += len(images)
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
                for _ in images]


def _persons(conn) -> dict[str, int]:
    """Objects per frame that a pedestrian mode scores: COCO person (BDD pedestrians and riders)."""
    rows = conn.open_table(storage.FRAMES_TABLE).to_arrow().select(["image_id", "ann_categories"]).to_pylist()
    return {r["image_id"]: sum(bdd100k.COCO_IDS.get(c) == PERSON for c in r["ann_categories"]) for r in rows}


@pytest.fixture
def frames(tmp_path):
    """A frames table of 16 frames (train and val) with a unit embedding per frame."""
    conn, _ = build_frames_table(tmp_path, [("mine-a", 16, 4)])
    table = conn.open_table(storage.FRAMES_TABLE)
    ids = table.to_arrow()["image_id"].to_pylist()
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(ids), 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 8)
    table.to_lance().merge(pa.table({"image_id": ids, VECTOR_COLUMN: column}), "image_id")
    table.checkout_latest()
    return conn, str(tmp_path / "lancedb")


def _train_view(uri: str) -> loader.ViewRef:
    return loader.pin_view(uri, storage.FRAMES_TABLE, where="split = 'train'")


def test_scores_are_incremental_and_keyed_by_the_model(frames, tmp_path):
    conn, uri = frames
    view, model = _train_view(uri), Blind()
    first = hard_examples.score_view(conn, "night", view, CLASSES, model, "base-a@96x160")
    assert (first.scored, first.already_scored, model.shown) == (loader.count_rows(view), 0, loader.count_rows(view))
    again = hard_examples.score_view(conn, "night", view, CLASSES, model, "base-a@96x160")
    assert (again.scored, again.already_scored, again.version) == (0, first.scored, first.version)  # nothing to do

    more, _ = build_frames_table(tmp_path / "more", [("mine-b", 6, 9)])
    conn.open_table(storage.FRAMES_TABLE).add(more.open_table(storage.FRAMES_TABLE).to_arrow())
    grown, shown = _train_view(uri), model.shown
    new = hard_examples.score_view(conn, "night", grown, CLASSES, model, "base-a@96x160")
    assert new.scored == loader.count_rows(grown) - first.scored == model.shown - shown > 0  # only the new frames
    other = hard_examples.score_view(conn, "night", grown, CLASSES, model, "base-b@96x160")
    assert other.scored == loader.count_rows(grown)  # another starting model rescores the view

    scores = hard_examples.difficulties(uri, hard_examples.Mining(new.table, new.version, "base-a@96x160"))
    persons = _persons(conn)
    assert scores == {i: persons[i] for i in scores}  # every person missed, nothing else counted
    assert len(scores) == loader.count_rows(grown) and max(scores.values()) > 0 and min(scores.values()) == 0


def _mined(conn, uri, **settings) -> tuple[loader.ViewRef, hard_examples.Mining]:
    view = _train_view(uri)
    stats = hard_examples.score_view(conn, "night", view, CLASSES, Blind(), "blind")
    return view, hard_examples.Mining(stats.table, stats.version, "blind", **settings)


def test_weights_follow_difficulty_and_lift_the_look_alikes_of_the_hardest_frames(frames):
    conn, uri = frames
    view, plain = _mined(conn, uri, boost=2.0)
    difficulty = hard_examples.difficulties(uri, plain)
    assert hard_examples.frame_weights(view, plain) == {i: 1 + 2.0 * d for i, d in difficulty.items()}

    mined = hard_examples.Mining(plain.table, plain.version, "blind", boost=2.0, neighbors=2, query_fraction=0.01)
    weights = hard_examples.frame_weights(view, mined)
    rows = conn.open_table(storage.FRAMES_TABLE).to_arrow().to_pylist()
    vectors = {r["image_id"]: np.array(r[VECTOR_COLUMN]) for r in rows}
    train = [r["image_id"] for r in rows if r["split"] == "train"]
    hardest = max(train, key=lambda i: (difficulty[i], -train.index(i)))  # the one query (1% of the hard frames)
    assert difficulty[hardest] > 0
    nearest = sorted((i for i in train if i != hardest), key=lambda i: -vectors[i] @ vectors[hardest])[:2]
    for image_id in train:
        lift = 0.5 * 2.0 * difficulty[hardest] if image_id in nearest else 0.0
        assert weights[image_id] == pytest.approx(1 + 2.0 * difficulty[image_id] + lift), image_id
    assert set(weights) == set(train)  # val frames are never weighted, queried or returned


def test_the_weighted_order_is_deterministic_train_only_and_leans_to_hard_frames(frames):
    conn, uri = frames
    view, mining = _mined(conn, uri, boost=4.0)
    weights = hard_examples.frame_weights(view, mining)

    def order(seed):
        permutation = loader.build_permutation(view, seed, weights=weights)
        return permutation.__getitems__(list(range(permutation.num_rows))).column("image_id").to_pylist()

    first = order(7)
    assert first == order(7) and first != order(8) and len(first) == loader.count_rows(view)
    val = set(conn.open_table(storage.FRAMES_TABLE).to_arrow().filter(
        pa.compute.equal(pa.compute.field("split"), "val"))["image_id"].to_pylist())
    assert val and not set(first) & val
    difficulty = hard_examples.difficulties(uri, mining)
    hard_rows = sum(d > 0 for d in difficulty.values()) / len(difficulty)
    assert hard_examples.hard_share(first, uri, mining) > hard_rows


@pytest.mark.training
def test_a_mined_run_records_its_sampling_and_reproduce_rebuilds_it(frames, tmp_path):
    conn, uri = frames
    view, mining = _mined(conn, uri, boost=4.0, neighbors=2)
    profile = detector.get_profile("cpu", batch_size=2, max_steps_per_epoch=1, min_size=96, max_size=160, epochs=2,
                                   warmup_steps=0)
    recipe = Recipe.on(view, profile, seed=5, mining=mining.as_dict())
    weights, out = hard_examples.frame_weights(recipe.train, mining), tmp_path / "ckpt"
    held_out = loader.image_ids(recipe.selection)
    assert held_out and not set(held_out) & set(weights)  # the selection share is never weighted nor drawn
    metadata = training.train(recipe, out, sample_weights=weights, log=lambda _: None)
    assert metadata["mining"] == mining.as_dict() and checkpoints.read_sample_weights(out) == weights
    for epoch in (0, 1):
        seen = [i for batch in training.epoch_loader(recipe.train, profile, 5, epoch, weights=weights)
                for i in batch.image_ids]
        assert training.reproduce_order(out, epoch=epoch) == seen
    plain = Recipe.on(view, profile, seed=5)
    assert not plain.recorded_in(metadata)  # a mined run never resumes a plain one, nor the reverse

    # A mined folder of c618fc9 kept only the record: reproduce says how to rebuild the weights, which does it.
    (out / checkpoints.SAMPLE_WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="discovery.hard_examples weights"):
        training.reproduce_order(out, epoch=1)
    cli = subprocess.run([sys.executable, "-m", "avperception_assets.discovery.hard_examples", "weights", str(out)],
                         capture_output=True, text=True, check=True)
    assert f"{len(weights)} frames" in cli.stdout and checkpoints.read_sample_weights(out) == weights
    assert training.reproduce_order(out, epoch=1) == seen
