"""ONNX export of a checkpoint, checked with onnxruntime against PyTorch on the session's tiny
trained rider (see conftest): its real views, pinned, and real exported files."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torchvision.ops import box_iou

from avperception_assets.deployment import onnx as onnx_export
from avperception_assets.model import checkpoints
from avperception_assets.defs.deployment_assets import OnnxExportConfig, build_onnx_model_asset
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.evaluation.comparison import view_batches
from avperception_assets.model.loader import model_inputs
from avperception_assets.slices.views import view_name

from .conftest import RIDER

PERSON, CAR = 1, 3
FRAMES = 6  # of the rider val view's 7 (and of the train view's 9, which parity checks on)
# The decisive copy's classifier. Flat regions of the synthetic frames give boxes of different
# shapes the very same RoI features, hence exactly the same scores for every class; with this
# seed some such overlapping pairs are among the kept detections, so breaking ties the other way
# changes what NMS keeps (test_ties_broken_the_other_way_keep_parity).
CLASSIFIER_SEED = 4


def _rider_checkpoint(trained_rider) -> Path:
    return Path(trained_rider.metadata("rider_checkpoint")["checkpoint_dir"])


def _val_frames(trained_rider, count: int = 8) -> list:
    """The first `count` frames of the rider val view, as pinned by the session."""
    uri = checkpoints.read_metadata(_rider_checkpoint(trained_rider))["lancedb_uri"]
    images, _, _ = next(view_batches(uri, view_name(RIDER, "val"), trained_rider.val_version, batch_size=count))
    return images


def _copy_with_classifier(trained_rider, out: Path, *, weight_scale: float, favoured_bias: float) -> Path:
    """The rider checkpoint with batch-norm statistics taken from val frames and a classifier of seeded
    random weights times `weight_scale`, biased by `favoured_bias` towards person and car: a 2-step
    random-init model's features fade to ~1e-8 through the backbone, so every frame would get the
    same detections, all scoring about 1/91 (below 0.05). A classifier of zeros scores every class
    exactly 1/91 on any machine: a model that detects nothing."""
    source = _rider_checkpoint(trained_rider)
    out.mkdir()
    shutil.copy(source / checkpoints.METADATA_FILE, out)
    model = checkpoints.load_checkpoint(source).eval()
    batch, _ = model.transform(model_inputs(_val_frames(trained_rider), "cpu"))
    for layer in model.backbone.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):  # one pass in train mode: the stats of that pass
            layer.reset_running_stats()
            layer.momentum = None
    model.backbone.train()
    cls = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        model.backbone(batch.tensors)
        weights = torch.randn(cls.weight.shape, generator=torch.Generator().manual_seed(CLASSIFIER_SEED))
        cls.weight.copy_(weights * weight_scale)
        cls.bias.zero_()
        cls.bias[[PERSON, CAR]] = favoured_bias
    torch.save(model.state_dict(), out / checkpoints.BEST_FILE)
    return out


@pytest.fixture(scope="module")
def decisive(trained_rider, tmp_path_factory):
    """A confident copy exported through the command line; its folder and what the command printed."""
    folder = _copy_with_classifier(trained_rider, tmp_path_factory.mktemp("onnx") / "decisive",
                                   weight_scale=0.3, favoured_bias=2.0)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert onnx_export.main([str(folder), "--frames", str(FRAMES)]) == 0
    return folder, printed.getvalue()


@pytest.fixture(scope="module")
def blank(trained_rider, tmp_path_factory):
    """A copy that detects nothing: every class scores 1/91 on every box."""
    return _copy_with_classifier(trained_rider, tmp_path_factory.mktemp("onnx") / "blank",
                                 weight_scale=0.0, favoured_bias=0.0)


def test_onnxruntime_matches_pytorch_on_the_checkpoints_frames(decisive):
    folder, printed = decisive
    parity = onnx_export.check_parity(folder, folder / onnx_export.ONNX_FILE, frames=FRAMES)
    assert parity.passed and parity.frames == FRAMES
    assert parity.detections >= FRAMES * 20  # confident detections on every frame, not an empty comparison
    assert parity.max_box_diff_px <= onnx_export.BOX_TOLERANCE_PX
    assert parity.max_score_diff <= onnx_export.SCORE_TOLERANCE
    assert f"ONNX parity passed: {FRAMES} frames" in printed and str(folder / onnx_export.ONNX_FILE) in printed
    assert not list(folder.glob("*.tmp")) and not list(folder.glob("*.unchecked"))


def test_the_exported_model_takes_any_frame_size(decisive):
    folder, _ = decisive
    image = torch.rand(3, 150, 100, generator=torch.Generator().manual_seed(1))  # portrait, unlike the view's frames
    [candidate] = onnx_export.onnx_detections(folder / onnx_export.ONNX_FILE, [image])
    parity = onnx_export.compare(onnx_export.pytorch_reference(checkpoints.load_checkpoint(folder), [image]), [candidate])
    assert not parity.mismatches and parity.detections > 0
    assert float(candidate["boxes"][:, 2].max()) <= 100 and float(candidate["boxes"][:, 3].max()) <= 150


def test_the_model_records_its_data_version_class_map_and_source(decisive):
    folder, _ = decisive
    recorded = onnx_export.read_model_metadata(folder / onnx_export.ONNX_FILE)
    meta = checkpoints.read_metadata(folder)
    assert recorded["data_version"]["train_view"] == "bdd100k_rider_train"
    assert recorded["data_version"]["train_view_version"] == meta["train_view_version"]
    assert recorded["data_version"]["selection_pct"] == meta["selection_pct"]
    assert recorded["data_version"]["source_table_version"] == meta["source_table_version"]
    assert recorded["class_map"]["1"] == {"coco": "person", "det_20": ["pedestrian", "rider"]}
    assert recorded["class_map"]["13"] == {"coco": "stop sign", "det_20": ["traffic sign"]}
    assert recorded["input_size"] == {"min_size": meta["profile"]["min_size"], "max_size": meta["profile"]["max_size"]}
    assert recorded["source_checkpoint"]["weights"] == str(folder / checkpoints.BEST_FILE)
    assert recorded["exported_part"].startswith("whole model")


def test_parity_fails_against_another_models_export(decisive, blank):
    folder, _ = decisive
    parity = onnx_export.check_parity(blank, folder / onnx_export.ONNX_FILE, frames=2)
    assert not parity.passed and parity.detections == 0 and parity.tied == 0
    assert parity.mismatches[0].startswith("frame 0: ONNX label")


def test_a_model_that_detects_too_little_is_refused_naming_the_count(blank, capsys):
    assert onnx_export.main([str(blank), "--frames", str(FRAMES)]) == 1
    printed = capsys.readouterr()
    assert f"FAILED (only 0 detections above {onnx_export.SCORE_CUT} compared, at least 20 needed)" in printed.out
    assert "nothing written" in printed.err and not (blank / onnx_export.ONNX_FILE).exists()


def _nms_breaking_ties_the_other_way(scored: dict, nms_thresh: float, cap: int) -> dict:
    """Per-class NMS over every detection the RoI heads scored, of equal scores the later one first
    (torchvision's NMS keeps the earlier)."""
    scores, overlap = scored["scores"].tolist(), box_iou(scored["boxes"], scored["boxes"]) > nms_thresh
    kept = []
    for k in sorted(range(len(scores)), key=lambda k: (-scores[k], -k)):
        if not any(scored["labels"][k] == scored["labels"][m] and overlap[k, m] for m in kept):
            kept.append(k)
    return {key: values[kept[:cap]] for key, values in scored.items()}


def test_ties_broken_the_other_way_keep_parity(decisive):
    """What another machine's NMS may keep of boxes that score exactly the same (the issue-33
    failure: two boxes 6.56 px apart with the same score, one kept by PyTorch, the other by
    onnxruntime), on the real frames parity checks."""
    folder, _ = decisive
    images = model_inputs(onnx_export._first_frames(checkpoints.read_metadata(folder), None, FRAMES), "cpu")
    reference = onnx_export.pytorch_reference(checkpoints.load_checkpoint(folder), images)
    other_way = [_nms_breaking_ties_the_other_way(scored, reference.nms_thresh, reference.cap)
                 for scored in reference.scored]
    assert any(not torch.equal(kept["boxes"], other["boxes"]) for kept, other in zip(reference.kept, other_way))
    parity = onnx_export.compare(reference, other_way)
    assert parity.passed and parity.tied > 0


def _offset_output(model: onnx.ModelProto, output: str, offset: list[float]) -> None:
    """The graph's `output` plus `offset`."""
    exact = f"{output}_exact"
    for node in model.graph.node:
        node.input[:] = [exact if name == output else name for name in node.input]
        node.output[:] = [exact if name == output else name for name in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.array(offset, np.float32), f"{output}_offset"))
    model.graph.node.append(helper.make_node("Add", [exact, f"{output}_offset"], [output]))


