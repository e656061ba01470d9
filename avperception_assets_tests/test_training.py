"""Training on a pinned view: checkpoint files, metadata, resume, time-travel reproduction, the
engine's loop and the recipe's one serialised form."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from avperception_assets.model import checkpoints, detector, engine, loader, selection, training
from avperception_assets.model.recipe import Recipe
from avperception_assets.storage import tables as storage

from .conftest import build_frames_table

# mobilenet at a tiny input size: a step takes about a second on a 2-core CPU.
TINY = dict(batch_size=2, max_steps_per_epoch=2, min_size=96, max_size=160, epochs=1,
            log_every_steps=1, warmup_steps=0)


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("training")
    build_frames_table(root, [("train-a", 10, 5)])
    return str(root / "lancedb")


def recipe_for(uri: str, **profile_overrides) -> Recipe:
    view = loader.pin_view(uri, storage.FRAMES_TABLE, where="split = 'train'")
    profile = detector.get_profile("cpu", **{**TINY, **profile_overrides})
    return Recipe.on(view, profile, weights="none", seed=3)  # holds out 2 of the 7 train frames


@pytest.fixture(scope="module")
def trained(uri, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "ckpt"
    lines: list[str] = []
    metadata = training.train(recipe_for(uri), out, log=lines.append)
    return out, metadata, lines


def test_two_step_run_writes_a_loadable_checkpoint(trained, uri):
    out, metadata, lines = trained
    for name in ("last.pt", "best.pt", "train_state.pt", "metadata.json"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    on_disk = checkpoints.read_metadata(out)
    assert on_disk == json.loads(json.dumps(metadata))
    assert Recipe.from_dict(on_disk) == recipe_for(uri) and "config" not in on_disk  # the recipe, stored once
    table_version = loader.open_table(uri, storage.FRAMES_TABLE).version
    assert on_disk["train_view"] == storage.FRAMES_TABLE and on_disk["train_view_version"] == table_version
    assert on_disk["source_table"] == storage.FRAMES_TABLE and on_disk["source_table_version"] == table_version
    assert on_disk["status"] == "complete" and on_disk["seed"] == 3 and on_disk["weights_source"] == "none"
    assert on_disk["profile"]["architecture"] == "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert on_disk["profile"]["min_size"] == 96 and on_disk["code_version"]
    (epoch,) = on_disk["epochs"]
    assert epoch["steps"] == 2 and epoch["images"] == 4 and epoch["loss"] > 0
    assert on_disk["best_epoch"] == 1 and on_disk["best_val_map_50"] is not None
    assert any("step 2/2" in line and "img/s" in line for line in lines)
    # The train split, less the frames held out to choose the best epoch, and how they were chosen.
    train_split = loader.count_rows(loader.pin_view(uri, storage.FRAMES_TABLE, where="split = 'train'"))
    assert (on_disk["train_rows"], on_disk["selection_rows"]) == (train_split - 2, 2)
    assert on_disk["selection_pct"] == selection.DEFAULT_PCT and on_disk["selection_rule"] == selection.RULE

    model = checkpoints.load_checkpoint(out)
    saved = torch.load(out / "best.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    model.eval()
    with torch.inference_mode():
        (prediction,) = model([torch.rand(3, 90, 160)])
    assert set(prediction) == {"boxes", "labels", "scores"}


def test_rerun_of_a_finished_run_reuses_it(trained, uri):
    out, metadata, _ = trained
    before = (out / "last.pt").stat().st_mtime_ns
    lines: list[str] = []
    again = training.train(recipe_for(uri), out, log=lines.append)
    assert again["epochs"] == json.loads(json.dumps(metadata))["epochs"]
    assert (out / "last.pt").stat().st_mtime_ns == before and "nothing to train" in lines[0]


def test_same_seed_trains_the_same_weights(trained, uri, tmp_path):
    out, _, _ = trained
    torch.rand(1000)  # whatever ran before in the process must not change the run
    training.train(recipe_for(uri), tmp_path / "again", log=lambda line: None)
    first, again = (torch.load(d / "last.pt", weights_only=True) for d in (out, tmp_path / "again"))
    assert all(torch.equal(first[k], again[k]) for k in first)


class Interrupted(Exception):
    pass


def _first_of_two_epochs(uri: str, out) -> Recipe:
    """Start a two-epoch run in `out` and stop it once epoch 1 is saved; returns its recipe."""
    recipe = recipe_for(uri, epochs=2)

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/2 saved"):
            raise Interrupted(line)

    with pytest.raises(Interrupted):
        training.train(recipe, out, log=stop_after_first_epoch)
    return recipe


@pytest.mark.training
def test_resume_continues_from_the_saved_epoch(uri, tmp_path):
    recipe = _first_of_two_epochs(uri, tmp_path)
    interrupted = checkpoints.read_metadata(tmp_path)
    assert interrupted["status"] == "training" and len(interrupted["epochs"]) == 1

    lines: list[str] = []
    resumed = training.train(recipe, tmp_path, log=lines.append)
    assert resumed["resumed_from_epoch"] == 1 and resumed["status"] == "complete"
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]
    assert resumed["epochs"][0] == interrupted["epochs"][0]  # epoch 1 was not trained again
    assert not any(line.startswith("epoch 1 step") for line in lines)
    assert torch.load(tmp_path / "train_state.pt", weights_only=False)["epoch"] == 2

    # A different recipe in the same folder is not resumed: it starts over.
    other = training.train(recipe_for(uri, epochs=1, lr=0.001), tmp_path, log=lines.append)
    assert other["resumed_from_epoch"] is None and len(other["epochs"]) == 1


# metadata.json as c618fc9 wrote it for a two-epoch run on every train frame, best epoch on the
# val split, stopped after epoch 1 (with `config`, a second copy of the recipe); its table's
# location is a placeholder.
OLD_METADATA = Path(__file__).parent / "fixtures" / "c618fc9_metadata.json"


@pytest.mark.training
def test_a_checkpoint_folder_from_before_selection_shares_loads_reproduces_and_is_not_resumed(uri, tmp_path):
    recipe = _first_of_two_epochs(uri, tmp_path)  # the .pt files, whose format has not changed
    old = json.loads(OLD_METADATA.read_text().replace("@LANCEDB_URI@", uri))
    assert old["train_view_version"] == recipe.train_view_version, "the fixture's table was built the same way"
    (tmp_path / checkpoints.METADATA_FILE).write_text(json.dumps(old))

    model = checkpoints.load_checkpoint(tmp_path, checkpoints.LAST_FILE)
    saved = torch.load(tmp_path / checkpoints.LAST_FILE, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    cli = subprocess.run([sys.executable, "-m", "avperception_assets.model.training", "reproduce", str(tmp_path),
                          "--epoch", "1"], capture_output=True, text=True, check=True)
    every_train_frame = recipe.replace(selection_pct=None).train  # what the run trained on
    epoch_2 = training.epoch_loader(every_train_frame, recipe.profile, recipe.seed, 1)
    assert cli.stdout.splitlines()[1:] == [i for batch in epoch_2 for i in batch.image_ids]
    assert training.selection_frames(tmp_path) == []

    # Today's recipe holds frames out: another recipe, so it starts over in the folder.
    again = training.train(recipe, tmp_path, log=lambda _: None)
    assert again["resumed_from_epoch"] is None and [e["epoch"] for e in again["epochs"]] == [1, 2]
    assert "config" not in checkpoints.read_metadata(tmp_path)  # rewritten in the one form


def test_the_selection_share_is_part_of_the_recipe(trained, uri):
    """A folder resumes (or is reused) only by a run holding out the same share."""
    out, _, _ = trained
    saved = checkpoints.read_metadata(out)
    assert recipe_for(uri).recorded_in(saved)
    assert not recipe_for(uri).replace(selection_pct=selection.DEFAULT_PCT + 20).recorded_in(saved)
    assert not recipe_for(uri).replace(selection_pct=0).recorded_in(saved)


def test_the_engine_steps_what_a_run_steps(trained, uri):
    """An epoch driven through the public engine, seeded as a run seeds it, ends at the run's
    weights; `evaluate` scores the model on a val loader."""
    out, metadata, _ = trained
    recipe, lines = Recipe.from_dict(metadata), []
    torch.manual_seed(recipe.seed)
    model = detector.build_detector(recipe.profile)
    state = engine.TrainState.create(model, recipe.profile, torch.device("cpu"),
                                     training.steps_per_epoch(metadata["train_rows"], recipe.profile))
    record = engine.train_one_epoch(state, training.epoch_loader(recipe.train, recipe.profile, recipe.seed, 0),
                                    log=lines.append)
    assert state.epoch == 1 and record["steps"] == 2 and record["loss"] == metadata["epochs"][0]["loss"]
    assert lines[-1].startswith("epoch 1 step 2/2: loss")
    saved = torch.load(out / checkpoints.LAST_FILE, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    selection_share = loader.make_loader(recipe.selection, batch_size=2)
    assert engine.evaluate(model, selection_share) == metadata["epochs"][0]["val_map_50"]
    assert engine.evaluate(model, []) is None


def _rates(profile, epoch_steps: int, steps: list[int]) -> list[float]:
    """The learning rate of each of `steps` (global, 0-based) under the run's schedule."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=profile.lr)
    schedule, rates = engine.lr_schedule(optimizer, profile, epoch_steps), []
    for step in range(max(steps) + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return [rates[s] for s in steps]


def test_warm_up_spans_epochs_and_decay_follows_the_profile():
    gpu = detector.get_profile("gpu")  # 100 warm-up steps, lr 0.04, x0.1 every 3 epochs
    # A first epoch of 40 steps, shorter than the warm-up: it goes on into the second epoch.
    assert _rates(gpu, 40, [0, 39, 40, 99, 100, 119, 120]) == pytest.approx(
        [0.04 / 100, 0.04 * 40 / 100, 0.04 * 41 / 100, 0.04, 0.04, 0.04, 0.004])
    cpu = detector.get_profile("cpu")  # 10 warm-up steps, lr 0.02, no decay within 100 epochs
    assert _rates(cpu, 4, [0, 3, 4, 9, 10, 399]) == pytest.approx([0.002, 0.008, 0.010, 0.02, 0.02, 0.02])
    assert _rates(cpu.for_finetune(), 4, [0, 5]) == pytest.approx([0.01, 0.01])  # fine-tunes: no warm-up


@pytest.mark.training
def test_a_run_whose_first_epoch_is_shorter_than_its_warm_up_reaches_the_full_rate(uri, tmp_path):
    metadata = training.train(recipe_for(uri, epochs=2, warmup_steps=3, lr=0.003), tmp_path, log=lambda _: None)
    # Two steps an epoch: epoch 1 ends at 2/3 of the rate, epoch 2 at the full rate.
    assert [e["lr"] for e in metadata["epochs"]] == pytest.approx([0.002, 0.003])


@pytest.mark.training
def test_a_non_finite_loss_stops_the_run_and_keeps_the_saved_weights(uri, tmp_path):
    recipe = _first_of_two_epochs(uri, tmp_path)
    # The weights went bad at the end of epoch 1: the next step's loss is not finite.
    poisoned = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                for k, v in torch.load(tmp_path / "last.pt", weights_only=True).items()}
    checkpoints.save_torch(poisoned, tmp_path / "last.pt")  # as the trainer writes it: best.pt keeps its bytes
    saved = {name: (tmp_path / name).read_bytes() for name in ("last.pt", "best.pt", "train_state.pt")}
    with pytest.raises(engine.NonFiniteLossError, match=r"at epoch 2 step 1 \(global step 3, rank 0\)"):
        training.train(recipe, tmp_path, log=lambda _: None)
    assert {name: (tmp_path / name).read_bytes() for name in saved} == saved
    assert len(checkpoints.read_metadata(tmp_path)["epochs"]) == 1


