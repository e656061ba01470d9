"""Cost of one `<mode>_eval_report` on the CPU: read + decode, inference, COCO metrics, files.

Synthetic 1280x720 frames are ingested into a Lance table; two randomly initialised CPU-profile
detectors (the demo's `fasterrcnn_mobilenet_v3_large_320_fpn`) stand in for baseline and
fine-tuned. The second keeps every detection (score threshold 0, 50 per frame) so the COCO
evaluation works on a full prediction set, as with a trained model. Measured:

- one pass: `evaluate_view` (both models per batch, frames decoded once) end to end,
- its baseline: two single-model passes over the same view (frames decoded twice),
- inference seconds per frame per model, metric and report-writing seconds, peak RSS.

Usage: python benchmarks/evaluation.py [--frames 24] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avperception_assets.model import detections, detector
from avperception_assets.evaluation import comparison as evaluation, reports
from avperception_assets.ingest import frames as ingest
from avperception_assets.storage import tables as storage
from avperception_assets import synthetic
from targets import target  # noqa: E402


def _model(seed: int, score_thresh: float):
    torch.manual_seed(seed)
    profile = detector.get_profile("cpu")
    profile = profile.replace(model_kwargs={**profile.model_kwargs, "box_score_thresh": score_thresh})
    return detector.build_detector(profile, detector.WEIGHTS_NONE)


def _timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def _cpu_timed(fn):
    """CPU seconds of this process: less distorted than wall time on a shared, loaded machine."""
    started = time.process_time()
    value = fn()
    return value, time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic.write_batch(root / "landing", "bench", args.frames, seed=0, val_fraction=0.0)
        uri = str(root / "lancedb")
        conn = storage.connect(uri)
        ingest.ingest_batches(conn, root / "landing")
        version = conn.open_table(storage.FRAMES_TABLE).version
        models = {evaluation.BASELINE: _model(0, 0.05), evaluation.FINETUNED: _model(1, 0.0)}
        detections.compute_metrics([], [], {})  # import torchmetrics/pycocotools outside the timings
        warm = next(evaluation.view_batches(uri, storage.FRAMES_TABLE, version, batch_size=2))
        for model in models.values():  # first calls allocate and pick kernels: keep them out too
            detections.predict(model, warm.images)

        def evaluate_and_report():
            result, view = evaluation.evaluate_view(uri, storage.FRAMES_TABLE, models, classes=["rider", "pedestrian"],
                                                    batch_size=args.batch_size)
            return reports.write_report(root / "reports" / "rider", result, mode="rider", val_view=view,
                                        baseline={}, finetuned={})

        report, one_pass_s = _timed(evaluate_and_report)
        rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak of the real pass

        def single(name):
            batches = evaluation.view_batches(uri, storage.FRAMES_TABLE, version, batch_size=args.batch_size)
            return evaluation.evaluate({name: models[name]}, batches, classes=["rider"], panel_count=0)

        _, two_pass_s = _timed(lambda: [single(name) for name in models])
        frames, decode_s = _timed(lambda: list(evaluation.view_batches(
            uri, storage.FRAMES_TABLE, version, batch_size=args.batch_size)))
        infer_s, infer_cpu_s = {}, {}
        for name, model in models.items():
            _, infer_s[name] = _timed(lambda m=model: [detections.predict(m, b.images) for b in frames])
            _, infer_cpu_s[name] = _cpu_timed(lambda m=model: [detections.predict(m, b.images) for b in frames])
        result = evaluation.evaluate(models, iter(frames), classes=["rider", "pedestrian"])
        del frames
        _, metrics_s = _timed(lambda: detections.compute_metrics(
            result.predictions[evaluation.FINETUNED], result.targets, detections.mode_class_ids(["pedestrian"])))
        _, write_s = _timed(lambda: reports.write_report(
            root / "reports" / "again", result, mode="rider", val_view={}, baseline={}, finetuned={}))
        boxes = sum(len(p["labels"]) for p in result.predictions[evaluation.FINETUNED])
    n = args.frames
    per_frame = {name: s / n for name, s in infer_s.items()}
    print(f"frames: {n} at 1280x720, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"read + decode (Lance scan + loader collate): {decode_s:.2f} s ({n / decode_s:.1f} frames/s)")
    for name, s in per_frame.items():
        print(f"inference {name}: {s:.3f} s/frame wall, {infer_cpu_s[name] / n:.3f} CPU s/frame")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"COCO metrics (fine-tuned, {boxes} detections): {metrics_s:.2f} s")
    print(f"report files (COCO JSON x3, panels, report.json/md): {write_s:.2f} s")
    print(f"evaluate_view, both models in one pass: {one_pass_s:.1f} s; two single-model passes: "
          f"{two_pass_s:.1f} s; ratio {two_pass_s / one_pass_s:.2f}x; {len(report.rows)} report rows")
    print(f"peak RSS during evaluate_view: {rss_gib:.2f} GiB")
    worst = max(per_frame.values())
    target("inference_s_per_frame_per_model", worst, "<=", 0.25, digits=3)
    target("eval_report_s_per_frame", one_pass_s / n, "<=", 0.6, digits=3)
    target("peak_rss_gib", rss_gib, "<=", 3.0)


if __name__ == "__main__":
    main()
