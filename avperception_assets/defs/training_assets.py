"""Training as Dagster assets (group `training`): `base_detector` and one `<mode>_checkpoint` per mode.

`base_detector` is the generic starting point: COCO weights when they are available (recorded,
not retrained), else the long base `make base` cached under `checkpoints/base_long/` when there
is one (the `cpu_long` profile; reused, not retrained), otherwise a detector trained on the
train split of `bdd100k`. Each
`<mode>_checkpoint` fine-tunes it on `bdd100k_<mode>_train` at the view's current version and
saves under `checkpoints/<mode>/<view version>/`. Both keep the epoch that scores the best
mAP@0.5 on their train frames' selection share (`selection_pct`, held out from training by a
hash of each frame's id), never on the val split the reports score. Runs go through the
`training` concurrency pool. The run config builds the recipe (`model.recipe.Recipe`: profile,
weights, seed, selection share, clip draw, schedule overrides); with hard-example mining, the assets score
the frames trained on and hand the trainer their sampling weights with mining's record. Torch is
imported inside the asset bodies only.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field, field_validator

from avperception_assets.workspace import BASE_CHECKPOINTS, BASE_LONG_CHECKPOINTS
from avperception_assets.failure_modes.registry import FailureMode, check_registry
from avperception_assets.model import clip_draws
from avperception_assets.model.selection import DEFAULT_PCT as DEFAULT_SELECTION_PCT
from avperception_assets.slices.views import view_name
from avperception_assets.storage.tables import FRAMES_TABLE
from avperception_assets.defs.names import BASE_DETECTOR, RAW_FRAMES, TRAINING, TRAINING_POOL, checkpoint_key, latest_metadata, view_key
from avperception_assets.defs.resources import WorkspaceResource

AUTO_WEIGHTS = "auto"
# Training processes that died (SIGKILL, OOM, a lost node) are retried in the same run, which
# resumes from the last saved epoch; the run's own errors are raised with allow_retries=False.
TRAINING_RETRIES = dg.RetryPolicy(max_retries=2, delay=5)
BASE_TRAIN_WHERE = "split = 'train'"  # the rows of bdd100k base_detector trains on
RUN_PINS = "run_pins"  # under a model's checkpoint folder: the table versions each run pinned


def _versions_this_run(context: dg.AssetExecutionContext, folder: Path, pin) -> dict[str, int]:
    """The table versions a training run trains on (`pin()`: name -> latest version). A retry
    takes the ones its run's first attempt pinned, so it resumes that attempt's epochs even when
    curation or a view refresh committed a newer version in between."""
    from avperception_assets.model import checkpoints

    record = folder / RUN_PINS / f"{context.run_id}.json"
    if context.retry_number and record.is_file():
        return json.loads(record.read_text())
    versions = pin()
    record.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.write_json(versions, record)
    return versions


class TrainingConfig(dg.Config):
    """Run config of the training assets; unset fields keep the profile's values."""

    profile: Optional[str] = Field(None, description="'gpu' or 'cpu'; default: gpu when CUDA is available.")
    weights: str = Field(AUTO_WEIGHTS, description="base_detector's starting weights: 'coco' (torch hub "
                         "cache), 'none', or a state_dict file; 'auto': coco when cached, else none.")
    seed: int = Field(0, description="Seeds the data order (LanceDB shuffle per epoch) and augmentation.")
    selection_pct: int = Field(DEFAULT_SELECTION_PCT, ge=0, lt=100, description="Percent of the train frames "
                               "held out from training to choose the best epoch (by a hash of each frame's clip "
                               "or image id: a frame keeps its role as footage is added); 0: none, best = last.")
    clip_draw: str = Field(clip_draws.ALL, description="Which frames of each footage clip are trained on: 'all', "
                           "'stride:K' (clip frames whose index is a multiple of K) or 'novelty:T' (a clip's first "
                           "frame, then each whose embedding is at cosine distance >= T from the last one drawn). "
                           "Frames without a clip, the selection share and val are never drawn.")
    epochs: Optional[int] = Field(None, description="Override the profile's (fine-tune) epochs.")
    batch_size: Optional[int] = None
    lr: Optional[float] = Field(None, description="Override the profile's (fine-tune) learning rate.")
    max_steps_per_epoch: Optional[int] = None
    min_size: Optional[int] = Field(None, description="Shorter image side fed to the network.")
    max_size: Optional[int] = None
    num_workers: Optional[int] = None
    log_every_steps: Optional[int] = Field(None, ge=1, description="Log a step's loss to the run every N steps "
                                           "(and each epoch's last step).")
    processes_per_node: int = Field(1, ge=1, description="torchrun processes on this node (data-parallel "
                                    "ranks; one GPU each under the gpu profile).")
    nodes: int = Field(1, ge=1, description="Machines in the job; with more than one, start the same "
                       "worker on the others: the run logs the command (README).")
    rendezvous_endpoint: Optional[str] = Field(None, description="host:port of this node for torchrun's c10d "
                                               "rendezvous (only with nodes > 1).")

    @field_validator("clip_draw")
    @classmethod
    def _valid_clip_draw(cls, value: str) -> str:
        return clip_draws.canonical(value)  # a ValueError names the forms it takes

    def resolve_profile(self, finetune: bool, min_input_size: int | None = None, train_crop: int | None = None,
                        finetune_epochs: int | None = None):
        """The profile, as a fine-tune if asked, as a mode needs it (raised to its input size,
        trained on its crops, for its epochs), then this config's overrides."""
        from avperception_assets.model.detector import get_profile

        profile = get_profile(self.profile)
        if finetune:
            profile = profile.for_finetune().replace(epochs=finetune_epochs or profile.finetune_epochs)
        return profile.with_min_input(min_input_size).replace(train_crop=train_crop, **{k: v for k, v in {
            "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
            "max_steps_per_epoch": self.max_steps_per_epoch, "min_size": self.min_size,
            "max_size": self.max_size, "num_workers": self.num_workers,
            "log_every_steps": self.log_every_steps}.items() if v is not None})

    def mode_profile(self, mode: FailureMode):
        """The profile of `mode`'s fine-tune: its input size, crops and epochs, then this config's
        overrides (what `<mode>_checkpoint` trains with)."""
        return self.resolve_profile(finetune=True, min_input_size=mode.min_input_size, train_crop=mode.train_crop,
                                    finetune_epochs=mode.finetune_epochs)

    def resolve_weights(self, architecture: str) -> str:
        from avperception_assets.model.detector import WEIGHTS_COCO, WEIGHTS_NONE, coco_weights_path

        if self.weights != AUTO_WEIGHTS:
            return self.weights
        return WEIGHTS_COCO if coco_weights_path(architecture).is_file() else WEIGHTS_NONE


