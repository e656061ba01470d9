"""The training engine, in the manner of torchvision's `references/detection/engine.py`.

`TrainState` is what an epoch steps: the model, its optimiser, LR schedule and grad scaler, the
device, the profile they follow and the epochs done. `train_one_epoch(state, batches)` runs one
epoch of optimiser steps over a loader's batches; `evaluate(model, batches)` gives a model's
mAP@0.5 on a loader's batches. `training.train` builds the state, the loaders and the checkpoint
folder around them; a benchmark or a notebook can drive them directly.

In a torch.distributed job (`Process`) each process steps its own shard of an epoch's batches,
DistributedDataParallel averages the gradients, and an epoch's record sums over the processes.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from avperception_assets.model import loader
from avperception_assets.model.detections import compute_metrics, predict
from avperception_assets.model.detector import Profile

Log = Callable[[str], None]


class NonFiniteLossError(FloatingPointError):
    """The loss of a step is NaN or infinite: the run stops before it reaches the weights."""


@dataclass(frozen=True)
class Process:
    """Where this process sits in a run: rank and world size of a torch.distributed job
    (torchrun sets them; `training_worker` joins the group), (0, 1) when training alone, and
    which rank leads."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    leader_rank: int = 0

    @classmethod
    def current(cls, asks_to_lead: bool = False) -> "Process":
        """This process in the joined group (every rank calls it: the ranks agree on the leader).
        The leader is the lowest rank that asks to lead, else rank 0: c10d's rendezvous ranks
        nodes by host name and launcher pid, so the process that must report to the Dagster run
        asks to lead wherever its node was ranked."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        rank, world = dist.get_rank(), dist.get_world_size()
        asking = torch.tensor([rank if asks_to_lead else world])
        dist.all_reduce(asking, op=dist.ReduceOp.MIN)
        leader = int(asking.item())
        return cls(rank, world, int(os.environ.get("LOCAL_RANK", "0")), leader if leader < world else 0)

    @property
    def leader(self) -> bool:
        """The one that validates, writes checkpoints and reports (`leader_rank`)."""
        return self.rank == self.leader_rank

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


def device_for(profile: Profile, process: Process | None = None):
    """The process's device: its local GPU under the gpu profile when CUDA is there, else the CPU."""
    import torch

    if torch.cuda.is_available() and profile.name != "cpu":
        return torch.device("cuda", process.local_rank if process else 0)
    return torch.device("cpu")


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


@dataclass
class TrainState:
    """What an epoch steps. `model` is what is saved and validated; `network` is what the
    optimiser steps (the same module, or DistributedDataParallel around it across a world)."""

    model: Any
    network: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    device: Any
    profile: Profile
    epoch_steps: int  # schedule steps an epoch: the longest shard's, so every process's rates agree
    process: Process
    epoch: int = 0  # epochs done: the next epoch to train, 0-based

    @classmethod
    def create(cls, model, profile: Profile, device, epoch_steps: int,
               process: Process = Process()) -> "TrainState":
        """SGD with momentum over `model`'s trainable parameters, its `lr_schedule`, and a grad
        scaler (enabled for AMP, which runs on CUDA only)."""
        import torch

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=profile.lr, momentum=profile.momentum,
                                    weight_decay=profile.weight_decay)
        scaler = torch.amp.GradScaler(device.type, enabled=profile.amp and device.type == "cuda")
        return cls(model, process.wrap(model, device), optimizer, lr_schedule(optimizer, profile, epoch_steps),
                   scaler, device, profile, epoch_steps, process)

    @property
    def amp(self) -> bool:
        return self.scaler.is_enabled()

    def state_dict(self) -> dict:
        """What resuming needs besides the weights."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = state["epoch"]


def train_step(state: TrainState, batch: loader.Batch, where: str) -> float:
    """One optimiser step on `batch` (AMP autocast, scaled backward, the grad-norm clip); its loss.
    A non-finite loss stops before the weights move, naming `where` it happened."""
    import torch

    inputs = loader.model_inputs(batch.images, state.device)
    targets = [{k: v.to(state.device) for k, v in t.items()} for t in batch.targets]
    with torch.autocast(state.device.type, dtype=torch.float16, enabled=state.amp):
        loss = sum(state.network(inputs, targets).values())
    if not torch.isfinite(loss):  # as torchvision's reference: stop, and save nothing of this epoch
        raise NonFiniteLossError(f"loss is {float(loss.detach())} at {where}; stopped: last.pt and best.pt "
                                 f"keep the last completed epoch")
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.unscale_(state.optimizer)  # clip the true gradients, not the scaled ones
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), state.profile.grad_clip_norm)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return float(loss.detach())


def train_one_epoch(state: TrainState, batches, *, log: Log = print, writer=None) -> dict:
    """Train epoch `state.epoch` on `batches` (a sized iterable of `loader.Batch`, this process's
    shard of the epoch's order, at most `state.epoch_steps` of them are used); returns the
    epoch's record, summed over the processes, and counts the epoch done.

    The LR schedule steps once per optimiser step. A process whose shard is a batch shorter
    joins DDP's uneven-input handling and then steps its schedule on, so every rate stays the
    same. `writer` (a TensorBoard SummaryWriter) gets each step's loss, images/s and LR."""
    profile, process, epoch = state.profile, state.process, state.epoch
    own_steps = min(len(batches), state.epoch_steps)
    state.network.train()
    losses, images, started, lr = [], 0, time.perf_counter(), state.optimizer.param_groups[0]["lr"]
    with state.network.join() if process.world > 1 else contextlib.nullcontext():
        for step, batch in zip(range(own_steps), batches):
            global_step = epoch * state.epoch_steps + step
            where = f"epoch {epoch + 1} step {step + 1} (global step {global_step + 1}, rank {process.rank})"
            lr = state.optimizer.param_groups[0]["lr"]  # this step's rate, before the schedule moves on
            losses.append(train_step(state, batch, where))
            state.scheduler.step()
            images += len(batch.images)
            rate = images / (time.perf_counter() - started)
            if writer is not None:
                for name, value in (("loss", losses[-1]), ("images_per_s", rate), ("lr", lr)):
                    writer.add_scalar(f"train/{name}", value, global_step)
            if (step + 1) % profile.log_every_steps == 0 or step + 1 == own_steps:
                log(f"epoch {epoch + 1} step {step + 1}/{own_steps}: loss {losses[-1]:.4f}, {rate:.2f} img/s")
    for _ in range(state.epoch_steps - len(losses)):  # a shorter shard: keep the schedule in step with the others
        state.scheduler.step()
    seconds = time.perf_counter() - started
    images, loss_sum, steps = process.sum([images, sum(losses), len(losses)])  # over every process
    state.epoch += 1
    return {"epoch": epoch + 1, "steps": len(losses), "images": int(images), "loss": loss_sum / max(1, steps),
            "seconds": round(seconds, 2), "images_per_s": images / seconds if seconds else 0.0, "lr": lr}


def evaluate(model, batches) -> float | None:
    """mAP@0.5 of `model` on every frame of `batches` (COCO protocol, as the evaluation reports);
    None when they hold no frame."""
    predictions, targets = [], []
    for batch in batches:
        predictions.extend(predict(model, batch.images))
        targets.extend(batch.targets)
    if not targets:
        return None
    return compute_metrics(predictions, targets, {})["map_50"]
