"""Detection data loader over a LanceDB table or view, read through LanceDB's `Permutation`.

Rows are read straight from the view (selected columns, Arrow record batches, batched `take`s
read ahead in a background thread); views hold no image bytes, so the same background take
fetches a batch's bytes from the frames table by stable row id (`pixels`). JPEG bytes are
decoded in the collate step, so with workers the decoding runs in the worker processes. Frames
leave the loader as uint8 and become float only at the consumer (`model_inputs`, after the copy
to the device): a float frame is four times the bytes to move through worker shared memory and
over PCIe.

The permutation is pinned to one table version (its permutation table records `base_version`),
and its order is a seeded shuffle of the view's row ids at that version, so the same (view,
version, seed, epoch) always yields the same rows in the same order; that is what
`training.reproduce_order` relies on. A `ViewRef` with a `share` reads one side of the view's
rows split by the selection rule (`selection`): the frames a run trains on, or those held out
to choose its best epoch. The split happens where the row ids are read, so a batch costs the same.
A `ViewRef` with a `draw` (`clip_draws`) then keeps only the drawn frames of each footage clip,
before any order is made.

Labels are COCO category ids (`bdd100k.COCO_IDS`): pedestrian and rider are both COCO
"person" (1), and traffic sign, which COCO lacks, is COCO "stop sign" (13), the only sign
class a COCO head has. Boxes are clipped to the frame; boxes with no area after clipping are
dropped; frames without boxes stay in as negatives (empty targets). Crowd boxes (`ann_crowd`,
where the table has it) are ignore regions: never training targets, and in evaluation targets
COCO's `iscrowd`, so a detection on one is neither a hit nor a false positive and the region is
never a miss.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import lancedb
import numpy as np
import pyarrow as pa

from avperception_assets.formats.taxonomy import COCO_IDS
from avperception_assets.model.clip_draws import EMBEDDING, FRAME_INDEX, ClipDraw
from avperception_assets.model.selection import CLIP_ID, KEY_COLUMNS, Share
from avperception_assets.storage.decoding import decode, on_frame_threads
from avperception_assets.storage.pixels import PixelReader

COLUMNS = ["image_id", "image_bytes", "ann_categories", "ann_bboxes"]  # what the collate reads
CROWD = "ann_crowd"  # read too where the table has it (tables and views from before clips lack it)


def read_columns(table) -> list[str]:
    """The columns the collate reads from `table`: `COLUMNS`, and the crowd flags where it has them."""
    return COLUMNS + [CROWD] if CROWD in table.schema.names else list(COLUMNS)


@dataclass(frozen=True)
class ViewRef:
    """A table or view pinned to one version: what a training run saw."""

    uri: str
    name: str
    version: int
    where: str | None = None  # optional SQL filter, e.g. "split = 'train'" on the frames table
    share: Share | None = None  # one side of the rows split by the selection rule; None: every row
    draw: ClipDraw | None = None  # the frames of each clip drawn from those rows; None: every frame


def open_table(uri: str, name: str, version: int | None = None):
    """A plain LanceDB handle on `name` (at `version` when given)."""
    try:
        table = lancedb.connect(uri).open_table(name)
    except ValueError as exc:
        raise ValueError(f"table or view {name!r} does not exist in {uri}") from exc
    if version is not None:
        table.checkout(version)
    return table


def pin_view(uri: str, name: str, version: int | None = None, where: str | None = None) -> ViewRef:
    """Resolve `version` (default: the latest) so every later read sees the same rows."""
    table = open_table(uri, name, version)
    return ViewRef(uri=uri, name=name, version=int(table.version), where=where)


def count_rows(view: ViewRef) -> int:
    if view.share is None and view.draw is None:
        return open_table(view.uri, view.name, view.version).count_rows(view.where)
    return view_rows(view).num_rows


def view_rows(view: ViewRef, with_row_id: bool = False) -> pa.Table:
    """The image ids (and row ids) of the view's rows at its version: those its filter keeps,
    on its side of the selection rule when it has a `share`, drawn by its `draw` when it has one."""
    table = open_table(view.uri, view.name, view.version)
    names = table.schema.names
    columns = [c for c in KEY_COLUMNS if c in names] if view.share or view.draw else ["image_id"]
    if view.draw is not None and FRAME_INDEX in names:
        columns.append(FRAME_INDEX)
        if view.draw.needs_embeddings:
            columns = _embedding_columns(view, table, columns)
    rows = table.to_lance().to_table(columns=columns, filter=view.where, with_row_id=with_row_id)
    if view.share is not None:
        clips = rows[CLIP_ID].to_pylist() if CLIP_ID in rows.column_names else None
        rows = rows.filter(pa.array(view.share.keeps(rows["image_id"].to_pylist(), clips)))
    return rows if view.draw is None else _drawn(view, table, rows)


def _drawn(view: ViewRef, table, rows: pa.Table) -> pa.Table:
    """`rows` less the clip frames `view.draw` does not draw; frames without a clip or without a
    position in it are kept (all of them where the table has no clips)."""
    if FRAME_INDEX not in rows.column_names:
        return rows
    in_clip = np.asarray(rows[CLIP_ID].is_valid()) & np.asarray(rows[FRAME_INDEX].is_valid())
    clip_rows = rows.filter(pa.array(in_clip))
    if not clip_rows.num_rows:
        return rows
    vectors = _embeddings(view, table, clip_rows) if view.draw.needs_embeddings else None
    keep = np.ones(rows.num_rows, dtype=bool)
    keep[in_clip] = view.draw.keeps(clip_rows[CLIP_ID].to_pylist(), clip_rows[FRAME_INDEX].to_numpy(), vectors)
    return rows.filter(pa.array(keep))


def _embedding_columns(view: ViewRef, table, columns: list[str]) -> list[str]:
    """`columns` and what gives the rows' embeddings: the column itself on the frames table, the
    source row id on a view (which holds none; `_embeddings` takes them for the clip rows only)."""
    pixels = PixelReader.of(view.uri, table)
    if pixels.holds_bytes and EMBEDDING not in table.schema.names:
        raise ValueError(f"a {view.draw} draw needs curation's {EMBEDDING!r} column, which {view.name} lacks: "
                         f"materialize {EMBEDDING!r} first")
    return pixels.columns([*columns, EMBEDDING], EMBEDDING)


def _embeddings(view: ViewRef, table, clip_rows: pa.Table) -> np.ndarray:
    """The clip frames' embeddings, as `_embedding_columns` read them."""
    pixels = PixelReader.of(view.uri, table)
    column = pixels.attach(clip_rows.combine_chunks().to_batches()[0], EMBEDDING).column(EMBEDDING)
    if column.null_count:
        raise ValueError(f"a {view.draw} draw needs every clip frame's {EMBEDDING!r}; {column.null_count} frames "
                         f"of {view.name}@{view.version} have none: materialize {EMBEDDING!r} first")
    return np.asarray(column.flatten(), dtype=np.float32).reshape(len(column), -1)


