"""Curation strategies judged by the reports' protocol, on every registry mode of a materialized data dir.

Per mode and seed, four fine-tunes from the base detector with the mode's recipe as
`<mode>_checkpoint` builds it (`FineTuneConfig.mode_profile`: input size, crops, epochs; the best
epoch chosen on the train frames' selection share, never on the val view), all with the same
optimiser steps and batch size:

- plain: the mode's train view, every frame alike (the default);
- mining: the same frames drawn by hard-example mining's weights (`FineTuneConfig.mine`; the base
  scores the frames once per mode);
- control: mining's weights shuffled over the same frames (seeded by the seed): the same multiset
  of weights, so as many extra draws in expectation, on frames picked at random;
- all_frames: the rows base_detector trains on (the whole train split), each epoch cut to plain's
  steps.

Each selected model (best.pt) is scored on the mode's val view over the mode's classes; the
per-frame matches (`comparison.frame_rows`) give each arm's AP@0.5, averaged over seeds, against
plain's as a paired 95% bootstrap interval in points (1,000 resamples of the frames, the same for
every arm: `bootstrap.group_intervals`), the seeds' spread (sd of the per-seed differences) and
the verdict. On a mode with tiling, plain's models are also scored on tiles: tiled - untiled.

Targets: mining better than plain on >= 2 of 3 modes; plain better than all_frames on >= 2 of 3;
tiled better than untiled on each mode with tiling (better: the interval's low end above 0).
Needs a data dir where `make demo` ran (views, embedding column, base_detector; the long base of
`make base` when cached). Mining's scores go to the data dir's `<mode>_difficulty`, as the asset's
do; the fine-tunes to a temporary folder, each removed once scored. Writes every figure as JSON
to --out (default: reports/strategies.json in the data dir) as each mode is judged; run again
with the same --out, seeds and base, it resumes at the first mode not judged yet.

Usage: AVP_DATA_DIR=data .venv/bin/python benchmarks/strategies.py [--seeds 0 1 2] [--modes M ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from avperception_assets.defs.evaluation_assets import EvalReportConfig  # noqa: E402
from avperception_assets.defs.modes import location_modes  # noqa: E402
from avperception_assets.defs.training_assets import BASE_TRAIN_WHERE, FineTuneConfig  # noqa: E402
from avperception_assets.evaluation import bootstrap, comparison  # noqa: E402
from avperception_assets.model import checkpoints, loader, tiling, training  # noqa: E402
from avperception_assets.model.detections import mode_class_ids  # noqa: E402
from avperception_assets.model.recipe import Recipe  # noqa: E402
from avperception_assets.slices.views import view_name  # noqa: E402
from avperception_assets.storage import tables as storage  # noqa: E402
from avperception_assets.workspace import BASE_CHECKPOINTS, BASE_LONG_CHECKPOINTS, Workspace  # noqa: E402
from targets import target  # noqa: E402

ARMS = ("plain", "mining", "control", "all_frames")
TILED = comparison.tiled_name("plain")
STARTED = time.perf_counter()


def say(line: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {line}", flush=True)


def base_weights(root: Path, architecture: str) -> str:
    """The base the assets fine-tune from: the long base `make base` cached when there is one
    (base_detector reuses it), else the newest base_detector checkpoint."""
    cached = checkpoints.latest_complete(root / BASE_LONG_CHECKPOINTS, architecture)
    folders = sorted((p for p in (root / BASE_CHECKPOINTS).glob("*") if (p / checkpoints.BEST_FILE).is_file()),
                     key=lambda p: int(p.name))
    if cached is None and not folders:
        raise SystemExit(f"no base_detector checkpoint under {root}: run `make base` or `make demo` first")
    return str((cached or folders[-1]) / checkpoints.BEST_FILE)


def demo_estimate(root: Path, architecture: str, modes, runs: int) -> str:
    """The protocol's training time at the pace of each mode's own latest fine-tune (`make demo`'s)."""
    seconds = {}
    for mode in modes:
        folder = checkpoints.latest_complete(root / mode.name, architecture)
        if folder is not None:
            seconds[mode.name] = sum(e["seconds"] for e in checkpoints.read_metadata(folder)["epochs"])
    if not seconds:
        return "no fine-tune of a mode in the data dir to estimate from"
    each = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
    return (f"estimate {runs * sum(seconds.values()) / 60:.0f} min of training for {runs} fine-tunes a mode at the "
            f"pace of the data dir's own ({each}), plus evaluations and all_frames' larger selection share")


def permuted(weights: dict[str, float], seed: int) -> dict[str, float]:
    """The control's sampling weights: mining's, shuffled over the same frames."""
    return dict(zip(weights, np.random.default_rng(seed).permutation(list(weights.values())).tolist()))


def arm_recipes(uri: str, conn, mode, config: FineTuneConfig, weights: str) -> dict:
    """Each arm's recipe and sampling weights; one step count and batch size for all."""
    plain = Recipe.on(loader.pin_view(uri, view_name(mode, "train")), config.mode_profile(mode),
                      selection_pct=config.selection_pct, weights=weights)
    base, info = checkpoints.starting_model(weights, plain.profile.as_dict())
    mined, mined_weights, stats = config.mine(conn, mode, plain, base, info["digest"])
    say(f"{mode.name}: mining scored {stats.scored} frames ({stats.already_scored} scored before)")
    steps = training.steps_per_epoch(loader.count_rows(plain.train), plain.profile)
    everything = Recipe.on(loader.pin_view(uri, storage.FRAMES_TABLE, where=BASE_TRAIN_WHERE),
                           plain.profile.replace(max_steps_per_epoch=steps), selection_pct=config.selection_pct,
                           weights=weights)
    return {"plain": (plain, None), "mining": (mined, mined_weights), "control": (mined, mined_weights),
            "all_frames": (everything, None)}


def fine_tune(arm: str, recipe: Recipe, sample_weights, seed: int, out: Path) -> dict:
    recipe = recipe.replace(seed=seed)
    if arm == "control":
        sample_weights = permuted(sample_weights, seed)
        recipe = recipe.replace(mining={**recipe.mining, "control": f"weights permuted with seed {seed}"})
    return training.train(recipe, out, sample_weights=sample_weights, log=lambda _: None)


def frame_rows(uri: str, val, mode, name: str, folder: Path, spec) -> pa.Table:
    """The selected model's matches on every val frame, and with `spec` its matches on tiles."""
    batch_size = EvalReportConfig().batch_size

    def evaluate(model):
        return comparison.evaluate({name: model}, comparison.view_batches(uri, val.name, val.version,
                                                                          batch_size=batch_size),
                                   classes=mode.classes, panel_count=0, worst_count=0)

    untiled = evaluate(checkpoints.load_checkpoint(folder))
    tiled = evaluate(tiling.tiled(checkpoints.load_checkpoint(folder), spec.tile_size, spec.overlap,
                                  whole_frame=spec.whole_frame, batch_size=batch_size)) if spec else None
    return comparison.frame_rows(untiled, tiled)


def run_mode(uri: str, conn, mode, config: FineTuneConfig, weights: str, seeds: list[int], work: Path) -> dict:
    recipes = arm_recipes(uri, conn, mode, config, weights)
    val, spec = loader.pin_view(uri, view_name(mode, "val")), EvalReportConfig().resolve_tiling(mode)
    runs, rows = {arm: [] for arm in ARMS}, []
    for seed in seeds:
        for arm, (recipe, sample_weights) in recipes.items():
            started, folder = time.perf_counter(), work / mode.name / arm / str(seed)
            metadata = fine_tune(arm, recipe, sample_weights, seed, folder)
            trained = time.perf_counter() - started
            rows.append(frame_rows(uri, val, mode, f"{arm}_s{seed}", folder, spec if arm == "plain" else None))
            shutil.rmtree(folder)  # a run's files are about 0.2 GB
            runs[arm].append({"seed": seed, "steps": sum(e["steps"] for e in metadata["epochs"]),
                              "batch_size": metadata["profile"]["batch_size"], "train_rows": metadata["train_rows"],
                              "best_epoch": metadata["best_epoch"], "train_seconds": round(trained, 1),
                              "eval_seconds": round(time.perf_counter() - started - trained, 1)})
            say(f"{mode.name} {arm} seed {seed}: {runs[arm][-1]}")
            if seed == seeds[0] and arm == "plain":
                estimate = len(seeds) * (len(ARMS) * trained + runs[arm][-1]["eval_seconds"])
                say(f"{mode.name}: estimate {estimate / 60:.1f} min for its {len(seeds) * len(ARMS)} fine-tunes at "
                    f"this one's pace (all_frames also scores a larger selection share each epoch)")
    return {"runs": runs, **judge(pa.concat_tables(rows), mode, seeds, spec is not None)}


def _ap(matches: bootstrap.Matches) -> float:
    """AP@0.5 over the mode's classes on every frame once."""
    return float(bootstrap.score(matches, np.ones((1, matches.frames), dtype=np.int64))["map_50"][0])


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def judge(rows: pa.Table, mode, seeds: list[int], tiled: bool) -> dict:
    """Each arm's AP@0.5 per seed and, against plain (and tiled against untiled), the paired
    interval of the seed means, the seeds' spread of the differences and the verdict."""
    matches = bootstrap.matches_from_rows(rows, mode_class_ids(mode.classes))
    names = {arm: [f"{arm}_s{s}" for s in seeds] for arm in ARMS}
    if tiled:
        names[TILED] = [comparison.tiled_name(n) for n in names["plain"]]
    found = bootstrap.group_intervals({arm: [matches[n] for n in group] for arm, group in names.items()},
                                      {arm: ("plain", arm) for arm in names if arm != "plain"})
    per_seed = {arm: [_ap(matches[n]) for n in group] for arm, group in names.items()}
    arms = {}
    for arm, aps in per_seed.items():
        arms[arm] = {"map_50": aps, "intervals": found[arm]}
        if arm != "plain":
            deltas = [bootstrap.POINTS * (a - p) for a, p in zip(aps, per_seed["plain"])]
            arms[arm].update(delta=found[arm]["map_50"], verdict=bootstrap.verdict(found[arm]["map_50"]),
                             seed_spread=_sd(deltas))
    return {"frames": found["plain"]["map_50"]["frames"], "objects": found["plain"]["map_50"]["objects"],
            "classes": list(mode.classes), "arms": arms}


def print_table(by_mode: dict) -> None:
    print("\n| mode | arm | AP@0.5 mean ± sd over seeds | Δ vs plain [95% interval], points | seed spread, points "
          "| verdict | steps × batch | train frames |\n|---|---|---:|---:|---:|---|---:|---:|")
    for name, found in by_mode.items():
        for arm, figures in found["arms"].items():
            run = found["runs"]["plain" if arm == TILED else arm][0]
            delta = bootstrap.interval_text(figures["delta"], points=True) if "delta" in figures else "—"
            spread = f"{figures['seed_spread']:.1f}" if "delta" in figures else "—"
            print(f"| {name} | {arm} | {statistics.mean(figures['map_50']):.3f} ± {_sd(figures['map_50']):.3f} | "
                  f"{delta} | {spread} | {figures.get('verdict', '—')} | {run['steps']} × {run['batch_size']} | "
                  f"{run['train_rows']} |")
    for name, found in by_mode.items():
        print(f"{name}: {found['frames']} val frames, {found['objects']} objects of {', '.join(found['classes'])}")


def print_targets(by_mode: dict) -> None:
    def wins(arm: str, verdict: str) -> list[str]:
        return [name for name, found in by_mode.items() if found["arms"][arm]["verdict"] == verdict]

    mined, sliced = wins("mining", bootstrap.BETTER), wins("all_frames", bootstrap.WORSE)
    target(f"modes_where_mining_beats_plain ({', '.join(mined) or 'none'})", len(mined), ">=", 2, digits=0)
    target(f"modes_where_the_slice_beats_all_frames ({', '.join(sliced) or 'none'})", len(sliced), ">=", 2, digits=0)
    for name, found in by_mode.items():
        if TILED in found["arms"]:
            tiled = found["arms"][TILED]
            target(f"tiled_beats_untiled_{name} (Δ AP@0.5 {bootstrap.interval_text(tiled['delta'], points=True)} "
                   f"points)", int(tiled["verdict"] == bootstrap.BETTER), ">=", 1, digits=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=None, help="a subset of the registry's modes")
    parser.add_argument("--out", type=Path, default=None, help="the results JSON (default: reports/strategies.json)")
    parser.add_argument("--epochs", type=int, default=None, help="override the fine-tunes' epochs (a quick look)")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None)
    args = parser.parse_args()
    workspace = Workspace.from_env()
    modes = [m for m in location_modes(workspace) if args.modes is None or m.name in args.modes]
    unknown = set(args.modes or ()) - {m.name for m in modes}
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; the registry has {[m.name for m in location_modes(workspace)]}")
    quick = [f"{flag} {value}" for flag, value in (("--epochs", args.epochs),
                                                   ("--max-steps-per-epoch", args.max_steps_per_epoch),
                                                   ("--modes", args.modes)) if value is not None]
    quick += [f"{len(args.seeds)} seeds"] if len(args.seeds) < 3 else []
    label = f"NOT THE PROTOCOL ({'; '.join(quick)}): a quick look" if quick else "the protocol"
    config = FineTuneConfig(epochs=args.epochs, max_steps_per_epoch=args.max_steps_per_epoch)
    architecture = config.resolve_profile(finetune=True).architecture
    uri, weights = workspace.lancedb_uri, base_weights(workspace.checkpoints_dir, architecture)
    conn = storage.connect(uri, dict(workspace.storage_options))
    say(f"{label}; data {uri}; base detector {weights}; seeds {args.seeds}; modes {[m.name for m in modes]}")
    say(demo_estimate(workspace.checkpoints_dir, architecture, modes, len(ARMS) * len(args.seeds)))
    out = args.out or workspace.reports_dir / "strategies.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    run = {"protocol": not quick, "label": label, "seeds": args.seeds, "base_weights": weights}
    by_mode = finished_modes(out, run)
    with tempfile.TemporaryDirectory(prefix="avp-strategies-") as work:
        for mode in (m for m in modes if m.name not in by_mode):
            by_mode[mode.name] = run_mode(uri, conn, mode, config, weights, args.seeds, Path(work))
            out.write_text(json.dumps({**run, "modes": by_mode}, indent=1))  # a killed run keeps its finished modes
            say(f"{mode.name} judged; results so far in {out}")
    by_mode = {mode.name: by_mode[mode.name] for mode in modes}
    print_table(by_mode)
    say(f"results in {out}; {label}")
    print_targets(by_mode)


def finished_modes(out: Path, run: dict) -> dict:
    """The modes an earlier run of the same protocol, seeds and base judged into `out` (a run
    killed part-way resumes at its first unfinished mode)."""
    if not out.is_file():
        return {}
    earlier = json.loads(out.read_text())
    if any(earlier.get(key) != value for key, value in run.items()):
        return {}
    say(f"resuming: {', '.join(earlier['modes'])} judged before in {out}")
    return earlier["modes"]


if __name__ == "__main__":
    main()
