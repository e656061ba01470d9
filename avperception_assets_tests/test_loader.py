"""The Permutation loader: rows, labels, boxes and order exactly as in the view; augmentation."""

from __future__ import annotations

import dataclasses
import multiprocessing
import pickle

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from avperception_assets.model import loader, selection
from avperception_assets.storage import tables as storage
from avperception_assets.formats.taxonomy import COCO_IDS
from avperception_assets.storage.decoding import decode
from avperception_assets.storage.pixels import PixelReader

from .conftest import build_frames_table


@pytest.fixture(scope="module")
def frames_uri(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("loader")
    build_frames_table(root, [("loader-a", 14, 3)])
    return str(root / "lancedb")


def expected_rows(uri: str, name: str = storage.FRAMES_TABLE) -> dict[str, dict]:
    """image_id -> COCO labels and boxes, computed straight from the stored columns."""
    rows = loader.open_table(uri, name).to_arrow().to_pylist()
    expected = {}
    for row in rows:
        pairs = [(COCO_IDS[c], b) for c, b in zip(row["ann_categories"], row["ann_bboxes"])
                 if c in COCO_IDS and b[2] > b[0] and b[3] > b[1]]
        expected[row["image_id"]] = {"labels": [p[0] for p in pairs], "boxes": [p[1] for p in pairs],
                                     "size": (row["height"], row["width"]), "bytes": row["image_bytes"]}
    return expected


def _direct_order(view, seed: int) -> list[str]:
    return loader.build_permutation(view, seed=seed).__getitems__(list(range(loader.count_rows(view)))).column(
        "image_id").to_pylist()


# Two workers are spawned interpreters (seconds of imports each): a fresh_interpreter test.
@pytest.mark.parametrize("num_workers, seed", [(0, None), pytest.param(2, 5, marks=pytest.mark.fresh_interpreter)])
def test_batches_equal_the_view_rows(frames_uri, num_workers, seed):
    """Every row once with its pixels and labels: in the stored order without a seed, in the
    seeded permutation's order with one (spawned workers and their read-aheads included)."""
    view = loader.pin_view(frames_uri, storage.FRAMES_TABLE)
    batches = loader.make_loader(view, batch_size=3, seed=seed, num_workers=num_workers)  # several read-aheads
    if num_workers:
        assert batches.multiprocessing_context.get_start_method() == "spawn"
    expected = expected_rows(frames_uri)
    stored_order = loader.open_table(frames_uri, storage.FRAMES_TABLE).to_arrow().column("image_id").to_pylist()
    seen = []
    for batch in batches:
        assert len(batch.images) == len(batch.targets) == len(batch.image_ids) <= 3
        for image, target, image_id in zip(*batch):
            want = expected[image_id]
            assert image.dtype == torch.uint8 and tuple(image.shape[-2:]) == want["size"]
            assert torch.equal(image, decode(want["bytes"]))
            assert target["labels"].tolist() == want["labels"]
            assert torch.allclose(target["boxes"], torch.tensor(want["boxes"]).reshape(-1, 4))
            seen.append(image_id)
    assert seen == (stored_order if seed is None else _direct_order(view, seed))


def test_read_ahead_yields_the_rows_of_a_direct_take(frames_uri):
    view = loader.pin_view(frames_uri, storage.FRAMES_TABLE)
    batches = loader.make_loader(view, batch_size=3, seed=5)  # several read-aheads
    assert [i for b in batches for i in b.image_ids] == _direct_order(view, 5)


def test_unpredicted_requests_are_taken_directly(frames_uri):
    permutation = loader.build_permutation(loader.pin_view(frames_uri, storage.FRAMES_TABLE), 2, loader.COLUMNS)
    reader = PixelReader.of(frames_uri, loader.open_table(frames_uri, storage.FRAMES_TABLE))
    dataset = loader.FramesDataset(permutation, reader, read_ahead=2)
    for indices in ([4, 5], [6, 7], [8, 9], [0, 1], [9, 3], [10, 11], [12, 13], [len(dataset) - 1]):
        assert dataset.__getitems__(indices).to_pylist() == permutation.__getitems__(indices).to_pylist()
    assert pickle.loads(pickle.dumps(dataset))._executor is None  # the take thread stays in its process


def test_evaluation_collate_matches_the_box_aware_path(frames_uri):
    view = loader.pin_view(frames_uri, storage.FRAMES_TABLE)
    batch = loader.build_permutation(view, columns=loader.COLUMNS).__getitems__([0, 1, 2])
    fast, box_aware = loader.DecodeCollate()(batch), loader.DecodeCollate(v2.Identity())(batch)
    assert fast.image_ids == box_aware.image_ids
    for (image, target), (other_image, other) in zip(zip(fast.images, fast.targets),
                                                     zip(box_aware.images, box_aware.targets)):
        assert type(image) is type(target["boxes"]) is torch.Tensor
        assert torch.equal(image, other_image) and torch.equal(target["boxes"], other["boxes"])
        assert torch.equal(target["labels"], other["labels"])


def test_seeded_order_is_deterministic_per_epoch(frames_uri):
    view = loader.pin_view(frames_uri, storage.FRAMES_TABLE)

    def order(seed, epoch):
        return [i for b in loader.make_loader(view, batch_size=5, seed=seed, epoch=epoch) for i in b.image_ids]

    first = order(7, 0)
    assert order(7, 0) == first
    assert order(7, 1) != first and sorted(order(7, 1)) == sorted(first)
    assert sorted(first) == sorted(expected_rows(frames_uri))


def test_filter_selects_rows(frames_uri):
    view = loader.pin_view(frames_uri, storage.FRAMES_TABLE, where="split = 'val'")
    table = loader.open_table(frames_uri, storage.FRAMES_TABLE).to_arrow().to_pylist()
    val_ids = sorted(r["image_id"] for r in table if r["split"] == "val")
    ids = [i for b in loader.make_loader(view, batch_size=4, seed=1) for i in b.image_ids]
    assert sorted(ids) == val_ids and loader.count_rows(view) == len(val_ids)


def test_a_share_splits_a_view_by_clip_else_image_id(frames_uri, tmp_path):
    """A view's training rows and its selection share are one each of every row, read without
    a view of their own; frames of one clip go together, a frame without a clip by its image id."""
    frames = loader.open_table(frames_uri, storage.FRAMES_TABLE).to_arrow()
    clips = ["clip-a"] * 5 + ["clip-c"] * 5 + [None] * (frames.num_rows - 10)
    db = storage.connect(str(tmp_path))
    column = frames.schema.get_field_index(selection.CLIP_ID)  # each ingested frame its own clip: replaced
    db.create_table("clips", frames.set_column(column, selection.CLIP_ID, pa.array(clips, pa.string())))
    base = loader.pin_view(str(tmp_path), "clips", where="split = 'train'")
    picked, trained = (dataclasses.replace(base, share=selection.Share(50, held_out=side)) for side in (True, False))
    ids = {side: [i for b in loader.make_loader(view, batch_size=4, seed=2) for i in b.image_ids]
           for side, view in ((True, picked), (False, trained))}
    train_rows = frames.filter(pc.equal(frames["split"], "train")).to_pylist()
    assert sorted(ids[True] + ids[False]) == sorted(r["image_id"] for r in train_rows)
    assert (loader.count_rows(picked), loader.count_rows(trained)) == (len(ids[True]), len(ids[False]))
    assert ids[True] and ids[False]
    for n, row in enumerate(frames.to_pylist()):
        if row["split"] != "train":
            continue
        key = clips[n] or row["image_id"]
        assert (row["image_id"] in ids[True]) == (selection.bucket(key) < 50)
    assert loader.image_ids(picked) == [i for i in loader.image_ids(base) if i in set(ids[True])]


def test_degenerate_boxes_dropped_negatives_kept_signs_mapped(frames_uri, tmp_path):
    rows = loader.open_table(frames_uri, storage.FRAMES_TABLE).to_arrow().slice(0, 2).to_pylist()
    rows[0].update(ann_categories=[], ann_bboxes=[], ann_occluded=[], ann_truncated=[])
    rows[1].update(
        ann_categories=["traffic sign", "car", "pedestrian", "rider"],
        ann_bboxes=[[10, 10, 60, 40], [100, 100, 100, 150], [1200, 600, 1400, 800], [5, 5, 5.5, 90]],
        ann_occluded=[False] * 4, ann_truncated=[False] * 4)
    db = storage.connect(str(tmp_path))
    db.create_table("edge", pa.Table.from_pylist(rows, schema=storage.FRAMES_SCHEMA))
    view = loader.pin_view(str(tmp_path), "edge")
    (batch,) = list(loader.make_loader(view, batch_size=2))
    by_id = dict(zip(batch.image_ids, batch.targets))
    negative, edge = by_id[rows[0]["image_id"]], by_id[rows[1]["image_id"]]
    assert negative["boxes"].shape == (0, 4) and negative["labels"].numel() == 0
    assert edge["labels"].tolist() == [13, 1]  # sign -> COCO stop sign; zero-width car and rider dropped
    assert edge["boxes"].tolist() == [[10, 10, 60, 40], [1200, 600, 1280, 720]]  # clipped to the frame


def test_model_inputs_are_float_frames_in_unit_range():
    frame = torch.tensor([[[0, 51, 255]]], dtype=torch.uint8)
    (model_input,) = loader.model_inputs([frame], torch.device("cpu"))
    assert model_input.dtype == torch.float32 and model_input.flatten().tolist() == pytest.approx([0.0, 0.2, 1.0])
    assert frame.tolist() == [[[0, 51, 255]]]  # the loader's frame is left as it was


def _cast_in_child(frames) -> None:
    converted = loader.model_inputs(frames, torch.device("cpu"))
    raise SystemExit(0 if all(image.dtype == torch.float32 for image in converted) else 1)


def test_model_inputs_work_in_a_forked_child():
    frames = [torch.full((3, 8, 8), 255, dtype=torch.uint8)] * 3
    loader.model_inputs(frames, torch.device("cpu"))  # the parent's frame threads exist now
    child = multiprocessing.get_context("fork").Process(target=_cast_in_child, args=(frames,), daemon=True)
    child.start()
    child.join(timeout=60)
    if child.is_alive():  # hung: a pool inherited without its threads never runs the casts
        child.kill()
    assert child.exitcode == 0


def _bright_box(image: torch.Tensor) -> list[float]:
    """Bounding box of the pixels brighter than the dark background."""
    ys, xs = torch.nonzero(image.float().mean(0) > 0.3 * 255, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_augmentation_moves_boxes_with_the_image():
    image = torch.zeros(3, 360, 640, dtype=torch.uint8)
    image[:, 100:220, 40:100] = 230  # an object near the left edge
    box = [40.0, 100.0, 100.0, 220.0]
    transform = loader.train_transform(180, 320)
    flipped = 0
    for seed in range(8):
        torch.manual_seed(seed)
        target = {"boxes": tv_tensors.BoundingBoxes([box], format="XYXY", canvas_size=(360, 640)),
                  "labels": torch.tensor([1])}
        out_image, out_target = transform(tv_tensors.Image(image), target)
        assert out_image.shape[-2:] == (180, 320) and out_image.dtype == torch.uint8
        moved = out_target["boxes"][0].tolist()
        assert moved == pytest.approx(_bright_box(out_image), abs=1.5)
        flipped += moved[0] > 160  # flipped to the right half
    assert 0 < flipped < 8  # both outcomes of the random flip were exercised


def test_crops_hold_an_object_at_full_resolution():
    image = torch.zeros(3, 360, 640, dtype=torch.uint8)
    image[:, 200:240, 500:515] = 230  # a small object far from the crop a fixed corner would take
    transform = loader.train_transform(128, 228, crop=128)
    for seed in range(8):
        torch.manual_seed(seed)
        target = {"boxes": tv_tensors.BoundingBoxes([[500.0, 200.0, 515.0, 240.0]], format="XYXY",
                                                    canvas_size=(360, 640)), "labels": torch.tensor([1])}
        out_image, out_target = transform(tv_tensors.Image(image), target)
        assert out_image.shape[-2:] == (128, 128)
        x1, y1, x2, y2 = out_target["boxes"][0].tolist()
        assert [x1, y1, x2, y2] == _bright_box(out_image) and (x2 - x1, y2 - y1) == (15, 40)  # whole, unscaled
    empty = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(360, 640)),
             "labels": torch.zeros(0, dtype=torch.int64)}
    assert transform(tv_tensors.Image(image), empty)[0].shape[-2:] == (128, 128)


def test_missing_view_is_a_clear_error(frames_uri):
    with pytest.raises(ValueError, match="does not exist"):
        loader.pin_view(frames_uri, "bdd100k_nothing_train")