def image_ids(view: ViewRef) -> list[str]:
    return view_rows(view)["image_id"].to_pylist()


def _reopen(uri: str, version: int, name: str):
    # Module-level so that the factory pickles into spawned workers.
    return open_table(uri, name, version)


# The permutation table layout LanceDB's reader expects (what `permutation_builder` writes).
_ORDER_SCHEMA = pa.schema([pa.field("row_id", pa.uint64()), pa.field("split_id", pa.uint64(), nullable=False)])


def row_order(view: ViewRef, seed: int | None = None, weights: Mapping[str, float] | None = None) -> pa.Table:
    """Row ids of `view` at its version (`view_rows`): in stored order, shuffled by `seed`, or,
    with `weights` (by image id), as many draws with replacement as rows, each row in proportion
    to its weight (hard-example mining), from a generator seeded by `seed`.

    Built here rather than with `lancedb.permutation.permutation_builder`, which panics on
    Geneva materialized views in lancedb 0.39 ("target schema is not superset of current
    schema"). `base_version` in the schema pins every read to the view's version.
    """
    rows = view_rows(view, with_row_id=True)
    row_ids = rows["_rowid"].to_numpy()
    if weights is not None:
        w = np.array([weights[i] for i in rows["image_id"].to_pylist()], dtype=np.float64)
        row_ids = row_ids[np.random.default_rng(seed).choice(len(w), size=len(w), replace=True, p=w / w.sum())]
    elif seed is not None:
        row_ids = np.random.default_rng(seed).permutation(row_ids)
    schema = _ORDER_SCHEMA.with_metadata({b"base_version": str(view.version).encode()})
    return pa.table({"row_id": row_ids.astype(np.uint64), "split_id": np.zeros(len(row_ids), np.uint64)}, schema=schema)


