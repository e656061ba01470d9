"""A training run's folder on disk: its files, written atomically, and resuming only an equal recipe.

A run trains on `view@version` and writes, under `<root>/<run name>/<version>/`:

- `last.pt` / `best.pt`: model state_dicts (the latest epoch; the best by mAP@0.5 on the
  selection share, the view's frames held out from training); while the latest epoch is the
  best they are one file under two names (a hard link), so replace them, never write into them,
- `train_state.pt`: optimiser, LR schedule, grad scaler and epoch (`engine.TrainState`), for resuming,
- `metadata.json`: the recipe (`Recipe.as_dict()`, its keys at the top level) and what the run
  found: rows trained on and held out (with the rule that split them), the rows before the
  clip draw and a digest of the ids drawn (`clip_draws`), source table version,
  code version, device, per-epoch loss and mAP@0.5 on the selection share (`val_map_50`), the
  best epoch (rewritten after every epoch),
- `run.json`: the recipe the training processes were started with,
- `sample_weights.json`: the per-frame sampling weights (by image id), when the run drew frames by them,
- `failure.json`: why the training processes stopped, when retrying cannot help,
- `tensorboard/`: event files (loss, images/s, LR, selection mAP@0.5).

A killed run leaves every file whole (each is written to a temporary name, then renamed). The
same recipe resumes from its last saved epoch; any other recipe in the folder starts over.
A folder written before runs held frames out (no `selection_pct`) records a run that trained
on every row of its view and chose its best epoch on a val view (`val_view`); it loads and
reproduces, and today's recipes start over in it. Those up to c618fc9 also hold a `config` copy
of the recipe and no `sample_weights.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from avperception_assets.model.detector import (WEIGHTS_COCO, build_detector, coco_weights_path, get_profile, load_weights,
                                                set_input_size, weights_digest)
from avperception_assets.model.clip_draws import ALL
from avperception_assets.model.recipe import Recipe
from avperception_assets.model.selection import RULE as SELECTION_RULE

METADATA_FILE = "metadata.json"
LAST_FILE = "last.pt"
BEST_FILE = "best.pt"
STATE_FILE = "train_state.pt"
TENSORBOARD_DIR = "tensorboard"
RUN_FILE = "run.json"
SAMPLE_WEIGHTS_FILE = "sample_weights.json"
FAILURE_FILE = "failure.json"
COMPLETE = "complete"  # metadata.json's status once the run's last epoch is saved
FRAMES_BEFORE_DRAW = "frames_before_draw"  # the rows trained on before the clip draw (train_rows: after)
DRAWN_DIGEST = "drawn_frames_sha256"  # `clip_draws.digest` of the frames trained on


def save_torch(obj, path: Path) -> None:
    """`torch.save` atomically: a run killed mid-save leaves the previous file intact."""
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def link_or_copy(source: Path, path: Path) -> None:
    """`path` atomically made the same file as `source`: a hard link where the filesystem has them
    (a later `save_torch` to `source` replaces its name, so `path` keeps these bytes), else a copy.
    best.pt is last.pt's link whenever the latest epoch is the best: half the disk of two copies."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)


def write_json(data, path: Path) -> None:
    """Write `data` as JSON atomically: a run killed mid-write leaves the previous file intact."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_metadata(checkpoint_dir: Path) -> dict:
    path = Path(checkpoint_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METADATA_FILE} in {checkpoint_dir}: not a checkpoint folder")
    return json.loads(path.read_text())


def write_run(out: Path, recipe: Recipe, sample_weights: Mapping[str, float] | None) -> Path:
    """What the training processes start from: run.json and the sampling weights; returns run.json's path."""
    write_sample_weights(out, sample_weights)
    write_json(recipe.as_dict(), out / RUN_FILE)
    return out / RUN_FILE


def read_run(run_file: Path) -> tuple[Recipe, dict[str, float] | None]:
    """The recipe and sampling weights `write_run` left for the training processes."""
    return Recipe.from_dict(json.loads(Path(run_file).read_text())), read_sample_weights(Path(run_file).parent)


def write_sample_weights(out: Path, weights: Mapping[str, float] | None) -> None:
    """Record the weights a run draws frames by (none: remove an earlier run's)."""
    if weights is None:
        (out / SAMPLE_WEIGHTS_FILE).unlink(missing_ok=True)
    else:
        write_json(dict(weights), out / SAMPLE_WEIGHTS_FILE)


def read_sample_weights(checkpoint_dir: Path) -> dict[str, float] | None:
    path = Path(checkpoint_dir) / SAMPLE_WEIGHTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def code_version() -> str:
    """The git commit of this checkout (with '+dirty' for local changes), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"avperception_assets=={version('avperception_assets')}"
        except PackageNotFoundError:
            return "unknown"


def new_metadata(recipe: Recipe, *, train_rows: int, selection_rows: int, draw: tuple[int, str],
                 source: tuple[str, int], device, amp: bool, world_size: int) -> dict:
    """A fresh run's metadata.json: its recipe and what it runs on, before any epoch: the rows it
    trains on, as drawn from how many (`draw`: rows before the clip draw, digest of the drawn
    ids), and how many rows were held out to choose its best epoch by which rule (so that
    `training.selection_frames` rebuilds them)."""
    source_table, source_version = source
    before_draw, drawn_digest = draw
    return {**recipe.as_dict(), "status": "training", "train_rows": train_rows, "selection_rows": selection_rows,
            FRAMES_BEFORE_DRAW: before_draw, DRAWN_DIGEST: drawn_digest,
            "selection_rule": SELECTION_RULE, "source_table": source_table,
            "source_table_version": source_version, "code_version": code_version(), "device": str(device),
            "amp": amp, "world_size": world_size, "epochs": [], "best_epoch": None, "best_val_map_50": None,
            "resumed_from_epoch": None}


def resume_point(out: Path, recipe: Recipe) -> dict | None:
    """The saved metadata when `out` holds an unfinished or finished run of the same recipe."""
    if not (out / METADATA_FILE).is_file() or not (out / STATE_FILE).is_file():
        return None
    metadata = read_metadata(out)
    return metadata if recipe.recorded_in(metadata) else None


def resume(out: Path, saved: dict, state, metadata: dict) -> None:
    """Load the last saved epoch of `out` into `state` (an `engine.TrainState`) and carry its
    epochs over into the new run's `metadata`."""
    import torch

    state.load_state_dict(torch.load(out / STATE_FILE, map_location=state.device, weights_only=False))
    load_weights(state.model, torch.load(out / LAST_FILE, map_location=state.device, weights_only=True))
    metadata.update({k: saved[k] for k in ("epochs", "best_epoch", "best_val_map_50")},
                    resumed_from_epoch=state.epoch)