class BaseDetectorConfig(TrainingConfig):
    """base_detector's run config: the training recipe, and whether to reuse the cached long base."""

    reuse_long_base: bool = Field(True, description="Reuse the long base `make base` trained (profile cpu_long, "
                                  "under checkpoints/base_long/) instead of training from scratch, when one "
                                  "of this profile's architecture completed there.")


def _in_data_location(workspace: WorkspaceResource, metadata: dict) -> dict:
    """A run summary with its checkpoint's folder and weights named where they live in the data
    location (their s3:// URIs on an object store), not by their working copy."""
    located = {key: workspace.layout.location_of(getattr(metadata[key], "value", metadata[key]))
               for key in ("checkpoint_dir", "weights")}
    return {**metadata, **{key: dg.MetadataValue.path(value) for key, value in located.items()}}


def _train_and_push(context, workspace: WorkspaceResource, folder: Path, train) -> dict:
    """`train()` into a version folder of the model's checkpoint `folder` (`_train` pulls that one
    from the data location: a run on a fresh machine resumes from, or reuses, the bucket's epochs),
    then push the folder back, failed or not (a failed run's completed epochs reach the bucket too)."""
    workspace.pull(folder / RUN_PINS)
    try:
        return _in_data_location(workspace, train())
    finally:
        workspace.push(folder)


def _torchrun_options(config: TrainingConfig, run_id: str, *, hosts_rendezvous: bool = True) -> list[str]:
    """One node: a standalone rendezvous on a free port. Several: a c10d rendezvous named after
    the run, whose store this run's node hosts at `rendezvous_endpoint` (`hosts_rendezvous`;
    the other nodes join it). c10d ranks the nodes itself; the Dagster run's node leads
    whatever its rank (`model.worker`)."""
    per_node = f"--nproc-per-node={config.processes_per_node}"
    if config.nodes == 1:
        return ["--standalone", per_node]
    if not config.rendezvous_endpoint:
        raise dg.Failure("nodes > 1 needs rendezvous_endpoint (host:port of this node, reachable from the others)",
                         allow_retries=False)
    return [f"--nnodes={config.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={config.rendezvous_endpoint}",
            f"--rdzv-id={run_id}", f"--rdzv-conf=is_host={int(hosts_rendezvous)}", per_node]