def _set_nms_threshold(graph: onnx.GraphProto, old: float, new: float) -> int:
    """Every NonMaxSuppression of IoU threshold `old` (inside the graph's If branches) given `new`; how many."""
    constants = {node.output[0]: node.attribute[0] for node in graph.node if node.op_type == "Constant"}
    changed = 0
    for node in graph.node:
        threshold = constants.get(node.input[3]) if node.op_type == "NonMaxSuppression" else None
        if threshold is not None and np.isclose(numpy_helper.to_array(threshold.t), old).all():
            threshold.t.CopyFrom(numpy_helper.from_array(np.array([new], np.float32)))
            changed += 1
        changed += sum(_set_nms_threshold(attr.g, old, new) for attr in node.attribute
                       if attr.type == onnx.AttributeProto.GRAPH)
    return changed


@pytest.mark.parametrize("alteration", ["boxes 2 px right", "scores 0.002 higher", "RoI NMS at IoU 0.6"])
def test_parity_refuses_an_altered_export(decisive, tmp_path, alteration):
    """Exports that differ from the model in one small way: the tie rule must not excuse them (the
    looser NMS keeps only boxes PyTorch also scored, overlapping what both sides kept)."""
    folder, _ = decisive
    model = onnx.load(str(folder / onnx_export.ONNX_FILE))
    if alteration.startswith("boxes"):
        _offset_output(model, "boxes", [2.0, 0.0, 2.0, 0.0])
    elif alteration.startswith("scores"):
        _offset_output(model, "scores", [0.002])
    else:
        assert _set_nms_threshold(model.graph, checkpoints.load_checkpoint(folder).roi_heads.nms_thresh, 0.6) == 1
    onnx.save(model, str(tmp_path / "altered.onnx"))
    parity = onnx_export.check_parity(folder, tmp_path / "altered.onnx", frames=2)
    assert not parity.passed and parity.mismatches