def save_epoch(out: Path, state, metadata: dict, record: dict) -> None:
    """The end of an epoch (`record`, validated): last.pt, best.pt when it is the best so far,
    the train state, then metadata.json, which lists the epoch only once all are written."""
    save_torch(state.model.state_dict(), out / LAST_FILE)
    best = metadata["best_val_map_50"]
    if best is None or (record["val_map_50"] or 0.0) > best or not (out / BEST_FILE).is_file():
        link_or_copy(out / LAST_FILE, out / BEST_FILE)
        metadata.update(best_epoch=record["epoch"], best_val_map_50=record["val_map_50"])
    metadata["epochs"].append(record)
    save_torch(state.state_dict(), out / STATE_FILE)
    write_json(metadata, out / METADATA_FILE)


def run_summary(metadata: dict, out: Path) -> dict:
    """A run's metadata.json facts, flat: what its asset materialization shows. Its row count is
    the view's rows at the pinned version, trained on, left out by the clip draw or held out:
    what the retrain policy compares the view's growth with."""
    epochs = metadata["epochs"]
    before_draw = metadata.get(FRAMES_BEFORE_DRAW, metadata["train_rows"])  # no draw before it was recorded
    return {
        "checkpoint_dir": str(out), "weights": str(out / BEST_FILE),
        "train_view": metadata["train_view"], "train_view_version": metadata["train_view_version"],
        "train_filter": metadata["train_filter"] or "", "source_table": metadata["source_table"],
        "source_table_version": metadata["source_table_version"],
        "dagster/row_count": before_draw + metadata["selection_rows"],
        "train_rows": metadata["train_rows"], "selection_rows": metadata["selection_rows"],
        "clip_draw": metadata.get("clip_draw", ALL), "frames_before_draw": before_draw,
        "frames_after_draw": metadata["train_rows"],
        "selection_pct": metadata["selection_pct"], "selection_rule": metadata["selection_rule"],
        "profile": metadata["profile"]["name"], "hyper_parameters": metadata["profile"],
        "weights_source": metadata["weights_source"], "seed": metadata["seed"],
        "code_version": metadata["code_version"], "device": metadata["device"],
        "world_size": metadata.get("world_size", 1), "mining": metadata.get("mining"),
        "resumed_from_epoch": metadata["resumed_from_epoch"], "best_epoch": metadata["best_epoch"],
        "best_val_map_50": metadata["best_val_map_50"],
        "epoch_loss": [round(e["loss"], 4) for e in epochs],
        "epoch_val_map_50": [e["val_map_50"] for e in epochs],
        "images_per_s": round(epochs[-1]["images_per_s"], 2) if epochs else None,
        "train_seconds": round(sum(e["seconds"] for e in epochs), 1),
    }


def latest_complete(root: Path, architecture: str) -> Path | None:
    """The run folder under `root` (one per train-view version) of the highest version whose
    run of `architecture` completed; None when there is none."""
    complete = []
    for folder in Path(root).glob("*"):
        if folder.name.isdigit() and (folder / BEST_FILE).is_file() and (folder / METADATA_FILE).is_file():
            metadata = read_metadata(folder)
            if metadata["status"] == COMPLETE and metadata["profile"]["architecture"] == architecture:
                complete.append((int(folder.name), folder))
    return max(complete)[1] if complete else None


def load_checkpoint(checkpoint_dir: Path, which: str = BEST_FILE):
    """The trained model saved in `checkpoint_dir` (its profile comes from metadata.json)."""
    metadata = read_metadata(checkpoint_dir)
    return build_detector(get_profile(**metadata["profile"]), str(Path(checkpoint_dir) / which))


def starting_model(weights: str, profile: dict):
    """The model a fine-tune starts from (`weights`: 'coco' or a checkpoint's state_dict file)
    at the fine-tune's `profile` (same network, same input size), and what records name it by,
    `digest` included (the weights' content)."""
    if weights == WEIGHTS_COCO:
        profile = get_profile(**profile)
        path = coco_weights_path(profile.architecture)
        info = {"weights": WEIGHTS_COCO, "weights_file": str(path), "architecture": profile.architecture,
                "digest": weights_digest(path)}
        return build_detector(profile, WEIGHTS_COCO), info
    folder = Path(weights).parent
    info = {"weights": weights, "checkpoint_dir": str(folder), "metadata": read_metadata(folder),
            "digest": weights_digest(Path(weights)), "input_size": [profile["min_size"], profile["max_size"]]}
    model = load_checkpoint(folder, Path(weights).name)
    set_input_size(model, profile["min_size"], profile["max_size"])
    return model, info
