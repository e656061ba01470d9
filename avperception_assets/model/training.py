"""Faster R-CNN training on one pinned view version: checkpoints, resume, reproduction.

Plain Python (no Dagster). A run trains on `view@version` and writes, under
`<root>/<run name>/<version>/`:

- `last.pt` / `best.pt`: model state_dicts (the latest epoch; the best by val mAP@0.5),
- `train_state.pt`: optimiser, LR schedule, grad scaler and epoch, for resuming,
- `metadata.json`: data version, profile and hyper-parameters, weights source, seed, code
  version, per-epoch loss and val mAP@0.5 (rewritten after every epoch),
- `tensorboard/`: event files (loss, images/s, LR, val mAP@0.5).

The same (view, version, config) resumes from its last saved epoch; a newer view version gets
a new folder and starts fresh from the starting weights. Every epoch's order is a LanceDB
shuffle seeded by seed + epoch, or with hard-example mining (`hard_examples`) a draw weighted
by difficulty seeded the same way, so `reproduce` rebuilds the exact order from metadata.json.

CLI: `python -m avperception_assets.model.training reproduce <checkpoint dir> [--epoch N]` prints the
image ids of that epoch in training order, read from the time-travelled view.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from avperception_assets.discovery import hard_examples
from avperception_assets.model import loader
from avperception_assets.storage import tables as storage
from avperception_assets.model.detections import compute_metrics, predict
from avperception_assets.model.detector import WEIGHTS_COCO, Profile, build_detector, coco_weights_path, get_profile, load_weights, set_input_size, weights_digest

METADATA_FILE = "metadata.json"
LAST_FILE = "last.pt"
BEST_FILE = "best.pt"
STATE_FILE = "train_state.pt"
TENSORBOARD_DIR = "tensorboard"
RUN_FILE = "run.json"  # the RunSpec the training processes were started with
FAILURE_FILE = "failure.json"  # why they stopped, when retrying cannot help

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunSpec:
    """What a run is: its data (pinned), its recipe and where it starts from."""

    train: loader.ViewRef
    val: loader.ViewRef | None  # None or empty: no best-model selection, best = last
    profile: Profile
    weights: str  # starting weights: 'coco', 'none' or a state_dict path
    seed: int = 0
    mining: hard_examples.Mining | None = None  # None: every frame alike

    def __post_init__(self):
        object.__setattr__(self, "profile", self.profile.for_weights(self.weights))

    def config(self) -> dict:
        """The facts that decide whether an existing checkpoint folder may be resumed."""
        return {
            "train_view": self.train.name, "train_view_version": self.train.version,
            "train_filter": self.train.where,
            "val_view": self.val.name if self.val else None,
            "val_view_version": self.val.version if self.val else None,
            "profile": self.profile.as_dict(), "weights_source": self.weights, "seed": self.seed,
            "mining": self.mining.as_dict() if self.mining else None,
        }

    def as_dict(self) -> dict:
        """Everything the run is, JSON-shaped: what `training_worker` processes start from."""
        return {**self.config(), "uri": self.train.uri, "val_uri": self.val.uri if self.val else None,
                "val_filter": self.val.where if self.val else None}

    @classmethod
    def from_dict(cls, data: dict) -> "RunSpec":
        val = (loader.ViewRef(data["val_uri"], data["val_view"], data["val_view_version"], data["val_filter"])
               if data.get("val_view") else None)
        return cls(train=loader.ViewRef(data["uri"], data["train_view"], data["train_view_version"],
                                        data["train_filter"]),
                   val=val, profile=get_profile(**data["profile"]), weights=data["weights_source"], seed=data["seed"],
                   mining=hard_examples.Mining(**data["mining"]) if data.get("mining") else None)


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


def _save(obj, path: Path) -> None:
    """Write atomically: a run killed mid-save leaves the previous file intact."""
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(data: dict, path: Path) -> None:
    """Write `data` as JSON atomically: a run killed mid-write leaves the previous file intact."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_metadata(checkpoint_dir: Path) -> dict:
    path = Path(checkpoint_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METADATA_FILE} in {checkpoint_dir}: not a checkpoint folder")
    return json.loads(path.read_text())


def device_for(profile: Profile, process: "Process | None" = None):
    """The process's device: its local GPU under the gpu profile when CUDA is there, else the CPU."""
    import torch

    if torch.cuda.is_available() and profile.name != "cpu":
        return torch.device("cuda", process.local_rank if process else 0)
    return torch.device("cpu")