def _detections(*rows) -> dict:
    """(label, score, x1) rows as one frame's detections, boxes 20 px wide and high."""
    return {"labels": torch.tensor([r[0] for r in rows], dtype=torch.int64),
            "scores": torch.tensor([r[1] for r in rows]),
            "boxes": torch.tensor([[r[2], 10.0, r[2] + 20, 30.0] for r in rows]).reshape(-1, 4)}


def _reference(kept: dict, scored: dict | None = None) -> onnx_export.Reference:
    return onnx_export.Reference(kept=[kept], scored=[kept if scored is None else scored], score_thresh=0.05,
                                 nms_thresh=0.5, cap=100)


@pytest.mark.parametrize("candidate, failed", [
    (_detections((PERSON, 0.9, 10.9), (CAR, 0.5005, 50)), False),
    (_detections((PERSON, 0.9, 11.5), (CAR, 0.5, 50)), True),  # a box 1.5 px off
    (_detections((PERSON, 0.9, 10), (CAR, 0.502, 50)), True),  # a score 0.002 off
    (_detections((PERSON, 0.9, 10), (2, 0.5, 50)), True),  # another label
    (_detections((PERSON, 0.9, 10), (CAR, 0.5, 50), (CAR, 0.3, 90)), True),  # a detection PyTorch has not
    (_detections((PERSON, 0.9, 10), (CAR, 0.5, 50), (CAR, 0.0505, 90)), False),  # its twin may be just below 0.05
])
def test_a_detection_without_a_twin_in_tolerance_fails_parity(candidate, failed):
    reference = _detections((PERSON, 0.9, 10), (CAR, 0.5, 50))
    parity = onnx_export.compare(_reference(reference), [candidate])
    assert bool(parity.mismatches) == failed
    if not failed:
        assert parity.detections == 2 and parity.max_box_diff_px <= 0.9 + 1e-5