def _worker_command(python: str, run_file: Path, out: Path, torchrun_options: list[str]) -> list[str]:
    return [python, "-m", "avperception_assets.training_worker", "launch", str(run_file), str(out), *torchrun_options]


def other_node_command(config: TrainingConfig, run_id: str, run_file: Path, out: Path) -> str:
    """The shell command that starts a training node other than the Dagster run's, on its own
    machine (the run logs it): the same worker and run.json, joining the run's rendezvous."""
    return shlex.join(_worker_command("python", run_file, out,
                                      _torchrun_options(config, run_id, hosts_rendezvous=False)))


def _train(context, workspace: WorkspaceResource, recipe, out: Path, config: TrainingConfig,
           sample_weights: dict | None = None) -> dict:
    """Train `recipe` (drawing frames by `sample_weights` when given) into `out` in torchrun's
    processes, launched through Dagster Pipes: their log lines reach the run, and rank 0 reports
    the checkpoint's metadata (returned here)."""
    from avperception_assets.model import checkpoints

    options = _torchrun_options(config, context.run.run_id)
    workspace.pull(out)  # on an object store: the epochs a run on another machine saved, to resume from
    out.mkdir(parents=True, exist_ok=True)
    run_file = checkpoints.write_run(out, recipe, sample_weights)
    (out / checkpoints.FAILURE_FILE).unlink(missing_ok=True)
    command = _worker_command(sys.executable, run_file, out, options)
    if config.nodes > 1:  # what the operator of each other node runs there
        context.log.info(f"waiting for {config.nodes - 1} other node(s), with {out} and the tables at the same "
                         f"paths; start each with: {other_node_command(config, context.run.run_id, run_file, out)}")
    exit_code, invocation = _run_through_pipes(context, command)
    if exit_code:
        failure = out / checkpoints.FAILURE_FILE
        if failure.is_file():  # the run's own error (non-finite loss, no rows): retrying cannot help
            raise dg.Failure(json.loads(failure.read_text())["message"], allow_retries=False)
        raise dg.Failure(f"the training processes of {out} died (exit code {exit_code}); a retry resumes from the "
                         f"last saved epoch")
    return dict(invocation.get_materialize_result().metadata)


def _run_through_pipes(context, command: list[str]) -> tuple[int, dg.PipesClientCompletedInvocation]:
    """Run `command` in a Dagster Pipes session, as `PipesSubprocessClient` does, but return its
    exit code: the client raises a failure as an exception Dagster does not export."""
    with dg.open_pipes_session(context=context, context_injector=dg.PipesTempFileContextInjector(),
                               message_reader=dg.PipesTempFileMessageReader()) as session:
        process = subprocess.Popen(command, env={**os.environ, **session.get_bootstrap_env_vars()})
        try:
            process.wait()
        except dg.DagsterExecutionInterruptedError:  # the run was terminated: torchrun stops its workers
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)
            raise
    return process.returncode, dg.PipesClientCompletedInvocation(session)


