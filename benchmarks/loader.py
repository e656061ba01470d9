"""Throughput of the Permutation loader against a folder of JPEGs and the decode-only limit.

Same frames, one run: synthetic BDD-like 1280x720 JPEGs are landed on disk and ingested into a
Lance table, then three loaders yield decoded float images + COCO targets in batches:

- lance:   this project's loader (LanceDB Permutation, batched takes read ahead, decode in collate),
- folder:  a conventional Dataset reading each JPEG file from disk (labels parsed up front),
- decode:  decode_jpeg over bytes already in memory (no I/O at all): the upper limit.

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

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avperception_assets import ingest, loader, storage, synthetic  # noqa: E402
from targets import target  # noqa: E402

TO_FLOAT = loader.eval_transform()


def _sample(data: torch.Tensor, categories, boxes):
    image = decode_jpeg(data, mode=ImageReadMode.RGB)
    target = loader.coco_target(categories, boxes, image.shape[-1], image.shape[-2])
    return TO_FLOAT(image), target


def _collate_samples(samples):
    return [s[0] for s in samples], [s[1] for s in samples]


class FolderDataset(Dataset):
    """The conventional layout: one JPEG file per frame, labels loaded once from the label file."""

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
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        return _sample(data, categories, boxes)


class InMemoryDataset(Dataset):
    """Decode-only limit: JPEG bytes already in memory as tensors."""

    def __init__(self, rows):
        self.rows = [(torch.frombuffer(bytearray(r["image_bytes"]), dtype=torch.uint8),
                      r["ann_categories"], r["ann_bboxes"]) for r in rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return _sample(*self.rows[index])


def _dataloader(dataset, collate, batch_size, workers):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate, persistent_workers=bool(workers),
                      multiprocessing_context="spawn" if workers else None)


def _one_pass(batches) -> float:
    started, count = time.perf_counter(), 0
    for batch in batches:
        count += len(batch[0])
    return count / (time.perf_counter() - started)


def images_per_s(loaders: dict, passes: int) -> dict:
    """Median images/s of each loader; passes interleave the loaders so load drift hits all alike."""
    for batches in loaders.values():  # warm-up: worker start, page cache, allocator
        _one_pass(batches)
    rates = {name: [] for name in loaders}
    for _ in range(passes):
        for name, batches in loaders.items():
            rates[name].append(_one_pass(batches))
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
        ingest.ingest_batches(storage.connect(uri), root / "landing")
        view = loader.pin_view(uri, storage.FRAMES_TABLE)
        rows = loader.open_table(uri, storage.FRAMES_TABLE).to_arrow().to_pylist()
        print(f"{args.frames} frames 1280x720 JPEG, batch {args.batch_size}, median of {args.passes} passes")

        results = {}
        for workers in (0, 2):
            lance = _dataloader(loader.FramesDataset(loader.build_permutation(view)), loader.DecodeCollate(),
                                args.batch_size, workers)
            folder = _dataloader(FolderDataset(batch_dir), _collate_samples, args.batch_size, workers)
            decode = _dataloader(InMemoryDataset(rows), _collate_samples, args.batch_size, workers)
            measured = images_per_s({"lance": lance, "folder": folder, "decode": decode}, args.passes)
            for name, value in measured.items():
                results[name, workers] = value
                print(f"{name:>6} {workers} workers: {value:8.1f} images/s")

    print()
    targets = []
    for workers in (0, 2):
        vs_folder = results["lance", workers] / results["folder", workers]
        vs_decode = results["lance", workers] / results["decode", workers]
        print(f"{workers} workers: lance/folder {vs_folder:.2f}x, lance/decode-only {vs_decode:.2f}x")
        targets.append((f"lance_vs_folder_{workers}_workers", vs_folder, 1.0))
        targets.append((f"lance_vs_decode_only_{workers}_workers", vs_decode, 0.85))
    for name, measured, goal in targets:
        target(name, measured, ">=", goal, unit="x")


if __name__ == "__main__":
    main()