def build_permutation(view: ViewRef, seed: int | None = None, columns=("image_id",),
                      weights: Mapping[str, float] | None = None, shard: tuple[int, int] = (0, 1)):
    """The rows of `view` as a `Permutation` of Arrow batches of `columns`, shuffled by `seed`
    (None: stored order), drawn by `weights` when given (`row_order`). `shard` (rank, world
    size): every world-size-th position of that order from the rank's, so each position goes
    to exactly one process of a distributed run."""
    from lancedb.permutation import Permutation

    table = open_table(view.uri, view.name, view.version)
    rank, world = shard
    order = lancedb.connect("memory://").create_table("order", row_order(view, seed, weights)[rank::world])
    return (
        Permutation.from_tables(table, order)
        .select_columns(list(columns))
        .with_format("arrow")
        .with_connection_factory(functools.partial(_reopen, view.uri, view.version))
    )


def frames_dataset(view: ViewRef, seed: int | None = None, weights: Mapping[str, float] | None = None,
                   shard: tuple[int, int] = (0, 1)) -> FramesDataset:
    """The loader's Dataset over `view`: its rows in the permutation's order, with their pixels."""
    table = open_table(view.uri, view.name, view.version)
    pixels = PixelReader.of(view.uri, table)
    return FramesDataset(build_permutation(view, seed, pixels.columns(read_columns(table)), weights, shard), pixels)


class Batch(NamedTuple):
    images: list  # uint8 CHW tensors (`model_inputs` makes them float in [0, 1] on a device)
    targets: list  # dicts with boxes (N, 4) xyxy float32 and labels (N,) int64 COCO ids
    image_ids: list[str]


class FramesDataset:
    """A map-style torch Dataset whose batched `__getitems__` is one Permutation take (and, for a
    view, one take of the rows' image bytes from the frames table).

    Only the Permutation and the PixelReader travel to workers; both reopen their tables lazily
    there, so the dataset is safe under the `spawn` start method.

    The DataLoader asks for the permutation in order (the shuffle is the permutation's), so
    each process can predict its next batches: the following one with no workers, every
    `num_workers`-th one in a worker. While a batch is decoded, a background thread takes the
    next `read_ahead` batches in one take (Lance releases the GIL); a request that does not match
    the prediction is taken directly, so the rows returned are always exactly the requested ones.
    """

    def __init__(self, permutation, pixels: PixelReader, read_ahead: int = 4):
        self.permutation = permutation
        self.pixels = pixels
        self.read_ahead = read_ahead
        self._len = permutation.num_rows
        self._executor = None  # created lazily per process, never pickled
        self._ahead: dict[tuple[int, ...], tuple] = {}  # offsets -> (future of a chunk, slice start)

    def __getstate__(self) -> dict:
        return {"permutation": self.permutation, "pixels": self.pixels, "read_ahead": self.read_ahead,
                "_len": self._len}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _executor=None, _ahead={})

    def __len__(self) -> int:
        return self._len

    def __getitems__(self, indices: list[int]) -> pa.RecordBatch:
        offsets = tuple(indices)
        hit = self._ahead.pop(offsets, None)
        if hit is None:
            self._ahead.clear()  # the prediction failed: drop it rather than keep stale takes
            batch = self._submit(list(offsets)).result()
        else:
            future, start = hit
            batch = future.result().slice(start, len(offsets))
        if not self._ahead:
            self._read_ahead(offsets)
        return batch

    def __getitem__(self, index: int) -> pa.RecordBatch:
        return self._submit([index]).result()

    def _submit(self, offsets: list[int]):
        # One thread runs every take, so takes never race on the Permutation's lazy reopen.
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="frames-take")
        return self._executor.submit(self._take, offsets)

    def _take(self, offsets: list[int]) -> pa.RecordBatch:
        return self.pixels.attach(self.permutation.__getitems__(offsets))

    def _read_ahead(self, offsets: tuple[int, ...]) -> None:
        """Start one take of the batches this process will be asked for after `offsets`."""
        batches = _next_batches(offsets, self._len, self.read_ahead)
        if not batches:
            return
        future = self._submit([i for batch in batches for i in batch])
        start = 0
        for batch in batches:
            self._ahead[batch] = (future, start)
            start += len(batch)