@dg.asset(
    key=BASE_DETECTOR,
    group_name=TRAINING,
    deps=[RAW_FRAMES],
    pool=TRAINING_POOL,
    retry_policy=TRAINING_RETRIES,
    kinds={"pytorch"},
    description="The generic detector every fine-tune starts from: COCO weights when cached, "
                "else the long base `make base` cached (checkpoints/base_long/), else Faster R-CNN "
                "trained on the train split of bdd100k (best by mAP@0.5 on the split's selection "
                "share, held out from training). Run config profile `cpu_long` trains the long base.",
)
def base_detector(context: dg.AssetExecutionContext, config: BaseDetectorConfig,
                  workspace: WorkspaceResource) -> dg.MaterializeResult:
    from avperception_assets.model import checkpoints, loader
    from avperception_assets.model.detector import (LONG_BASE_PROFILE, WEIGHTS_COCO, WEIGHTS_NONE, check_weights_source,
                                                    coco_weights_path)
    from avperception_assets.model.recipe import Recipe

    profile = config.resolve_profile(finetune=False)
    weights = config.resolve_weights(profile.architecture)
    try:
        check_weights_source(weights, profile.architecture)
    except FileNotFoundError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    if weights == WEIGHTS_COCO:
        path = coco_weights_path(profile.architecture)
        return dg.MaterializeResult(metadata={
            "weights": WEIGHTS_COCO, "weights_file": dg.MetadataValue.path(str(path)),
            "profile": profile.name, "architecture": profile.architecture, "hyper_parameters": profile.as_dict(),
            "note": "COCO-pretrained weights are the base; nothing trained",
        })
    long_base = workspace.pull(workspace.layout.checkpoints_dir_for(BASE_LONG_CHECKPOINTS))
    training_long_base = profile.name == LONG_BASE_PROFILE
    cached = checkpoints.latest_complete(long_base, profile.architecture)
    if cached is not None and config.reuse_long_base and weights == WEIGHTS_NONE and not training_long_base:
        location = workspace.layout.location_of(cached)
        context.log.info(f"reusing the long base in {location} (make base); nothing trained")
        return dg.MaterializeResult(metadata={
            **_in_data_location(workspace, checkpoints.run_summary(checkpoints.read_metadata(cached), cached)),
            "reused_long_base": True, "note": f"the long base `make base` cached in {location} is the base; nothing trained"})
    uri = workspace.layout.lancedb_uri
    folder = long_base if training_long_base else workspace.layout.checkpoints_dir_for(BASE_CHECKPOINTS)

    def train() -> dict:
        versions = _versions_this_run(context, folder,
                                      lambda: {FRAMES_TABLE: loader.pin_view(uri, FRAMES_TABLE).version})
        train_view = loader.pin_view(uri, FRAMES_TABLE, versions[FRAMES_TABLE], where=BASE_TRAIN_WHERE)
        recipe = Recipe.on(train_view, profile, selection_pct=config.selection_pct, weights=weights, seed=config.seed,
                           clip_draw=config.clip_draw)
        return _train(context, workspace, recipe, folder / str(train_view.version), config)

    return dg.MaterializeResult(metadata={**_train_and_push(context, workspace, folder, train), "reused_long_base": False})


def base_weights(context: dg.AssetExecutionContext, workspace: WorkspaceResource) -> str:
    """The weights the latest base_detector materialization recorded: 'coco', or the local file
    of its checkpoint (on an object store its working copy, pulled with the checkpoint's
    metadata.json, what `checkpoints.starting_model` reads)."""
    from avperception_assets.model import checkpoints

    recorded = latest_metadata(context.instance, BASE_DETECTOR)
    if recorded is None:
        raise dg.Failure("base_detector has not been materialized; materialize it first", allow_retries=False)
    weights = recorded["weights"]
    if weights == "coco":
        return weights
    path = workspace.pulled(weights)
    workspace.pull(path.parent / checkpoints.METADATA_FILE)  # what starting_model reads beside the weights
    if not path.is_file():
        raise dg.Failure(f"base_detector weights {weights} are gone; rematerialize base_detector",
                         allow_retries=False)
    return str(path)


def deployed_base_model(context: dg.AssetExecutionContext, workspace: WorkspaceResource):
    """The base detector as a user deploys it, at its own profile's input size, and what a
    report records about it (`base_model`)."""
    from avperception_assets.model.detector import get_profile

    recorded = latest_metadata(context.instance, BASE_DETECTOR)
    if recorded is None:
        raise dg.Failure("base_detector has not been materialized; materialize it first", allow_retries=False)
    # A COCO base recorded before its hyper-parameters were: its profile's defaults.
    profile = recorded.get("hyper_parameters") or get_profile(recorded["profile"]).as_dict()
    model, info = base_model(context, profile, workspace)
    return model, {**info, "input_size": [profile["min_size"], profile["max_size"]],
                   "reused_long_base": recorded.get("reused_long_base", False)}


