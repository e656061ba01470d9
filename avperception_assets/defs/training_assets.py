"""Training as Dagster assets (group `training`): `base_detector` and one `<mode>_checkpoint` per mode.

`base_detector` is the generic starting point: COCO weights when they are available (recorded,
not retrained), otherwise a detector trained on the whole train split of `bdd100k`. Each
`<mode>_checkpoint` fine-tunes it on `bdd100k_<mode>_train` at the view's current version,
keeps the best epoch by mAP@0.5 on `bdd100k_<mode>_val`, and saves under
`checkpoints/<mode>/<view version>/`. Runs go through the `training` concurrency pool.
The recipe (profile, weights, seed, schedule overrides, hard-example mining) is run config.
Torch is imported inside the asset bodies only.
"""

import dataclasses
from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field

from .. import settings
from ..failure_modes import FAILURE_MODES, FailureMode, check_registry
from ..slices import view_name
from ..storage import FRAMES_TABLE
from .names import BASE_DETECTOR, RAW_FRAMES, TRAINING, TRAINING_POOL, checkpoint_key, latest_metadata, view_key
from .resources import LanceDBResource

AUTO_WEIGHTS = "auto"


def base_checkpoints_dir() -> Path:
    """Where base_detector's checkpoints live (one folder per train-view version)."""
    return settings.checkpoints_dir() / "base"


class TrainingConfig(dg.Config):
    """Run config of the training assets; unset fields keep the profile's values."""

    profile: Optional[str] = Field(None, description="'gpu' or 'cpu'; default: gpu when CUDA is available.")
    weights: str = Field(AUTO_WEIGHTS, description="base_detector's starting weights: 'coco' (torch hub "
                         "cache), 'none', or a state_dict file; 'auto': coco when cached, else none.")
    seed: int = Field(0, description="Seeds the data order (LanceDB shuffle per epoch) and augmentation.")
    epochs: Optional[int] = Field(None, description="Override the profile's (fine-tune) epochs.")
    batch_size: Optional[int] = None
    lr: Optional[float] = Field(None, description="Override the profile's (fine-tune) learning rate.")
    max_steps_per_epoch: Optional[int] = None
    min_size: Optional[int] = Field(None, description="Shorter image side fed to the network.")
    max_size: Optional[int] = None
    num_workers: Optional[int] = None

    def resolve_profile(self, finetune: bool, min_input_size: int | None = None):
        """The profile, as a fine-tune if asked, raised to a mode's input size, then this config's overrides."""
        from ..detector import get_profile

        profile = get_profile(self.profile)
        if finetune:
            profile = profile.for_finetune()
        return profile.with_min_input(min_input_size).replace(**{k: v for k, v in {
            "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
            "max_steps_per_epoch": self.max_steps_per_epoch, "min_size": self.min_size,
            "max_size": self.max_size, "num_workers": self.num_workers}.items() if v is not None})

    def resolve_weights(self, architecture: str) -> str:
        from ..detector import WEIGHTS_COCO, WEIGHTS_NONE, coco_weights_path

        if self.weights != AUTO_WEIGHTS:
            return self.weights
        return WEIGHTS_COCO if coco_weights_path(architecture).is_file() else WEIGHTS_NONE


def _uri(lancedb: LanceDBResource) -> str:
    return lancedb.uri or settings.lancedb_uri()