def test_tied_detections_pair_in_any_order():
    reference = _detections((PERSON, 0.5, 10), (PERSON, 0.5, 60), (PERSON, 0.5, 110), (CAR, 0.5, 10))
    candidate = _detections((CAR, 0.5003, 10.2), (PERSON, 0.4998, 110.5), (PERSON, 0.5001, 10.3), (PERSON, 0.5, 59.6))
    parity = onnx_export.compare(_reference(reference), [candidate])
    assert not parity.mismatches and parity.detections == 4 and parity.tied == 0
    assert parity.max_box_diff_px == pytest.approx(0.5, abs=1e-5)


def test_each_twin_pairs_with_one_detection():
    """Two PyTorch boxes of one score 0.9 px apart: each needs its own twin, and a nearest-first
    search pairing the second with the ONNX box at 10.5 would leave the first without one."""
    reference = _detections((PERSON, 0.5, 10), (PERSON, 0.5, 10.9))
    assert not onnx_export.compare(_reference(reference), [_detections((PERSON, 0.5, 11.8), (PERSON, 0.5, 10.5))]).mismatches
    assert onnx_export.compare(_reference(reference), [_detections((PERSON, 0.5, 10.5))]).mismatches


KEPT, SUPPRESSED = (PERSON, 0.5, 10), (PERSON, 0.5, 16)  # the same score, IoU 0.54: NMS keeps either


@pytest.mark.parametrize("candidate, scored, failed", [
    ([SUPPRESSED], [KEPT, SUPPRESSED], False),  # the other box of the tie
    ([SUPPRESSED, (PERSON, 0.3, 28)], [KEPT, SUPPRESSED, (PERSON, 0.4, 22), (PERSON, 0.3, 28)], False),
    ([SUPPRESSED], [KEPT], True),  # a box PyTorch never scored
    ([(PERSON, 0.49, 16)], [KEPT, (PERSON, 0.49, 16)], True),  # not a tie: PyTorch's box scores higher
    ([(PERSON, 0.5, 19)], [KEPT, (PERSON, 0.5, 19)], True),  # a tie, but too little overlap for NMS to choose
])
def test_a_near_tie_in_nms_may_keep_either_box(candidate, scored, failed):
    """Which of two overlapping boxes of the same score NMS keeps rests on rounding; the box the
    other side kept must be one PyTorch scored, and a chain of changes must start at a tie (row 2:
    the other box of the tie suppresses 0.4 at x 22, which then no longer suppresses 0.3 at x 28)."""
    kept = [KEPT, (PERSON, 0.4, 22)] if len(candidate) == 2 else [KEPT]
    parity = onnx_export.compare(_reference(_detections(*kept), _detections(*scored)), [_detections(*candidate)])
    assert bool(parity.mismatches) == failed
    if not failed:
        assert parity.tied == len(kept) + len(candidate)


@pytest.mark.parametrize("count", [19, 20])
def test_parity_needs_20_compared_detections_and_names_the_count(count):
    detections = _detections(*[(CAR, 0.5, 30 * n) for n in range(count)])
    parity = onnx_export.compare(_reference(detections), [detections])
    assert not parity.mismatches and parity.detections == count
    assert parity.passed == (count >= 20)
    if count < 20:
        assert parity.failures == [f"only {count} detections above 0.05 compared, at least 20 needed"]
        assert parity.summary().startswith(f"ONNX parity FAILED (only {count} detections above 0.05 compared")