def base_model(context: dg.AssetExecutionContext, profile: dict, workspace: WorkspaceResource):
    """The base detector at a fine-tune's profile (`checkpoints.starting_model`) and what a report
    or a checkpoint records about it (its files by their place in the data location)."""
    from avperception_assets.model import checkpoints

    model, info = checkpoints.starting_model(base_weights(context, workspace), profile)
    if info["weights"] != "coco":
        info.update({key: workspace.layout.location_of(info[key]) for key in ("weights", "checkpoint_dir")})
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

    def mine(self, conn, mode: FailureMode, recipe, model, digest: str, log=None):
        """Hard-example mining with this config's weighting: score the frames `recipe` trains on
        that have no score yet with the base `model` (weights `digest`) at the recipe's input
        size; the recipe with mining's record, the frames' sampling weights, and the scoring's
        `hard_examples.ScoreStats`."""
        from avperception_assets.discovery import hard_examples

        profile = recipe.profile
        key = hard_examples.model_key(digest, profile.min_size, profile.max_size)
        stats = hard_examples.score_view(conn, mode.name, recipe.train, mode.classes, model, key,
                                         batch_size=profile.batch_size, log=log)
        mining = hard_examples.Mining(stats.table, stats.version, key, self.mining_boost, self.mining_neighbors,
                                      self.mining_query_fraction)
        return recipe.replace(mining=mining.as_dict()), hard_examples.frame_weights(recipe.train, mining), stats


def _mining(context, config: FineTuneConfig, mode: FailureMode, workspace: WorkspaceResource, recipe):
    """Mine with the base detector (`FineTuneConfig.mine`); the recipe with mining's record, the
    frames' sampling weights, and how many were scored."""
    model, info = base_model(context, recipe.profile.as_dict(), workspace)
    recipe, weights, stats = config.mine(workspace.connect(), mode, recipe, model, info["digest"], log=context.log.info)
    context.log.info(f"{mode.name}: {stats.scored} frames scored, {stats.already_scored} already scored with "
                     f"{stats.model}")
    return recipe, weights, {"frames_scored": stats.scored, "frames_already_scored": stats.already_scored}


def build_checkpoint_asset(mode: FailureMode) -> dg.AssetsDefinition:
    train_name = view_name(mode, "train")

    @dg.asset(
        key=checkpoint_key(mode),
        group_name=TRAINING,
        deps=[view_key(mode, "train"), BASE_DETECTOR],
        pool=TRAINING_POOL,
        retry_policy=TRAINING_RETRIES,
        kinds={"pytorch"},
        metadata={"failure_mode": mode.name, "train_view": train_name},
        description=f"Faster R-CNN fine-tuned from base_detector on {train_name}, pinned to the view "
                    f"version it saw; best epoch by mAP@0.5 on the view's selection share (held out "
                    f"from training; the report scores the val view). Run config "
                    f"`hard_example_mining: true` draws frames by how hard base_detector finds them.",
    )
    def _checkpoint(context: dg.AssetExecutionContext, config: FineTuneConfig,
                    workspace: WorkspaceResource) -> dg.MaterializeResult:
        from avperception_assets.model import loader
        from avperception_assets.model.recipe import Recipe

        uri, folder = workspace.layout.lancedb_uri, workspace.layout.checkpoints_dir_for(mode.name)
        scored = {}

        def train() -> dict:
            try:
                versions = _versions_this_run(context, folder,
                                              lambda: {train_name: loader.pin_view(uri, train_name).version})
                train_view = loader.pin_view(uri, train_name, versions[train_name])
            except ValueError as exc:
                raise dg.Failure(f"{exc}; materialize the slice views first", allow_retries=False) from exc
            recipe = Recipe.on(train_view, config.mode_profile(mode), selection_pct=config.selection_pct,
                               weights=base_weights(context, workspace), seed=config.seed, clip_draw=config.clip_draw)
            sample_weights = None
            if config.hard_example_mining:
                recipe, sample_weights, mined = _mining(context, config, mode, workspace, recipe)
                scored.update(mined)
            return _train(context, workspace, recipe, folder / str(train_view.version), config, sample_weights)

        metadata = _train_and_push(context, workspace, folder, train)
        return dg.MaterializeResult(metadata={**metadata, **scored, "failure_mode": mode.name})

    return _checkpoint


def build_training_defs(modes) -> dg.Definitions:
    """base_detector plus one checkpoint asset per failure mode of the registry `modes`."""
    modes = check_registry(modes)
    return dg.Definitions(assets=[base_detector, *(build_checkpoint_asset(m) for m in modes)])