def val_map50(model, view: loader.ViewRef, *, batch_size: int) -> float | None:
    """mAP@0.5 of `model` on every frame of `view` (COCO protocol, as the evaluation reports)."""
    predictions, targets = [], []
    for batch in loader.make_loader(view, batch_size=batch_size):
        predictions.extend(predict(model, batch.images))
        targets.extend(batch.targets)
    model.train()
    if not targets:
        return None
    return compute_metrics(predictions, targets, {})["map_50"]


class NonFiniteLossError(FloatingPointError):
    """The loss of a step is NaN or infinite: the run stops before it reaches the weights."""


def steps_per_epoch(rows: int, profile: Profile) -> int:
    batches = -(-rows // profile.batch_size)  # the loader keeps the last, partial batch
    return batches if profile.max_steps_per_epoch is None else min(batches, profile.max_steps_per_epoch)


def lr_schedule(optimizer, profile: Profile, epoch_steps: int):
    """Stepped once per optimiser step: a linear warm-up over the first `warmup_steps` steps of
    the run, however many epochs they span ((k + 1) / warmup_steps of the rate at step k), and a
    decay by `lr_gamma` every `lr_step_epochs` epochs."""
    import torch

    decay = torch.optim.lr_scheduler.StepLR(optimizer, step_size=profile.lr_step_epochs * epoch_steps,
                                            gamma=profile.lr_gamma)
    if profile.warmup_steps <= 1:
        return decay
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / profile.warmup_steps,
                                               total_iters=profile.warmup_steps - 1)
    return torch.optim.lr_scheduler.ChainedScheduler([warmup, decay], optimizer)


def _optimizer(model, profile: Profile, epoch_steps: int):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=profile.lr, momentum=profile.momentum,
                                weight_decay=profile.weight_decay)
    return optimizer, lr_schedule(optimizer, profile, epoch_steps)


def _resume_point(out: Path, spec: RunSpec) -> dict | None:
    """The saved metadata when `out` holds an unfinished or finished run of the same config."""
    if not (out / METADATA_FILE).is_file() or not (out / STATE_FILE).is_file():
        return None
    metadata = read_metadata(out)
    return metadata if metadata.get("config") == spec.config() else None


@dataclass(frozen=True)
class Process:
    """Where this process sits in a run: rank and world size of a torch.distributed job
    (torchrun sets them; `training_worker` joins the group), (0, 1) when training alone."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def current(cls) -> "Process":
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def leader(self) -> bool:
        """Rank 0: the one that validates, writes checkpoints and reports."""
        return self.rank == 0

    def wrap(self, model, device):
        """The model as the optimiser steps it: DistributedDataParallel across a world."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total)
        return total.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _new_metadata(spec: RunSpec, rows: int, device, amp: bool, process: Process) -> dict:
    source_table, source_version = storage.source_table_version(spec.train.uri, spec.train.name, spec.train.version)
    return {
        "config": spec.config(), **spec.config(), "status": "training",
        "lancedb_uri": spec.train.uri, "train_rows": rows, "source_table": source_table,
        "source_table_version": source_version, "code_version": code_version(), "device": str(device), "amp": amp,
        "world_size": process.world, "epochs": [], "best_epoch": None, "best_val_map_50": None,
        "resumed_from_epoch": None,
    }


def _resume(out: Path, saved: dict, model, optimizer, scheduler, scaler, metadata: dict, device, log: Log) -> int:
    """Load the last saved epoch of `out` into the run's objects; returns the epoch to start at."""
    import torch

    state = torch.load(out / STATE_FILE, map_location=device, weights_only=False)
    load_weights(model, torch.load(out / LAST_FILE, map_location=device, weights_only=True))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    metadata.update({k: saved[k] for k in ("epochs", "best_epoch", "best_val_map_50")},
                    resumed_from_epoch=state["epoch"])
    log(f"resuming {metadata['train_view']}@{metadata['train_view_version']} from saved epoch {state['epoch']}")
    return state["epoch"]


def _end_epoch(model, spec: RunSpec, out: Path, metadata: dict, record: dict, saved_state: dict, writer,
               log: Log) -> None:
    """The leader's end of an epoch: validate, then write last.pt, best.pt, the state and metadata."""
    profile, epoch = spec.profile, record["epoch"]
    _save(model.state_dict(), out / LAST_FILE)
    record["val_map_50"] = val_map50(model, spec.val, batch_size=profile.batch_size) if spec.val else None
    best = metadata["best_val_map_50"]
    if best is None or (record["val_map_50"] or 0.0) > best or not (out / BEST_FILE).is_file():
        _save(model.state_dict(), out / BEST_FILE)
        metadata.update(best_epoch=epoch, best_val_map_50=record["val_map_50"])
    metadata["epochs"].append(record)
    _save({**saved_state, "epoch": epoch}, out / STATE_FILE)
    write_json(metadata, out / METADATA_FILE)
    if record["val_map_50"] is not None:
        writer.add_scalar("val/map_50", record["val_map_50"], epoch)
    log(f"epoch {epoch}/{profile.epochs} saved: loss {record['loss']:.4f}, "
        f"{record['images_per_s']:.2f} img/s, val mAP@0.5 {record['val_map_50']}")