def _next_batches(offsets: tuple[int, ...], length: int, count: int) -> list[tuple[int, ...]]:
    """The next `count` batches of this process after the contiguous run `offsets`.

    Batches are consecutive runs of the same size, handed round-robin to the workers; anything
    else (a custom sampler) gets no prediction.
    """
    from torch.utils.data import get_worker_info

    if not offsets or offsets != tuple(range(offsets[0], offsets[0] + len(offsets))):
        return []
    info = get_worker_info()
    stride = len(offsets) * (info.num_workers if info else 1)
    batches = []
    for step in range(1, count + 1):
        first = offsets[0] + step * stride
        batch = tuple(range(first, min(first + len(offsets), length)))
        if not batch:
            break
        batches.append(batch)
    return batches


class TargetBox(NamedTuple):
    index: int  # the box's position in the frame's `ann_*` lists
    label: int  # COCO id
    box: list[float]  # x1, y1, x2, y2, clipped to the frame
    crowd: bool


def target_boxes(categories, boxes, width: int, height: int, crowd=None, *,
                 ignore_regions: bool = True) -> list[TargetBox]:
    """The boxes of one frame that its target keeps, in the target's order (`coco_target`)."""
    boxes = boxes or []
    crowd = crowd or [False] * len(boxes)
    kept = []
    for index, (category, box, is_crowd) in enumerate(zip(categories or [], boxes, crowd)):
        label = COCO_IDS.get(category)
        if label is None or box is None or len(box) != 4 or (is_crowd and not ignore_regions):
            continue
        x1, y1, x2, y2 = (float(v) for v in box)
        x1, x2 = max(0.0, min(x1, width)), max(0.0, min(x2, width))
        y1, y2 = max(0.0, min(y1, height)), max(0.0, min(y2, height))
        if x2 - x1 < 1.0 or y2 - y1 < 1.0:
            continue
        kept.append(TargetBox(index, label, [x1, y1, x2, y2], bool(is_crowd)))
    return kept


