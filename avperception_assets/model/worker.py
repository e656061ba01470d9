"""The training processes: torchrun starts one per rank, and the training assets start torchrun
through Dagster Pipes.

    python -m avperception_assets.training_worker launch <run.json> <out> [torchrun options]
        torchrun (`torch.distributed.run`) in this process, made to die with its parent, so a
        killed Dagster run never leaves a trainer writing checkpoints behind it;
    python -m avperception_assets.training_worker train <run.json> <out>
        one rank (what torchrun runs): joins the process group (gloo on the CPU, NCCL on GPUs)
        when there is more than one, trains the recipe in run.json, drawing frames by the
        sampling weights beside it when there are any (`checkpoints.write_run`), into `out`.
        The first process torchrun starts through Pipes (local rank 0 of the Dagster run's node)
        leads, whatever global rank the rendezvous gave it: it validates, writes the checkpoint,
        streams its log lines to the run and reports the checkpoint's metadata as the asset's
        materialization. Without Pipes (a node an operator started, a plain launch), rank 0 leads.

Knows nothing of Dagster but the Pipes protocol (`dagster_pipes`).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path

from avperception_assets.model import checkpoints, training
from avperception_assets.model.engine import NonFiniteLossError, device_for
from avperception_assets.model.recipe import Recipe

# How each field of the materialization reaches Dagster (others are inferred from the value).
PIPES_TYPES = {"checkpoint_dir": "path", "weights": "path", "hyper_parameters": "json", "epoch_loss": "json",
               "epoch_val_map_50": "json", "mining": "json"}


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that started it dies (prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def backend(recipe: Recipe) -> str:
    # On CUDA, NCCL for the gradients and gloo for the small CPU tensors of `engine.Process`
    # (the leader vote, summed losses), which a NCCL-only group rejects.
    return "cpu:gloo,cuda:nccl" if device_for(recipe.profile).type == "cuda" else "gloo"


def _pipes_metadata(summary: dict) -> dict:
    return {key: {"raw_value": value, "type": PIPES_TYPES.get(key, "__infer__")} for key, value in summary.items()}


def reports_to_dagster() -> bool:
    """Whether this process is the one of its job that reports to a Dagster run through Pipes."""
    return "DAGSTER_PIPES_CONTEXT" in os.environ and os.environ.get("LOCAL_RANK", "0") == "0"


def _run(recipe: Recipe, weights: dict[str, float] | None, out: Path, rank: int) -> None:
    if reports_to_dagster():
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            metadata = training.train(recipe, out, sample_weights=weights, log=pipes.log.info, asks_to_lead=True)
            pipes.report_asset_materialization(metadata=_pipes_metadata(checkpoints.run_summary(metadata, out)))
    else:
        training.train(recipe, out, sample_weights=weights, log=lambda line: print(f"[rank {rank}] {line}", flush=True))


def train(run_file: Path, out: Path) -> None:
    import torch.distributed as dist

    die_with_parent()
    recipe, weights = checkpoints.read_run(run_file)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group(backend(recipe))
    rank = int(os.environ.get("RANK", "0"))
    try:
        _run(recipe, weights, out, rank)
    except (NonFiniteLossError, ValueError) as exc:  # the run's own error: a retry would meet it again
        (out / checkpoints.FAILURE_FILE).write_text(json.dumps({"rank": rank, "message": str(exc)}))
        raise
    finally:
        if distributed:
            dist.destroy_process_group()


def launch(torchrun_args: list[str]) -> None:
    from torch.distributed.run import main as torchrun

    die_with_parent()
    torchrun(torchrun_args)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command, run_file, out, *rest = argv
    if command == "train":
        train(Path(run_file), Path(out))
    elif command == "launch":
        launch([*rest, "-m", "avperception_assets.training_worker", "train", run_file, out])
    else:
        raise SystemExit(f"unknown command {command!r}: expected launch or train")