def train(spec: RunSpec, out: Path, *, log: Log = print) -> dict:
    """Train (or resume, or reuse a finished run of) `spec` in folder `out`; returns the metadata.

    In a torch.distributed job every process calls it: each trains on its own positions of the
    epoch's order (`Process`), gradients are averaged by DDP, and only the leader validates and
    writes; the others wait for it at the end of each epoch."""
    import torch
    from torch.utils.tensorboard import SummaryWriter

    rows = loader.count_rows(spec.train)
    if rows == 0:
        raise ValueError(f"{spec.train.name}@{spec.train.version} has no training rows"
                         f"{f' matching {spec.train.where!r}' if spec.train.where else ''}")
    profile, process = spec.profile, Process.current()
    out.mkdir(parents=True, exist_ok=True)
    saved = _resume_point(out, spec)
    if saved and saved["status"] == "complete":
        log(f"{out} already holds this run (complete); nothing to train")
        return saved

    device = device_for(profile, process)
    amp = profile.amp and device.type == "cuda"
    torch.manual_seed(spec.seed)  # random init draws from the global RNG: same seed, same start
    model = build_detector(profile, spec.weights).to(device)
    epoch_steps = steps_per_epoch(-(-rows // process.world), profile)  # the schedule counts the longest shard
    optimizer, scheduler = _optimizer(model, profile, epoch_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    metadata = _new_metadata(spec, rows, device, amp, process)
    start_epoch = _resume(out, saved, model, optimizer, scheduler, scaler, metadata, device, log) if saved else 0
    weights = hard_examples.frame_weights(spec.train, spec.mining) if spec.mining else None
    network = process.wrap(model, device)
    writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR)) if process.leader else None
    try:
        for epoch in range(start_epoch, profile.epochs):
            record = _train_epoch(network, optimizer, scheduler, scaler, spec, epoch, device, amp, writer, log,
                                  weights, process, epoch_steps)
            if process.leader:
                state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict()}
                _end_epoch(model, spec, out, metadata, record, state, writer, log)
            process.barrier()
    finally:
        if writer is not None:
            writer.close()
    metadata["status"] = "complete"
    if process.leader:
        write_json(metadata, out / METADATA_FILE)
    return metadata


def _step(model, optimizer, scaler, batch, device, amp: bool, profile: Profile, where: str) -> float:
    """One optimiser step on `batch`; its loss. A non-finite loss stops before the weights move."""
    import torch

    inputs = loader.model_inputs(batch.images, device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in batch.targets]
    with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        loss = sum(model(inputs, targets).values())
    if not torch.isfinite(loss):  # as torchvision's reference: stop, and save nothing of this epoch
        raise NonFiniteLossError(f"loss is {float(loss.detach())} at {where}; stopped: last.pt and best.pt "
                                 f"keep the last completed epoch")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    torch.nn.utils.clip_grad_norm_(model.parameters(), profile.grad_clip_norm)
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


def _train_epoch(model, optimizer, scheduler, scaler, spec: RunSpec, epoch: int, device, amp: bool, writer,
                 log: Log, weights, process: Process, epoch_steps: int) -> dict:
    """One epoch of this process's positions. Processes whose shard is a batch shorter join DDP's
    uneven-input handling and then step their schedule on, so every rate stays the same."""
    import contextlib

    profile = spec.profile
    batches = epoch_loader(spec.train, profile, spec.seed, epoch, pin_memory=device.type == "cuda", weights=weights,
                           shard=(process.rank, process.world))
    own_steps = steps_per_epoch(len(batches.dataset), profile)
    model.train()
    losses, images, started, lr = [], 0, time.perf_counter(), optimizer.param_groups[0]["lr"]
    with model.join() if process.world > 1 else contextlib.nullcontext():
        for step, batch in zip(range(own_steps), batches):
            global_step = epoch * epoch_steps + step
            where = f"epoch {epoch + 1} step {step + 1} (global step {global_step + 1}, rank {process.rank})"
            lr = optimizer.param_groups[0]["lr"]  # this step's rate, before the schedule moves on
            losses.append(_step(model, optimizer, scaler, batch, device, amp, profile, where))
            scheduler.step()
            images += len(batch.images)
            rate = images / (time.perf_counter() - started)
            if writer is not None:
                for name, value in (("loss", losses[-1]), ("images_per_s", rate), ("lr", lr)):
                    writer.add_scalar(f"train/{name}", value, global_step)
            if (step + 1) % profile.log_every_steps == 0 or step + 1 == own_steps:
                log(f"epoch {epoch + 1} step {step + 1}/{own_steps}: loss {losses[-1]:.4f}, {rate:.2f} img/s")
    for _ in range(epoch_steps - len(losses)):  # a shorter shard: keep the schedule in step with the others
        scheduler.step()
    seconds = time.perf_counter() - started
    images, loss_sum, steps = process.sum([images, sum(losses), len(losses)])  # over every process
    return {"epoch": epoch + 1, "steps": len(losses), "images": int(images), "loss": loss_sum / max(1, steps),
            "seconds": round(seconds, 2), "images_per_s": images / seconds if seconds else 0.0, "lr": lr}


