"""Throughput of the Permutation loader against a folder of JPEGs and the decode-only limit.

Same frames, one run: synthetic BDD-like 1280x720 JPEGs are landed on disk and ingested into a
Lance table; each loader below delivers batches of float [0, 1] images + COCO targets to the
consumer (the main process), and the time to get them there is what is measured:

- lance:  this project's loader over a Geneva materialized view of every frame, as training
          reads a slice: LanceDB Permutation over the view, each batch's image bytes taken from
          the frames table by stable row id (views hold no bytes), batched takes read ahead,
          the collate decodes (on a few threads when it runs in the main process), frames cross
          the process boundary as uint8 and `loader.model_inputs` makes them float in the
          consumer, as the training loop does;
- folder: a conventional Dataset reading each JPEG file from disk (labels parsed up front),
          decoding and returning float images per frame, as torchvision's detection references do;
- decode: the decode-only limit of this loader: its collate over frames already in memory.

Also printed, without a target: `lance_table`, the same loader over the frames table itself
(bytes in the rows read, one take per batch), which shows what the second take costs; and
`folder_bytes`, the same files handed to this loader's collate, which separates what reading
from Lance costs from what the collate and hand-off save.

Each runs with 0 and 2 spawned workers through the same DataLoader settings; figures are
steady-state (a warm-up pass first, persistent workers), medians of the timed passes.
Usage: python benchmarks/loader.py [--frames 160] [--batch-size 8] [--passes 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avperception_assets import patches  # noqa: E402

patches.apply_at_startup()  # an entry point that runs Geneva jobs: before lancedb and geneva are imported

from avperception_assets.cluster.ray import ray_context  # noqa: E402
from avperception_assets.ingest import frames as ingest
from avperception_assets.model import loader
from avperception_assets.slices import views as slices
from avperception_assets.storage import tables as storage
from avperception_assets import synthetic
from targets import target  # noqa: E402

TO_FLOAT = v2.ToDtype(torch.float32, scale=True)
CPU = torch.device("cpu")


def _collate_samples(samples):
    return [s[0] for s in samples], [s[1] for s in samples]


class FolderDataset(Dataset):
    """The conventional layout: one JPEG file per frame, labels loaded once from the label file,
    each frame decoded and made float in `__getitem__`."""

    def __init__(self, batch_dir: Path):
        self.items = []
        for split in ("train", "val"):
            label_file = batch_dir / "labels" / f"det_{split}.json"
            for record in json.loads(label_file.read_text()) if label_file.exists() else []:
                labels = record["labels"]
                self.items.append((batch_dir / "images" / "100k" / split / record["name"],
                                   [lab["category"] for lab in labels],
                                   [[lab["box2d"][k] for k in ("x1", "y1", "x2", "y2")] for lab in labels]))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, categories, boxes = self.items[index]
        image = decode_jpeg(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return TO_FLOAT(image), loader.coco_target(categories, boxes, image.shape[-1], image.shape[-2])


class FolderBytesDataset(FolderDataset):
    """The same files as Arrow batches for this project's collate: Lance versus files, all else equal."""

    def __getitems__(self, indices) -> pa.RecordBatch:
        items = [self.items[i] for i in indices]
        return pa.record_batch({
            "image_id": [path.stem for path, _, _ in items],
            "image_bytes": pa.array([path.read_bytes() for path, _, _ in items], pa.binary()),
            "ann_categories": [categories for _, categories, _ in items],
            "ann_bboxes": [boxes for _, _, boxes in items]})


class InMemoryDataset(Dataset):
    """Decode-only limit: this project's collate over frames already in memory (no I/O at all)."""

    def __init__(self, table: pa.Table):
        self.batch = table.select(loader.COLUMNS).combine_chunks().to_batches()[0]

    def __len__(self):
        return self.batch.num_rows

    def __getitems__(self, indices) -> pa.RecordBatch:
        return self.batch.take(pa.array(indices))