def test_reproduce_time_travels_to_the_recorded_version(trained, uri, tmp_path):
    out, metadata, _ = trained
    order = training.reproduce_order(out, epoch=0)
    # What the run's own loader yields for that epoch is exactly that order.
    recipe = Recipe.from_dict(metadata)
    loader_of_epoch = training.epoch_loader(recipe.train, recipe.profile, recipe.seed, 0)
    seen = [i for batch in loader_of_epoch for i in batch.image_ids]
    assert seen == order and len(order) == metadata["train_rows"]

    # New footage lands: the table moves on, the recorded version does not.
    conn, _ = build_frames_table(tmp_path, [("train-b", 6, 9)])
    newer = conn.open_table(storage.FRAMES_TABLE).to_arrow()
    conn_main = storage.connect(uri)
    conn_main.open_table(storage.FRAMES_TABLE).add(newer)
    latest = loader.pin_view(uri, storage.FRAMES_TABLE, where="split = 'train'")
    assert latest.version > metadata["train_view_version"]
    assert loader.count_rows(latest) > metadata["train_rows"]

    assert training.reproduce_order(out, epoch=0) == order
    assert training.reproduce_order(out, epoch=1) != order
    cli = subprocess.run([sys.executable, "-m", "avperception_assets.model.training", "reproduce", str(out)],
                         capture_output=True, text=True, check=True)
    assert cli.stdout.splitlines()[1:] == order

    # The held-out frames: rebuilt from the record, disjoint from the training order, and every
    # one of them on the same side in a run on the grown table (a frame's role never changes).
    held_out = training.selection_frames(out)
    assert len(held_out) == metadata["selection_rows"] > 0 and not set(held_out) & set(order)
    cli = subprocess.run([sys.executable, "-m", "avperception_assets.model.training", "reproduce", str(out),
                          "--selection"], capture_output=True, text=True, check=True)
    assert cli.stdout.splitlines()[1:] == held_out
    grown = Recipe.on(latest, recipe.profile, selection_pct=recipe.selection_pct)
    grown_held_out, grown_trained = loader.image_ids(grown.selection), loader.image_ids(grown.train)
    assert set(held_out) <= set(grown_held_out) and set(order) <= set(grown_trained)
    assert len(grown_held_out) + len(grown_trained) == loader.count_rows(latest)