def run_summary(metadata: dict, out: Path) -> dict:
    """A run's metadata.json facts, flat: what its asset materialization shows."""
    epochs = metadata["epochs"]
    return {
        "checkpoint_dir": str(out), "weights": str(out / BEST_FILE),
        "train_view": metadata["train_view"], "train_view_version": metadata["train_view_version"],
        "train_filter": metadata["train_filter"] or "", "val_view": metadata["val_view"] or "",
        "val_view_version": metadata["val_view_version"], "source_table": metadata["source_table"],
        "source_table_version": metadata["source_table_version"], "dagster/row_count": metadata["train_rows"],
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


def load_checkpoint(checkpoint_dir: Path, which: str = BEST_FILE):
    """The trained model saved in `checkpoint_dir` (its profile comes from metadata.json)."""
    metadata = read_metadata(checkpoint_dir)
    profile = get_profile(**metadata["profile"])
    return build_detector(profile, str(Path(checkpoint_dir) / which))


def epoch_loader(view: loader.ViewRef, profile: Profile, seed: int, epoch: int, *, pin_memory: bool = False,
                 weights=None, shard: tuple[int, int] = (0, 1)):
    """The DataLoader of one training epoch: the view's rows in the order seeded by seed + epoch
    (drawn by `weights` when mining; a distributed rank's positions of it with `shard`),
    augmented with the torch RNG seeded the same way (in the main process with 0 workers)."""
    import torch

    torch.manual_seed(seed + epoch)
    return loader.make_loader(view, batch_size=profile.batch_size, seed=seed, epoch=epoch,
                              transform=loader.train_transform(profile.min_size, profile.max_size, profile.train_crop),
                              num_workers=profile.num_workers, pin_memory=pin_memory, weights=weights, shard=shard)


def recorded_view(metadata: dict, uri: str | None = None) -> loader.ViewRef:
    """The train view a checkpoint's metadata.json records, pinned to its version."""
    return loader.ViewRef(uri=uri or metadata["lancedb_uri"], name=metadata["train_view"],
                          version=metadata["train_view_version"], where=metadata["train_filter"])


def reproduce_order(metadata: dict, *, epoch: int = 0, uri: str | None = None, rank: int | None = None) -> list[str]:
    """The image ids of `epoch` in training order, read from the time-travelled view (and, for a
    mined run, the difficulty scores at their recorded version); with `rank`, that process's
    positions of it in a distributed run."""
    view = recorded_view(metadata, uri)
    mining = metadata.get("mining")
    weights = hard_examples.frame_weights(view, hard_examples.Mining(**mining)) if mining else None
    shard = (0, 1) if rank is None else (rank, metadata.get("world_size", 1))
    permutation = loader.build_permutation(view, metadata["seed"] + epoch, weights=weights, shard=shard)
    return permutation.__getitems__(list(range(permutation.num_rows))).column("image_id").to_pylist()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m avperception_assets.model.training")
    commands = parser.add_subparsers(dest="command", required=True)
    reproduce = commands.add_parser("reproduce", help="print the training order a checkpoint saw")
    reproduce.add_argument("checkpoint_dir", type=Path)
    reproduce.add_argument("--epoch", type=int, default=0, help="0-based epoch (default 0)")
    reproduce.add_argument("--uri", default=None, help="LanceDB location (default: the recorded one)")
    reproduce.add_argument("--rank", type=int, default=None, help="one process's positions of a distributed run")
    args = parser.parse_args(argv)
    metadata = read_metadata(args.checkpoint_dir)
    order = reproduce_order(metadata, epoch=args.epoch, uri=args.uri, rank=args.rank)
    of_rank = "" if args.rank is None else f" rank {args.rank} of {metadata.get('world_size', 1)}"
    print(f"# {metadata['train_view']}@{metadata['train_view_version']} seed {metadata['seed']} "
          f"epoch {args.epoch}{of_rank}: {len(order)} rows")
    print("\n".join(order))


if __name__ == "__main__":
    main()