def _run_metadata(metadata: dict, out: Path, weights_file: str) -> dict:
    """The checkpoint's metadata.json facts as Dagster metadata."""
    epochs = metadata["epochs"]
    return {
        "checkpoint_dir": dg.MetadataValue.path(str(out)),
        "weights": dg.MetadataValue.path(weights_file),
        "train_view": metadata["train_view"],
        "train_view_version": metadata["train_view_version"],
        "train_filter": metadata["train_filter"] or "",
        "val_view": metadata["val_view"] or "",
        "val_view_version": metadata["val_view_version"],
        "source_table": metadata["source_table"],
        "source_table_version": metadata["source_table_version"],
        "dagster/row_count": metadata["train_rows"],
        "profile": metadata["profile"]["name"],
        "hyper_parameters": dg.MetadataValue.json(metadata["profile"]),
        "weights_source": metadata["weights_source"],
        "seed": metadata["seed"],
        "code_version": metadata["code_version"],
        "device": metadata["device"],
        "resumed_from_epoch": metadata["resumed_from_epoch"],
        "best_epoch": metadata["best_epoch"],
        "best_val_map_50": metadata["best_val_map_50"],
        "epoch_loss": dg.MetadataValue.json([round(e["loss"], 4) for e in epochs]),
        "epoch_val_map_50": dg.MetadataValue.json([e["val_map_50"] for e in epochs]),
        "images_per_s": round(epochs[-1]["images_per_s"], 2) if epochs else None,
        "train_seconds": round(sum(e["seconds"] for e in epochs), 1),
    }


def _train(context, spec, out: Path) -> dict:
    from .. import training

    try:
        return training.train(spec, out, log=context.log.info)
    except (ValueError, FileNotFoundError, training.NonFiniteLossError) as exc:
        raise dg.Failure(str(exc)) from exc


@dg.asset(
    key=BASE_DETECTOR,
    group_name=TRAINING,
    deps=[RAW_FRAMES],
    pool=TRAINING_POOL,
    kinds={"pytorch"},
    description="The generic detector every fine-tune starts from: COCO weights when cached, "
                "else Faster R-CNN trained on the whole train split of bdd100k (best by val mAP@0.5).",
)
def base_detector(context: dg.AssetExecutionContext, config: TrainingConfig,
                  lancedb: LanceDBResource) -> dg.MaterializeResult:
    from .. import loader, training
    from ..detector import WEIGHTS_COCO, check_weights_source, coco_weights_path

    profile = config.resolve_profile(finetune=False)
    weights = config.resolve_weights(profile.architecture)
    try:
        check_weights_source(weights, profile.architecture)
    except FileNotFoundError as exc:
        raise dg.Failure(str(exc)) from exc
    if weights == WEIGHTS_COCO:
        path = coco_weights_path(profile.architecture)
        return dg.MaterializeResult(metadata={
            "weights": WEIGHTS_COCO, "weights_file": dg.MetadataValue.path(str(path)),
            "profile": profile.name, "architecture": profile.architecture,
            "note": "COCO-pretrained weights are the base; nothing trained",
        })
    uri = _uri(lancedb)
    train_view = loader.pin_view(uri, FRAMES_TABLE, where="split = 'train'")
    spec = training.RunSpec(
        train=train_view, val=loader.ViewRef(uri, FRAMES_TABLE, train_view.version, "split = 'val'"),
        profile=profile, weights=weights, seed=config.seed)
    out = base_checkpoints_dir() / str(train_view.version)
    metadata = _train(context, spec, out)
    best = str(out / training.BEST_FILE)
    return dg.MaterializeResult(metadata={**_run_metadata(metadata, out, best), "weights": best})


def base_weights(context: dg.AssetExecutionContext) -> str:
    """The weights the latest base_detector materialization recorded ('coco' or a file)."""
    recorded = latest_metadata(context.instance, BASE_DETECTOR)
    if recorded is None:
        raise dg.Failure("base_detector has not been materialized; materialize it first")
    weights = recorded["weights"]
    if weights != "coco" and not Path(weights).is_file():
        raise dg.Failure(f"base_detector weights {weights} are gone; rematerialize base_detector")
    return weights


def base_model(context: dg.AssetExecutionContext, profile: dict):
    """The base detector at a fine-tune's profile (`training.starting_model`) and what a report
    or a checkpoint records about it."""
    from .. import training

    model, info = training.starting_model(base_weights(context), profile)
    return model, {"source": "base_detector", **info}


