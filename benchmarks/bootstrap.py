"""A report's bootstrap intervals: 1,000 resamples of 1,000 frames, from stored matches.

Builds stored matches as `<mode>_eval_frames` holds them, for two models on 1,000 synthetic
1280x720 frames of 3 classes (person, bicycle, motorcycle: rider's): about 3 objects a frame,
each found by the model with its own probability, plus false positives, about 5-10 detections
a frame. The matching (`frame_errors.match_frame`, not timed against the goal) is written to a
LanceDB table and read back; then timed: reading the matches out of the stored rows, and the
intervals (both models' AP@0.5, AP@[.5:.95] and recall@IoU 0.5, and the paired delta).
Target: the intervals in at most 10 s.

    .venv/bin/python benchmarks/bootstrap.py [--frames 1000] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from avperception_assets.evaluation import bootstrap, frame_errors  # noqa: E402
from avperception_assets.evaluation.comparison import BASELINE, FINETUNED  # noqa: E402
from avperception_assets.model.detections import coco_category_names, mode_class_ids  # noqa: E402
from avperception_assets.storage import tables as storage  # noqa: E402
from targets import target  # noqa: E402

CLASSES = ("rider", "bicycle", "motorcycle")
WIDTH, HEIGHT = 1280, 720
GOAL_S = 10.0


def _boxes(rng, count: int) -> np.ndarray:
    xy = rng.uniform([0, 0], [WIDTH - 200, HEIGHT - 200], (count, 2))
    return np.hstack([xy, xy + rng.uniform(15, 200, (count, 2))])


def _frame(rng, class_ids: list[int], found: float) -> tuple[dict, dict]:
    """One frame's ground truth and a model's detections: each object found with probability
    `found` (a box shifted by a few pixels, sometimes of another class) and 3-7 false positives."""
    objects = rng.poisson(3)
    gt_boxes, gt_labels = _boxes(rng, objects), rng.choice(class_ids, objects)
    hit = rng.random(objects) < found
    shift = rng.normal(0, 0.08, (objects, 4)) * np.repeat(gt_boxes[:, 2:] - gt_boxes[:, :2], 2, axis=1)
    labels = np.where(rng.random(objects) < 0.9, gt_labels, rng.choice(class_ids, objects))[hit]
    spurious = rng.integers(3, 8)
    boxes = np.vstack([(gt_boxes + shift)[hit], _boxes(rng, spurious)])
    scores = np.concatenate([rng.beta(5, 2, hit.sum()), rng.beta(2, 5, spurious)])
    target = {"boxes": torch.tensor(gt_boxes, dtype=torch.float32), "labels": torch.tensor(gt_labels)}
    prediction = {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores, dtype=torch.float32),
                  "labels": torch.tensor(np.concatenate([labels, rng.choice(class_ids, spurious)]))}
    return target, prediction


def stored_rows(frames: int, seed: int = 0):
    """Both models' matches on `frames` frames, written to `<mode>_eval_frames` and read back."""
    rng, names = np.random.default_rng(seed), coco_category_names()
    class_ids = list(mode_class_ids(CLASSES))
    errors = {BASELINE: [], FINETUNED: []}
    for _ in range(frames):
        state = rng.bit_generator.state
        for model, found in ((BASELINE, 0.6), (FINETUNED, 0.75)):
            rng.bit_generator.state = state  # the same ground truth for both models
            target, prediction = _frame(rng, class_ids, found)
            errors[model].append(frame_errors.match_frame(prediction, target, names))
    rows = frame_errors.frame_rows(errors, [f"frame-{i:05d}" for i in range(frames)], class_ids, names)
    conn = storage.connect(tempfile.mkdtemp(prefix="avp-bootstrap-"))
    version = frame_errors.write_table(conn, "rider", rows, {})
    return frame_errors.read_table(conn, "rider", version), class_ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--resamples", type=int, default=bootstrap.RESAMPLES)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows, class_ids = stored_rows(args.frames)
    built = time.perf_counter() - started
    started = time.perf_counter()
    matches = bootstrap.matches_from_rows(rows, class_ids)
    read = time.perf_counter() - started
    started = time.perf_counter()
    found = bootstrap.intervals(matches, {"delta": (BASELINE, FINETUNED)}, resamples=args.resamples)
    seconds = time.perf_counter() - started
    sample = matches[FINETUNED]
    detections = sum(len(d.frames) for d in sample.detections)
    print(f"stored matches: {args.frames} frames, {sample.objects} objects of {len(class_ids)} classes, "
          f"{detections / args.frames:.1f} detections a frame of those classes (fine-tuned); built in {built:.1f} s")
    print(f"read from the stored rows: {read:.2f} s")
    for name, figures in found.items():
        print(f"{name}: " + ", ".join(f"{key} {f['point']:.3f} [{f['low']:.3f}, {f['high']:.3f}]"
                                      for key, f in figures.items()))
    print(f"intervals ({args.resamples} resamples, 2 models + paired delta): {seconds:.2f} s")
    target("bootstrap_seconds", seconds + read, "<=", GOAL_S, unit=" s")


if __name__ == "__main__":
    main()