def test_empty_training_view_is_a_clear_error(uri, tmp_path):
    recipe = recipe_for(uri)
    empty = loader.ViewRef(uri, storage.FRAMES_TABLE, recipe.train_view_version, "split = 'nowhere'")
    with pytest.raises(ValueError, match="no training rows"):
        training.train(Recipe.on(empty, recipe.profile), tmp_path)


def test_missing_coco_weights_name_the_expected_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    profile = detector.get_profile("cpu")
    expected = tmp_path / "hub" / "checkpoints" / "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"
    with pytest.raises(FileNotFoundError, match=str(expected)):
        detector.build_detector(profile, "coco")
    with pytest.raises(FileNotFoundError, match="neither"):
        detector.build_detector(profile, str(tmp_path / "missing.pt"))


def test_anchor_sizes_are_recorded_and_rebuilt(trained):
    out, metadata, _ = trained
    assert metadata["profile"]["anchor_sizes"] == [16, 32, 64, 128, 256]  # the cpu profile's small anchors
    model = checkpoints.load_checkpoint(out)  # rebuilt from metadata.json, where they are a JSON list
    assert model.rpn.anchor_generator.sizes == ((16, 32, 64, 128, 256),) * 3
    with pytest.raises(ValueError, match="anchors per location"):
        detector.build_detector(detector.get_profile("cpu", anchor_sizes=(16, 32)))
    # A run from COCO weights keeps the anchors those weights' RPN learned, and records that.
    view = loader.ViewRef(uri="unused", name=storage.FRAMES_TABLE, version=1)
    coco_run = Recipe.on(view, detector.get_profile("cpu"), weights=detector.WEIGHTS_COCO)
    assert coco_run.profile.anchor_sizes is None and coco_run.as_dict()["profile"]["anchor_sizes"] is None


