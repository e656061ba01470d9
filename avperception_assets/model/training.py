"""Faster R-CNN training on one pinned view version: a run of the engine into a checkpoint folder,
and the reproduction of its data order.

Plain Python (no Dagster). `train(recipe, out)` trains `recipe` (`recipe.Recipe`) with the
engine (`engine.train_one_epoch`, then `engine.evaluate` on the view's selection share, frames
held out from training, after each epoch) into the folder `out` (`checkpoints`): the same
recipe resumes from its last saved epoch, a finished one is reused, and a newer view version
gets a new folder and starts fresh from the starting weights.

Every epoch's order is a LanceDB shuffle seeded by seed + epoch or, with per-frame sampling
weights (e.g. from hard-example mining), a draw in proportion to them seeded the same way; the
folder keeps the weights, so `reproduce` rebuilds the exact order from it. The frames a run
trains on are those its clip draw (`clip_draws`) draws; metadata.json records how many of how
many, with a digest of their ids, and `reproduce` stops with `DrawMismatch` when the
time-travelled view draws others.

CLI: `python -m avperception_assets.model.training reproduce <checkpoint dir> [--epoch N]` prints the
image ids of that epoch in training order, read from the time-travelled view; with `--selection`,
the frames held out to choose its best epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path

from avperception_assets.model import checkpoints, clip_draws, loader
from avperception_assets.model.detector import Profile, build_detector
from avperception_assets.model.engine import Log, Process, TrainState, device_for, evaluate, train_one_epoch
from avperception_assets.model.recipe import Recipe
from avperception_assets.storage import tables as storage


class DrawMismatch(ValueError):
    """The frames a checkpoint's recipe draws today are not the ones its run recorded."""


def drawn_frames(view: loader.ViewRef) -> tuple[list[str], int]:
    """The image ids `view` draws (its clip draw's), and how many rows it held before drawing."""
    drawn = loader.image_ids(view)
    return drawn, (len(drawn) if view.draw is None else loader.count_rows(dataclasses.replace(view, draw=None)))


