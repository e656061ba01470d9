"""Hard-example mining against plain fine-tuning, on every registry mode of a materialized data dir.

For each mode and seed, two fine-tunes from the same base detector on the mode's latest train
view, with the same recipe, optimiser steps and batch size: one drawing frames alike (the
default), one drawing them by the base detector's difficulty and its hardest frames' look-alikes
(`hard_examples`). Each final model (no best-epoch selection, so nothing is chosen on the val
view) is scored on the mode's val view over the mode's own classes: AP@0.5 and recall (mAR@100).

Needs a data dir where `make demo` (or the assets) materialized the views, the embedding column
and base_detector. Reports the mean and standard deviation over the seeds per mode and variant.
Goal: mining's mean beats plain fine-tuning's by more than the spread (the larger of the two
standard deviations) on at least 2 of 3 modes.

Usage: AVP_DATA_DIR=data .venv/bin/python benchmarks/mining.py [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avperception_assets.model import checkpoints, detector, loader, training
from avperception_assets.model.recipe import Recipe
from avperception_assets.evaluation import comparison as evaluation
from avperception_assets.discovery import hard_examples
from avperception_assets.storage import tables as storage
from avperception_assets.defs.modes import location_modes
from avperception_assets.slices.views import view_name
from avperception_assets.workspace import BASE_CHECKPOINTS, BASE_LONG_CHECKPOINTS, Workspace
from targets import target  # noqa: E402

VARIANTS = ("plain", "mining")
FIGURES = (("AP@0.5", "map_50"), ("recall", "mar_100"))


def base_weights(root: Path) -> str:
    """The base the assets fine-tune from: the long base `make base` cached when there is one
    (base_detector reuses it), else the newest base_detector checkpoint."""
    cached = checkpoints.latest_complete(root / BASE_LONG_CHECKPOINTS, detector.get_profile("cpu").architecture)
    folders = sorted((p for p in (root / BASE_CHECKPOINTS).glob("*") if (p / checkpoints.BEST_FILE).is_file()),
                     key=lambda p: int(p.name))
    if cached is None and not folders:
        raise SystemExit(f"no base_detector checkpoint under {root}: run `make base` or `make demo` first")
    return str((cached or folders[-1]) / checkpoints.BEST_FILE)


def own_class_figures(uri: str, mode, model, profile) -> dict:
    """The final model on the mode's val view, over the mode's classes."""
    val = loader.pin_view(uri, view_name(mode, "val"))
    result = evaluation.evaluate({evaluation.FINETUNED: model},
                                 evaluation.view_batches(uri, val.name, val.version, batch_size=profile.batch_size),
                                 classes=mode.classes, panel_count=0, worst_count=0)
    return {key: result.metrics[evaluation.FINETUNED]["mode"][key] or 0.0 for _, key in FIGURES}


def run_mode(uri: str, weights: str, mode, seeds: list[int], out: Path, overrides: dict) -> dict:
    train = loader.pin_view(uri, view_name(mode, "train"))
    profile = detector.get_profile("cpu").for_finetune().with_min_input(mode.min_input_size).replace(**overrides)
    base, info = checkpoints.starting_model(weights, profile.as_dict())
    key = hard_examples.model_key(info["digest"], profile.min_size, profile.max_size)
    stats = hard_examples.score_view(storage.connect(uri), mode.name, train, mode.classes, base, key,
                                     batch_size=profile.batch_size)
    mining = hard_examples.Mining(stats.table, stats.version, key, boost=1.0, neighbors=4, query_fraction=0.1)
    sampling = {"plain": (None, None), "mining": (mining.as_dict(), hard_examples.frame_weights(train, mining))}
    results = {variant: [] for variant in VARIANTS}
    for seed in seeds:
        for variant in VARIANTS:
            record, sample_weights = sampling[variant]
            recipe = Recipe.on(train, profile, selection_pct=0, weights=weights, seed=seed, mining=record)  # last epoch
            started = time.perf_counter()
            metadata = training.train(recipe, out / mode.name / variant / str(seed), sample_weights=sample_weights,
                                      log=lambda _: None)
            model = checkpoints.load_checkpoint(out / mode.name / variant / str(seed), checkpoints.LAST_FILE)
            figures = own_class_figures(uri, mode, model, profile)
            steps = sum(e["steps"] for e in metadata["epochs"])
            print(f"{mode.name} {variant} seed {seed}: {steps} steps of {profile.batch_size}, "
                  f"AP@0.5 {figures['map_50']:.3f}, recall {figures['mar_100']:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            results[variant].append({**figures, "steps": steps})
    return {"train_rows": loader.count_rows(train), "scored": stats.scored, "mining": mining.as_dict(),
            "results": results}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None, help="where the fine-tunes go (default: a temp dir)")
    parser.add_argument("--epochs", type=int, default=None, help="override the fine-tune's epochs (a quick look)")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None)
    args = parser.parse_args()
    workspace = Workspace.from_env()
    uri, weights = workspace.lancedb_uri, base_weights(workspace.checkpoints_dir)
    print(f"data: {uri}; base detector {weights}; seeds {args.seeds}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        overrides = {k: v for k, v in (("epochs", args.epochs), ("max_steps_per_epoch", args.max_steps_per_epoch))
                     if v is not None}
        by_mode = {mode.name: run_mode(uri, weights, mode, args.seeds, out, overrides) for mode in location_modes()}
    print("\n| mode | train rows | figure | plain mean ± sd | mining mean ± sd | Δ |\n|---|---:|---|---:|---:|---:|")
    wins = 0
    for name, found in by_mode.items():
        for label, key in FIGURES:
            (plain, plain_sd), (mined, mined_sd) = (_mean_sd([r[key] for r in found["results"][v]]) for v in VARIANTS)
            print(f"| {name} | {found['train_rows']} | {label} | {plain:.3f} ± {plain_sd:.3f} | "
                  f"{mined:.3f} ± {mined_sd:.3f} | {mined - plain:+.3f} |")
            if key == "map_50":
                found["gain"], found["spread"] = mined - plain, max(plain_sd, mined_sd)
    print("\n" + json.dumps(by_mode, indent=1))
    for name, found in by_mode.items():
        target(f"mining_gain_{name} (AP@0.5, over the spread)", found["gain"], ">=", round(found["spread"], 3),
               digits=3)
        wins += found["gain"] > found["spread"]
    target("modes_where_mining_wins", wins, ">=", 2, digits=0)


if __name__ == "__main__":
    main()