class FineTuneConfig(TrainingConfig):
    """A fine-tune's run config: the training recipe and hard-example mining."""

    hard_example_mining: bool = Field(False, description="Sample train frames by how hard base_detector finds "
                                      "them (scored once per frame and base model, in <mode>_difficulty).")
    mining_boost: float = Field(1.0, description="A frame's weight is 1 + boost x its difficulty (misses, "
                                "confident false positives and weak matches on the mode's classes).")
    mining_neighbors: int = Field(4, description="Each of the hardest frames also up-weights this many of its "
                                  "nearest train frames by embedding (0: off).")
    mining_query_fraction: float = Field(0.1, description="The share of frames with any difficulty, hardest "
                                         "first, whose neighbours are up-weighted.")


def _mining(context, config: FineTuneConfig, mode: FailureMode, lancedb: LanceDBResource, spec):
    """Score the train view's new frames with the base detector at the fine-tune's input size;
    the sampling the run records, and how many frames were scored."""
    from .. import hard_examples

    profile = spec.profile
    model, info = base_model(context, profile.as_dict())
    key = hard_examples.model_key(info["digest"], profile.min_size, profile.max_size)
    stats = hard_examples.score_view(lancedb.connect(), mode.name, spec.train, mode.classes, model, key,
                                     batch_size=profile.batch_size, log=context.log.info)
    context.log.info(f"{mode.name}: {stats.scored} frames scored, {stats.already_scored} already scored with {key}")
    mining = hard_examples.Mining(stats.table, stats.version, key, config.mining_boost, config.mining_neighbors,
                                  config.mining_query_fraction)
    return mining, {"frames_scored": stats.scored, "frames_already_scored": stats.already_scored}


def build_checkpoint_asset(mode: FailureMode) -> dg.AssetsDefinition:
    train_name, val_name = view_name(mode, "train"), view_name(mode, "val")

    @dg.asset(
        key=checkpoint_key(mode),
        group_name=TRAINING,
        deps=[view_key(mode, "train"), view_key(mode, "val"), BASE_DETECTOR],
        pool=TRAINING_POOL,
        kinds={"pytorch"},
        metadata={"failure_mode": mode.name, "train_view": train_name, "val_view": val_name},
        description=f"Faster R-CNN fine-tuned from base_detector on {train_name}, pinned to the view "
                    f"version it saw; best epoch by mAP@0.5 on {val_name}. Run config "
                    f"`hard_example_mining: true` draws frames by how hard base_detector finds them.",
    )
    def _checkpoint(context: dg.AssetExecutionContext, config: FineTuneConfig,
                    lancedb: LanceDBResource) -> dg.MaterializeResult:
        from .. import loader, training

        uri = _uri(lancedb)
        try:
            train_view, val_view = loader.pin_view(uri, train_name), loader.pin_view(uri, val_name)
        except ValueError as exc:
            raise dg.Failure(f"{exc}; materialize the slice views first") from exc
        spec = training.RunSpec(train=train_view, val=val_view,
                                profile=config.resolve_profile(finetune=True, min_input_size=mode.min_input_size),
                                weights=base_weights(context), seed=config.seed)
        scored = {}
        if config.hard_example_mining:
            mining, scored = _mining(context, config, mode, lancedb, spec)
            spec = dataclasses.replace(spec, mining=mining)
        out = settings.checkpoints_dir() / mode.name / str(train_view.version)
        metadata = _train(context, spec, out)
        return dg.MaterializeResult(
            metadata={**_run_metadata(metadata, out, str(out / training.BEST_FILE)), **scored,
                      "mining": dg.MetadataValue.json(metadata["mining"]), "failure_mode": mode.name})

    return _checkpoint


def build_training_defs(modes=None) -> dg.Definitions:
    """base_detector plus one checkpoint asset per failure mode (default: the registry)."""
    modes = check_registry(FAILURE_MODES if modes is None else modes)
    return dg.Definitions(assets=[base_detector, *(build_checkpoint_asset(m) for m in modes)])


defs = build_training_defs()