def steps_per_epoch(rows: int, profile: Profile) -> int:
    batches = -(-rows // profile.batch_size)  # the loader keeps the last, partial batch
    return batches if profile.max_steps_per_epoch is None else min(batches, profile.max_steps_per_epoch)


def epoch_loader(view: loader.ViewRef, profile: Profile, seed: int, epoch: int, *, pin_memory: bool = False,
                 weights: Mapping[str, float] | None = None, shard: tuple[int, int] = (0, 1)):
    """The DataLoader of one training epoch: the view's rows in the order seeded by seed + epoch
    (drawn by `weights` when given; a distributed rank's positions of it with `shard`),
    augmented with the torch RNG seeded the same way (in the main process with 0 workers)."""
    import torch

    torch.manual_seed(seed + epoch)
    return loader.make_loader(view, batch_size=profile.batch_size, seed=seed, epoch=epoch,
                              transform=loader.train_transform(profile.min_size, profile.max_size, profile.train_crop),
                              num_workers=profile.num_workers, pin_memory=pin_memory, weights=weights, shard=shard)


def train(recipe: Recipe, out: Path, *, sample_weights: Mapping[str, float] | None = None,
          log: Log = print, asks_to_lead: bool = False) -> dict:
    """Train (or resume, or reuse a finished run of) `recipe` in folder `out`; returns the metadata.

    The run trains on the view's rows outside its selection share and keeps as best.pt the epoch
    that share scores best (`recipe.Recipe.selection`). `sample_weights` (image id -> weight,
    every frame trained on): each epoch draws as many frames as it trains on, with replacement,
    in proportion to them; `recipe.mining` records how they were made. In a torch.distributed job
    every process calls it: each trains on its own positions of the epoch's order
    (`engine.Process`), gradients are averaged by DDP, and only the leader scores the selection
    share and writes; the others wait for it at the end of each epoch. The leader is the lowest
    rank whose call `asks_to_lead` (the one reporting to Dagster), else rank 0."""
    import torch
    from torch.utils.tensorboard import SummaryWriter

    if (sample_weights is None) != (recipe.mining is None):  # else a resume could mix weighted and plain epochs
        raise ValueError("a run drawn by sampling weights records how they were made in recipe.mining, and a run "
                         "that records mining needs its sampling weights")
    train_view, profile, process = recipe.train, recipe.profile, Process.current(asks_to_lead)
    drawn, before_draw = drawn_frames(train_view)
    rows = len(drawn)
    if rows == 0:
        held_out = (f" outside its {recipe.selection_pct}% selection share (a lower selection_pct holds out fewer)"
                    if recipe.selection_pct else "")
        raise ValueError(f"{train_view.name}@{train_view.version} has no training rows"
                         f"{f' matching {train_view.where!r}' if train_view.where else ''}{held_out}"
                         f"{f' drawn by {recipe.clip_draw}' if train_view.draw else ''}")
    selection_rows = loader.count_rows(recipe.selection) if recipe.selection else 0
    selection = recipe.selection if selection_rows else None
    if recipe.selection_pct and not selection_rows:
        log(f"{train_view.name}@{train_view.version}: its {recipe.selection_pct}% selection share holds no frame; "
            f"best = last epoch")
    out.mkdir(parents=True, exist_ok=True)
    saved = checkpoints.resume_point(out, recipe)
    if saved and saved["status"] == checkpoints.COMPLETE:
        log(f"{out} already holds this run (complete); nothing to train")
        return saved

    device = device_for(profile, process)
    torch.manual_seed(recipe.seed)  # random init draws from the global RNG: same seed, same start
    model = build_detector(profile, recipe.weights_source).to(device)
    # The schedule counts the longest shard's steps.
    state = TrainState.create(model, profile, device, steps_per_epoch(-(-rows // process.world), profile), process)
    metadata = checkpoints.new_metadata(
        recipe, train_rows=rows, selection_rows=selection_rows, device=device, amp=state.amp,
        draw=(before_draw, clip_draws.digest(drawn)),
        world_size=process.world, source=storage.source_table_version(train_view.uri, train_view.name,
                                                                      train_view.version))
    if saved:
        checkpoints.resume(out, saved, state, metadata)
        log(f"resuming {train_view.name}@{train_view.version} from saved epoch {state.epoch}")
    writer = None
    if process.leader:
        checkpoints.write_sample_weights(out, sample_weights)
        writer = SummaryWriter(log_dir=str(out / checkpoints.TENSORBOARD_DIR))
    try:
        while state.epoch < profile.epochs:
            batches = epoch_loader(train_view, profile, recipe.seed, state.epoch, pin_memory=device.type == "cuda",
                                   weights=sample_weights, shard=(process.rank, process.world))
            record = train_one_epoch(state, batches, log=log, writer=writer)
            if process.leader:
                _end_epoch(state, selection, out, metadata, record, writer, log)
            process.barrier()
    finally:
        if writer is not None:
            writer.close()
    metadata["status"] = checkpoints.COMPLETE
    if process.leader:
        checkpoints.write_json(metadata, out / checkpoints.METADATA_FILE)
    return metadata


def _end_epoch(state: TrainState, selection: loader.ViewRef | None, out: Path, metadata: dict, record: dict,
               writer, log: Log) -> None:
    """The leader's end of an epoch: score the selection share (if any), then save the checkpoint files."""
    record["val_map_50"] = evaluate(state.model, loader.make_loader(selection, batch_size=state.profile.batch_size)) \
        if selection else None
    checkpoints.save_epoch(out, state, metadata, record)
    if record["val_map_50"] is not None:
        writer.add_scalar("selection/map_50", record["val_map_50"], record["epoch"])
    log(f"epoch {record['epoch']}/{state.profile.epochs} saved: loss {record['loss']:.4f}, "
        f"{record['images_per_s']:.2f} img/s, selection mAP@0.5 {record['val_map_50']}")


def reproduce_order(checkpoint_dir: Path, *, epoch: int = 0, uri: str | None = None,
                    rank: int | None = None) -> list[str]:
    """The image ids of `epoch` in training order, read from the time-travelled view (drawn by
    the sampling weights the folder keeps, for a run that had them); with `rank`, that process's
    positions of it in a distributed run."""
    metadata = checkpoints.read_metadata(checkpoint_dir)
    recipe = Recipe.from_dict(metadata, uri=uri)
    check_draw(recipe, metadata)
    weights = checkpoints.read_sample_weights(checkpoint_dir)
    if recipe.mining and weights is None:  # mined by code up to c618fc9, which kept no weights
        raise FileNotFoundError(
            f"{checkpoint_dir} drew frames by mined weights but holds no {checkpoints.SAMPLE_WEIGHTS_FILE}; "
            f"`python -m avperception_assets.discovery.hard_examples weights {checkpoint_dir}` rebuilds it "
            f"from the recorded mining")
    shard = (0, 1) if rank is None else (rank, metadata.get("world_size", 1))
    permutation = loader.build_permutation(recipe.train, recipe.seed + epoch, weights=weights, shard=shard)
    return permutation.__getitems__(list(range(permutation.num_rows))).column("image_id").to_pylist()


def check_draw(recipe: Recipe, metadata: Mapping) -> None:
    """Raise `DrawMismatch` when the frames `recipe` draws from its time-travelled view are not
    those its run recorded (a folder from before the record has nothing to check)."""
    recorded = metadata.get(checkpoints.DRAWN_DIGEST)
    if recorded is None:
        return
    drawn, before_draw = drawn_frames(recipe.train)
    now = (before_draw, len(drawn), clip_draws.digest(drawn))
    then = (metadata[checkpoints.FRAMES_BEFORE_DRAW], metadata["train_rows"], recorded)
    if now != then:
        raise DrawMismatch(
            f"{recipe.train_view}@{recipe.train_view_version} clip draw {recipe.clip_draw!r} now draws {now[1]} of "
            f"{now[0]} frames (ids sha256 {now[2][:12]}), but the run recorded {then[1]} of {then[0]} "
            f"({then[2][:12]}): the view's rows at that version or the draw's code changed since")


def selection_frames(checkpoint_dir: Path, *, uri: str | None = None) -> list[str]:
    """The image ids held out to choose the checkpoint's best epoch, read from the time-travelled
    view by its recorded rule and share (none for a run that held none out)."""
    recipe = Recipe.from_dict(checkpoints.read_metadata(checkpoint_dir), uri=uri)
    return loader.image_ids(recipe.selection) if recipe.selection else []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m avperception_assets.model.training")
    commands = parser.add_subparsers(dest="command", required=True)
    reproduce = commands.add_parser("reproduce", help="print the training order a checkpoint saw")
    reproduce.add_argument("checkpoint_dir", type=Path)
    reproduce.add_argument("--epoch", type=int, default=0, help="0-based epoch (default 0)")
    reproduce.add_argument("--uri", default=None, help="LanceDB location (default: the recorded one)")
    reproduce.add_argument("--rank", type=int, default=None, help="one process's positions of a distributed run")
    reproduce.add_argument("--selection", action="store_true",
                           help="print the frames held out to choose the best epoch instead")
    args = parser.parse_args(argv)
    metadata = checkpoints.read_metadata(args.checkpoint_dir)
    if args.selection:
        held_out = selection_frames(args.checkpoint_dir, uri=args.uri)
        print(f"# {metadata['train_view']}@{metadata['train_view_version']} selection share "
              f"({metadata.get('selection_pct')}%): {len(held_out)} rows")
        print("\n".join(held_out))
        return
    order = reproduce_order(args.checkpoint_dir, epoch=args.epoch, uri=args.uri, rank=args.rank)
    of_rank = "" if args.rank is None else f" rank {args.rank} of {metadata.get('world_size', 1)}"
    print(f"# {metadata['train_view']}@{metadata['train_view_version']} seed {metadata['seed']} "
          f"epoch {args.epoch}{of_rank}: {len(order)} rows (clip draw {metadata.get('clip_draw', clip_draws.ALL)})")
    print("\n".join(order))


if __name__ == "__main__":
    main()