def _every_frame_view(conn, uri: str) -> loader.ViewRef:
    """A Geneva view of every frame, created and refreshed as the slice views are."""
    source = conn.open_table(storage.FRAMES_TABLE)
    view = slices.create_view(conn, source, "bdd100k_every_frame", "image_id IS NOT NULL")
    with ray_context():
        patches.geneva.release_job_tracker(view.refresh(src_version=source.version).job_id)
    return loader.pin_view(uri, "bdd100k_every_frame")


def _dataloader(dataset, collate, batch_size, workers):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate, persistent_workers=bool(workers),
                      multiprocessing_context="spawn" if workers else None)


def _one_pass(batches, uint8_frames: bool) -> float:
    """Images/s until every image of a pass is a float tensor in the consumer."""
    started, count = time.perf_counter(), 0
    for batch in batches:
        images = loader.model_inputs(batch[0], CPU) if uint8_frames else batch[0]
        count += len(images)
    return count / (time.perf_counter() - started)


def images_per_s(loaders: dict, passes: int) -> dict:
    """Median images/s of each (loader, uint8 frames); passes interleave the loaders so load drift hits all alike."""
    for batches, uint8_frames in loaders.values():  # warm-up: worker start, page cache, allocator
        _one_pass(batches, uint8_frames)
    rates = {name: [] for name in loaders}
    for _ in range(passes):
        for name, (batches, uint8_frames) in loaders.items():
            rates[name].append(_one_pass(batches, uint8_frames))
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # decoding is per image; workers give the parallelism

    with tempfile.TemporaryDirectory(prefix="avp-loader-bench-") as tmp:
        root = Path(tmp)
        batch_dir = synthetic.write_batch(root / "landing", "bench", args.frames, seed=1)
        uri = str(root / "lancedb")
        conn = storage.connect(uri)
        ingest.ingest_batches(conn, root / "landing")
        view, table = _every_frame_view(conn, uri), loader.pin_view(uri, storage.FRAMES_TABLE)
        frames = loader.open_table(uri, storage.FRAMES_TABLE).to_arrow()
        print(f"{args.frames} frames 1280x720 JPEG, batch {args.batch_size}, median of {args.passes} passes")

        results = {}
        for workers in (0, 2):
            collate = loader.DecodeCollate()
            loaders = {
                "lance": (loader.frames_dataset(view), collate, True),
                "lance_table": (loader.frames_dataset(table), collate, True),
                "folder": (FolderDataset(batch_dir), _collate_samples, False),
                "folder_bytes": (FolderBytesDataset(batch_dir), collate, True),
                "decode": (InMemoryDataset(frames), collate, True),
            }
            measured = images_per_s({name: (_dataloader(dataset, collate_fn, args.batch_size, workers), uint8)
                                     for name, (dataset, collate_fn, uint8) in loaders.items()}, args.passes)
            for name, value in measured.items():
                results[name, workers] = value
                print(f"{name:>12} {workers} workers: {value:8.1f} images/s")

    print()
    targets = []
    for workers in (0, 2):
        vs_folder = results["lance", workers] / results["folder", workers]
        vs_decode = results["lance", workers] / results["decode", workers]
        vs_files = results["lance", workers] / results["folder_bytes", workers]
        vs_table = results["lance", workers] / results["lance_table", workers]
        print(f"{workers} workers: lance/folder {vs_folder:.2f}x, lance/decode-only {vs_decode:.2f}x, "
              f"lance/folder_bytes {vs_files:.2f}x, view/table {vs_table:.2f}x (no target)")
        targets.append((f"lance_vs_folder_{workers}_workers", vs_folder, 1.0))
        targets.append((f"lance_vs_decode_only_{workers}_workers", vs_decode, 0.85))
    for name, measured, goal in targets:
        target(name, measured, ">=", goal, unit="x")


if __name__ == "__main__":
    main()