def test_profiles_match_the_reference():
    gpu = detector.get_profile("gpu")
    assert (gpu.architecture, gpu.batch_size, gpu.lr, gpu.momentum, gpu.weight_decay) == (
        "fasterrcnn_resnet50_fpn_v2", 64, 0.04, 0.9, 1e-4)
    assert (gpu.lr_step_epochs, gpu.lr_gamma, gpu.epochs, gpu.amp, gpu.grad_clip_norm) == (3, 0.1, 10, True, 10.0)
    assert detector.get_profile("cpu", lr=0.5).lr == 0.5
    with pytest.raises(ValueError, match="unknown training profile"):
        detector.get_profile("tpu")


def test_best_pt_keeps_the_best_epoch_while_last_pt_moves_on(tmp_path):
    model = torch.nn.Linear(2, 2)
    state = SimpleNamespace(model=model, state_dict=lambda: {"epoch": 0})  # what save_epoch reads of a TrainState
    metadata = {"best_val_map_50": None, "best_epoch": None, "epochs": []}
    weights_of_epoch = {}
    for epoch, val_map in [(1, 0.5), (2, 0.3), (3, 0.6), (4, 0.6)]:
        with torch.no_grad():
            model.weight.fill_(epoch)
        weights_of_epoch[epoch] = model.weight.clone()
        checkpoints.save_epoch(tmp_path, state, metadata, {"epoch": epoch, "val_map_50": val_map})
        best = torch.load(tmp_path / checkpoints.BEST_FILE, weights_only=True)["weight"]
        last = torch.load(tmp_path / checkpoints.LAST_FILE, weights_only=True)["weight"]
        assert torch.equal(last, weights_of_epoch[epoch])
        assert torch.equal(best, weights_of_epoch[metadata["best_epoch"]])
        # The latest epoch is the best: both names are one file on disk, not two copies.
        same_file = (tmp_path / checkpoints.BEST_FILE).samefile(tmp_path / checkpoints.LAST_FILE)
        assert same_file == (metadata["best_epoch"] == epoch)
    assert [metadata["best_epoch"], checkpoints.read_metadata(tmp_path)["best_epoch"]] == [3, 3]
    assert not list(tmp_path.glob("*.tmp"))