def _materialize_onnx_asset(checkpoint_dir: Path, **kwargs) -> dg.ExecuteInJobResult:
    """The rider ONNX asset run in a fresh instance whose rider_checkpoint is `checkpoint_dir`."""
    uri = checkpoints.read_metadata(checkpoint_dir)["lancedb_uri"]
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization(
            "rider_checkpoint", metadata={"checkpoint_dir": str(checkpoint_dir)}))
        return dg.materialize([build_onnx_model_asset(RIDER)], instance=instance,
                              resources={"workspace": WorkspaceResource(lancedb_uri=uri)},
                              run_config=dg.RunConfig(ops={"rider_onnx_model": OnnxExportConfig(frames=3)}), **kwargs)


def test_the_asset_exports_the_modes_checkpoint(decisive, tmp_path):
    checkpoint = Path(shutil.copytree(decisive[0], tmp_path / "checkpoint",
                                      ignore=shutil.ignore_patterns(onnx_export.ONNX_FILE)))
    result = _materialize_onnx_asset(checkpoint)
    [event] = result.asset_materializations_for_node("rider_onnx_model")
    meta = {k: v.value for k, v in event.metadata.items()}
    assert meta["onnx_model"] == str(checkpoint / onnx_export.ONNX_FILE)
    assert meta["parity"]["passed"] and meta["frames_checked"] == 3 and meta["detections_compared"] >= 20
    assert meta["train_view"] == "bdd100k_rider_train"
    assert meta["train_view_version"] == checkpoints.read_metadata(checkpoint)["train_view_version"]
    assert meta["exported_part"].startswith("whole model") and meta["class_map"]["3"]["coco"] == "car"
    recorded = onnx_export.read_model_metadata(Path(meta["onnx_model"]))
    assert recorded["source_checkpoint"]["weights"] == str(checkpoint / checkpoints.BEST_FILE)


def test_the_asset_refuses_a_model_that_detects_too_little(blank):
    result = _materialize_onnx_asset(blank, raise_on_error=False)
    assert not result.success and not (blank / onnx_export.ONNX_FILE).exists()
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert "only 0 detections above 0.05 compared, at least 20 needed" in failure.step_failure_data.error.message


@pytest.mark.dagster_run
def test_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert onnx_export.main([str(tmp_path / "nowhere")]) == 2
    assert "no metadata.json in" in capsys.readouterr().err
    (tmp_path / checkpoints.METADATA_FILE).write_text("{}")
    assert onnx_export.main([str(tmp_path)]) == 2
    assert f"no best.pt in {tmp_path}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        onnx_export.main([str(tmp_path), "--frames", "0"])
    assert "--frames must be at least 1" in capsys.readouterr().err
    missing = "rider_checkpoint has not been materialized"
    with dg.instance_for_test() as instance, pytest.raises(dg.Failure, match=missing):
        dg.materialize([build_onnx_model_asset(RIDER)], instance=instance,
                       resources={"workspace": WorkspaceResource(data_location=str(tmp_path))})


def test_the_export_box_coder_decodes_like_torchvisions_and_a_frame_without_proposals():
    """What the export traces instead of torchvision's decode: the same boxes, with no branch on the
    proposal count, so the ONNX model also runs a frame where no proposal survived."""
    from torchvision.models.detection._utils import BoxCoder

    weights, clip = (10.0, 10.0, 5.0, 5.0), 4.135
    codes = torch.randn(6, 91 * 4, generator=torch.Generator().manual_seed(0))
    proposals = [torch.tensor([[10.0, 20.0, 60.0, 90.0]]).repeat(4, 1), torch.tensor([[0.0, 0.0, 5.0, 8.0]]).repeat(2, 1)]
    coder = onnx_export._ExportBoxCoder(weights, clip)
    assert torch.equal(coder.decode(codes, proposals), BoxCoder(weights, clip).decode(codes, proposals))
    assert coder.decode(codes[:0], [torch.zeros(0, 4)]).shape == (0, 91, 4)
