"""The gpu profile's training step on synthetic 720p batches, with AMP on and off.

Prepared for a lent GPU machine (one short command on a bare machine, no weights to download):
the gpu profile's detector (ResNet50-FPN-v2) from random init, since a step's time does not
depend on the weights, fed batches of synthetic 1280x720 uint8 frames with a few boxes each
through `engine.train_step`, the step training runs (autocast, GradScaler, the grad-norm clip
and the stop on a non-finite loss). Per setting: the median step over `--steps` after `--warmup`,
images/s and the peak GPU memory; a batch that does not fit is reported, not fatal. Target:
AMP's step at least as fast as AMP off. Without CUDA it runs the same step on the CPU, AMP off
only, as a check that the script works (the target then FAILs: not measured).

    .venv/bin/python benchmarks/gpu_training_step.py [--batch-size 64] [--steps 10] [--warmup 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from avperception_assets.model import detector, engine, loader
from targets import target  # noqa: E402

HEIGHT, WIDTH = 720, 1280
COCO_LABELS = (1, 2, 3, 4, 6, 8)  # person, bicycle, car, motorcycle, bus, truck


def synthetic_batch(size: int, generator: torch.Generator) -> loader.Batch:
    """uint8 720p frames of noise, each with 2-8 boxes of 20-400 px."""
    images, targets = [], []
    for _ in range(size):
        images.append(torch.randint(0, 256, (3, HEIGHT, WIDTH), dtype=torch.uint8, generator=generator))
        count = int(torch.randint(2, 9, (1,), generator=generator))
        x1 = torch.rand(count, generator=generator) * (WIDTH - 400)
        y1 = torch.rand(count, generator=generator) * (HEIGHT - 400)
        side = 20 + torch.rand(count, 2, generator=generator) * 380
        boxes = torch.stack([x1, y1, x1 + side[:, 0], y1 + side[:, 1]], dim=1)
        labels = torch.tensor(COCO_LABELS)[torch.randint(0, len(COCO_LABELS), (count,), generator=generator)]
        targets.append({"boxes": boxes, "labels": labels})
    return loader.Batch(images, targets, [f"synthetic-{i}" for i in range(size)])


def time_steps(profile: detector.Profile, amp: bool, batch: loader.Batch, warmup: int, steps: int) -> dict:
    """Median seconds of an optimiser step (synchronised), images/s and peak GPU memory."""
    device = engine.device_for(profile)
    torch.manual_seed(0)
    model = detector.build_detector(profile).to(device).train()
    state = engine.TrainState.create(model, profile.replace(amp=amp), device, epoch_steps=warmup + steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        engine.train_step(state, batch, f"step {step}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"step_s": median, "images_per_s": len(batch.images) / median, "peak_gb": peak}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=detector.get_profile("gpu").batch_size)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    profile = detector.get_profile("gpu")
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else "no CUDA: the CPU, a check of the script only"
    print(f"gpu profile ({profile.architecture}, input {profile.min_size}x{profile.max_size}), synthetic "
          f"{WIDTH}x{HEIGHT} frames, batch {args.batch_size}, {args.steps} timed steps after {args.warmup}; "
          f"torch {torch.__version__}; {name}", flush=True)
    batch = synthetic_batch(args.batch_size, torch.Generator().manual_seed(0))
    results = {}
    for amp in ((False, True) if cuda else (False,)):
        try:
            results[amp] = time_steps(profile, amp, batch, args.warmup, args.steps)
        except torch.cuda.OutOfMemoryError as error:
            print(f"AMP {'on' if amp else 'off'}: batch {args.batch_size} does not fit: {str(error)[:200]}", flush=True)
            torch.cuda.empty_cache()
            continue
        r = results[amp]
        memory = f", peak GPU memory {r['peak_gb']:.1f} GB" if cuda else ""
        print(f"AMP {'on' if amp else 'off'}: median step {r['step_s']:.3f} s, {r['images_per_s']:.1f} images/s{memory}",
              flush=True)
    measured = len(results) == 2  # NaN, so FAIL, when AMP could not be compared (no CUDA, or a batch too big)
    speedup = results[False]["step_s"] / results[True]["step_s"] if measured else float("nan")
    if measured:
        print(f"AMP memory: {results[True]['peak_gb'] / results[False]['peak_gb']:.2f}x of AMP off")
    target("amp_step_speedup", speedup, ">=", 1.0, unit="x")


if __name__ == "__main__":
    main()