def coco_target(categories, boxes, width: int, height: int, crowd=None, *, ignore_regions: bool = True) -> dict:
    """COCO-id labels and clipped, non-degenerate xyxy boxes for one frame. Boxes `crowd` flags
    (None: no flags) are ignore regions: `iscrowd` 1 in the target (which has `iscrowd` only when
    the frame has one), or left out with `ignore_regions` False (a training target)."""
    import torch

    kept = target_boxes(categories, boxes, width, height, crowd, ignore_regions=ignore_regions)
    kept_boxes, labels, kept_crowd = [k.box for k in kept], [k.label for k in kept], [int(k.crowd) for k in kept]
    target = {
        "boxes": torch.tensor(kept_boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    if any(kept_crowd):
        target["iscrowd"] = torch.tensor(kept_crowd, dtype=torch.int64)
    return target


def train_transform(min_size: int, max_size: int, crop: int | None = None):
    """Box-aware augmentation on uint8 frames: resize to the network size (or, with `crop`, a
    full-resolution crop of that size around an object, which the network takes as it is when
    `crop` is its `min_size`), flip, photometric jitter."""
    from torchvision.transforms import v2

    from avperception_assets.model.tiling import ObjectCrop

    return v2.Compose([
        v2.Resize(min_size, max_size=max_size, antialias=True) if crop is None else ObjectCrop(crop),
        v2.RandomHorizontalFlip(p=0.5),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
        v2.SanitizeBoundingBoxes(min_size=1.0),
    ])


def model_inputs(images, device) -> list:
    """uint8 frames as the float [0, 1] tensors a detector takes, cast on `device` after the copy
    (frames already float are only moved).

    On the CPU the casts run on the frame threads: each writes a fresh float frame, and the
    page faults of one run while another is being filled."""
    import torch

    def to_float(image):
        image = image.to(device, non_blocking=True)
        return image if image.is_floating_point() else image.float().div_(255)

    if torch.device(device).type == "cpu":
        return on_frame_threads(to_float, images)
    return [to_float(image) for image in images]


def decode_all(column) -> list:
    """Decode a batch's frames: on a few threads in the main process (torchvision's decoders
    release the GIL), one after another in a worker, which is already one process per core."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is not None:
        return [decode(data) for data in column]
    return on_frame_threads(decode, column)


class DecodeCollate:
    """Collate an Arrow record batch into a `Batch`: decode, map labels, transform.

    With no transform (evaluation) nothing moves the boxes, so the decoded frame and plain target
    tensors are returned as they are; a given transform gets the box-aware v2 inputs. Transforms
    run one frame after another, so a seeded augmentation draws the same numbers every time.
    """

    def __init__(self, transform=None):
        self.transform = transform

    def __call__(self, batch: pa.RecordBatch) -> Batch:
        sample = self._eval_sample if self.transform is None else self._augmented_sample
        crowd = batch.column(CROWD).to_pylist() if CROWD in batch.schema.names else [None] * batch.num_rows
        rows = zip(decode_all(batch.column("image_bytes")), batch.column("ann_categories").to_pylist(),
                   batch.column("ann_bboxes").to_pylist(), crowd)
        images, targets = zip(*(sample(*row) for row in rows)) if batch.num_rows else ((), ())
        return Batch(list(images), list(targets), batch.column("image_id").to_pylist())

    @staticmethod
    def _eval_sample(image, categories, boxes, crowd) -> tuple:
        return image, coco_target(categories, boxes, image.shape[-1], image.shape[-2], crowd)

    def _augmented_sample(self, image, categories, boxes, crowd) -> tuple:
        import torch
        from torchvision import tv_tensors

        image = tv_tensors.Image(image)
        height, width = image.shape[-2:]
        target = coco_target(categories, boxes, width, height, crowd, ignore_regions=False)
        target["boxes"] = tv_tensors.BoundingBoxes(
            target["boxes"], format="XYXY", canvas_size=(height, width))
        image, target = self.transform(image, target)
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor)
        return image.as_subclass(torch.Tensor), target


def make_loader(view: ViewRef, *, batch_size: int, seed: int | None = None, epoch: int = 0,
                transform=None, num_workers: int = 0, drop_last: bool = False, pin_memory: bool = False,
                weights: Mapping[str, float] | None = None, shard: tuple[int, int] = (0, 1)):
    """A DataLoader over `view` in a deterministic order.

    seed None: the view's stored order; otherwise a LanceDB shuffle seeded by seed + epoch, so
    each epoch has its own order and any epoch can be rebuilt exactly; with `weights` (by image
    id) the epoch's rows are drawn in proportion to them, seeded the same way; `shard` keeps a
    distributed rank's positions of that order. Workers are started with `spawn` (Lance's Rust
    runtime is not fork-safe).
    """
    import torch
    from torch.utils.data import DataLoader

    dataset = frames_dataset(view, None if seed is None else seed + epoch, weights, shard)
    generator = torch.Generator().manual_seed(0 if seed is None else seed + epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,  # the order is the permutation's
        drop_last=drop_last,
        num_workers=num_workers,
        multiprocessing_context="spawn" if num_workers else None,
        collate_fn=DecodeCollate(transform),
        generator=generator,  # seeds the workers' augmentation
        pin_memory=pin_memory,
    )
