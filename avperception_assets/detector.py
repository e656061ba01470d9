"""Faster R-CNN factory: training profiles and weights sources, shared by training and evaluation.

A profile is the whole recipe (architecture, input size, optimiser, schedule). `gpu` is the
reference recipe; `cpu` is sized so the demo trains on a 2-core machine in minutes. A weights
source says where the starting weights come from: `coco` (torchvision's COCO weights, read
from the torch hub cache, never downloaded here), a local state_dict file, or `none`.
Heads always have 91 outputs (COCO category ids), see `bdd100k.COCO_IDS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bdd100k import NUM_COCO_CLASSES

WEIGHTS_COCO = "coco"
WEIGHTS_NONE = "none"


@dataclass(frozen=True)
class Profile:
    """A complete training recipe; every field is recorded in checkpoint metadata."""

    name: str
    architecture: str  # a torchvision.models.detection builder
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    lr_step_epochs: int  # StepLR step_size
    lr_gamma: float
    epochs: int
    amp: bool  # autocast + GradScaler (CUDA only)
    grad_clip_norm: float
    warmup_steps: int  # linear LR warm-up at the start of a fresh run
    min_size: int  # shorter image side fed to the network
    max_size: int
    trainable_backbone_layers: int | None  # None: torchvision's default for the weights
    max_steps_per_epoch: int | None  # None: whole view each epoch
    log_every_steps: int
    num_workers: int  # DataLoader worker processes (spawned)
    # A failure-mode fine-tune starts from the base detector and runs its own schedule.
    finetune_epochs: int
    finetune_lr: float
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra FasterRCNN arguments

    def replace(self, **changes) -> "Profile":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown profile fields {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def for_finetune(self) -> "Profile":
        """The fine-tune recipe: same model and input, the fine-tune epochs and LR, no warm-up."""
        return self.replace(epochs=self.finetune_epochs, lr=self.finetune_lr, warmup_steps=0)


PROFILES: dict[str, Profile] = {
    # The reference recipe (CUDA): ResNet50-FPN-v2, large batch, AMP.
    "gpu": Profile(
        name="gpu",
        architecture="fasterrcnn_resnet50_fpn_v2",
        batch_size=64,
        lr=0.04,
        momentum=0.9,
        weight_decay=1e-4,
        lr_step_epochs=3,
        lr_gamma=0.1,
        epochs=10,
        amp=True,
        grad_clip_norm=10.0,
        warmup_steps=100,
        min_size=720,
        max_size=1280,
        trainable_backbone_layers=None,
        max_steps_per_epoch=None,
        log_every_steps=20,
        num_workers=8,
        finetune_epochs=10,
        finetune_lr=0.04,
    ),
    # Small enough for a 2-core CPU: mobilenet backbone at 192x341 px (about the 320x180 that
    # DESIGN.md measured at ~2.7 img/s for batch 8), fewer RPN/RoI samples, and short epochs
    # (25 steps) so the generic model takes ~4 min and each fine-tune ~1.5 min.
    "cpu": Profile(
        name="cpu",
        architecture="fasterrcnn_mobilenet_v3_large_320_fpn",
        batch_size=8,
        lr=0.02,
        momentum=0.9,
        weight_decay=1e-4,
        lr_step_epochs=100,  # i.e. a constant LR over the short CPU schedule
        lr_gamma=0.1,
        epochs=3,
        amp=False,
        grad_clip_norm=10.0,
        warmup_steps=10,
        min_size=192,
        max_size=342,
        trainable_backbone_layers=None,
        max_steps_per_epoch=25,
        log_every_steps=5,
        num_workers=0,  # 2 cores: decoding in the main process beats sharing them with workers
        finetune_epochs=3,
        finetune_lr=0.01,
        model_kwargs={
            "rpn_pre_nms_top_n_train": 600,
            "rpn_post_nms_top_n_train": 300,
            "rpn_batch_size_per_image": 128,
            "box_batch_size_per_image": 64,
            "box_detections_per_img": 50,
        },
    ),
}


def default_profile_name() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def get_profile(name: str | None = None, **overrides) -> Profile:
    """The named profile (default: by device) with `overrides` applied (None values ignored)."""
    name = name or default_profile_name()
    if name not in PROFILES:
        raise ValueError(f"unknown training profile {name!r}; expected one of {sorted(PROFILES)}")
    return PROFILES[name].replace(**{k: v for k, v in overrides.items() if v is not None})


def _weights_enum(architecture: str):
    from torchvision.models import get_model_weights

    weights = get_model_weights(architecture)
    return weights.COCO_V1


def coco_weights_path(architecture: str) -> Path:
    """Where torchvision's hub cache keeps the COCO weights of `architecture`."""
    import torch

    url = _weights_enum(architecture).url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def check_weights_source(weights: str, architecture: str) -> None:
    """Fail early, naming the missing file, when the starting weights are not on disk."""
    if weights == WEIGHTS_NONE:
        return
    if weights == WEIGHTS_COCO:
        path = coco_weights_path(architecture)
        if not path.is_file():
            raise FileNotFoundError(
                f"COCO weights for {architecture} are not in the torch hub cache: expected {path}. "
                "This machine cannot download them; copy the file there (or set TORCH_HOME), "
                "or use weights='none' or a local state_dict file."
            )
        return
    if not Path(weights).is_file():
        raise FileNotFoundError(
            f"weights source {weights!r} is neither 'coco', 'none' nor an existing state_dict file"
        )


def build_detector(profile: Profile, weights: str = WEIGHTS_NONE):
    """A Faster R-CNN for `profile` with 91 COCO outputs, initialised from `weights`."""
    import torch
    from torchvision.models import get_model

    check_weights_source(weights, profile.architecture)
    kwargs = dict(profile.model_kwargs, min_size=profile.min_size, max_size=profile.max_size)
    if weights == WEIGHTS_COCO:
        model = get_model(profile.architecture, weights=_weights_enum(profile.architecture),
                          trainable_backbone_layers=profile.trainable_backbone_layers, **kwargs)
    else:
        model = get_model(profile.architecture, weights=None, weights_backbone=None,
                          num_classes=NUM_COCO_CLASSES, **kwargs)
        if weights != WEIGHTS_NONE:
            load_weights(model, torch.load(weights, map_location="cpu", weights_only=True))
    return model


def load_weights(model, state_dict: dict) -> None:
    """Load a state_dict saved by this project into `model`.

    A model started from COCO weights uses frozen batch norm (no `num_batches_tracked`
    buffers); a randomly initialised one uses BatchNorm2d. Both hold the same statistics,
    so those buffers may be missing; any other mismatch is an error.
    """
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"state_dict does not fit {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]} (was it saved with another profile?)"
        )
