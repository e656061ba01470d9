"""ONNX export of a checkpoint, checked with onnxruntime against PyTorch on the session's tiny
trained rider (see conftest): the real val view, pinned, and real exported files."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import dagster as dg
import onnxruntime
import pytest
import torch

from avperception_assets.deployment import onnx as onnx_export
from avperception_assets.model import training
from avperception_assets.defs.deployment_assets import OnnxExportConfig, build_onnx_model_asset
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.model.detections import predict
from avperception_assets.evaluation.comparison import view_batches
from avperception_assets.model.loader import model_inputs

from .conftest import RIDER

PERSON, CAR = 1, 3
FRAMES = 6  # of the rider val view's 7


def _rider_checkpoint(trained_rider) -> Path:
    return Path(trained_rider.metadata("rider_checkpoint")["checkpoint_dir"])


def _decisive_copy(source: Path, out: Path) -> Path:
    """The checkpoint with batch-norm statistics taken from its val frames and a sharper classifier:
    a 2-step random-init model's features fade to ~1e-8 through the backbone, so every frame would
    get the same detections, all scoring about 1/91 (below 0.05)."""
    out.mkdir()
    shutil.copy(source / training.METADATA_FILE, out)
    meta, model = training.read_metadata(source), training.load_checkpoint(source).eval()
    images, _, _ = next(view_batches(meta["lancedb_uri"], meta["val_view"], meta["val_view_version"]))
    batch, _ = model.transform(model_inputs(images, "cpu"))
    for layer in model.backbone.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):  # one pass in train mode: the stats of that pass
            layer.reset_running_stats()
            layer.momentum = None
    model.backbone.train()
    cls = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        model.backbone(batch.tensors)
        cls.weight.copy_(torch.randn(cls.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
        cls.bias.zero_()
        cls.bias[[PERSON, CAR]] = 2.0
    torch.save(model.state_dict(), out / training.BEST_FILE)
    return out


@pytest.fixture(scope="module")
def decisive(trained_rider, tmp_path_factory):
    """That copy exported through the command line; its folder and what the command printed."""
    folder = _decisive_copy(_rider_checkpoint(trained_rider), tmp_path_factory.mktemp("onnx") / "decisive")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert onnx_export.main([str(folder), "--frames", str(FRAMES)]) == 0
    return folder, printed.getvalue()


def test_onnxruntime_matches_pytorch_on_val_frames(decisive):
    folder, printed = decisive
    parity = onnx_export.check_parity(folder, folder / onnx_export.ONNX_FILE, frames=FRAMES)
    assert parity.passed and parity.frames == FRAMES and parity.borderline == 0
    assert parity.detections >= FRAMES * 20  # confident detections on every frame, not an empty comparison
    assert parity.max_box_diff_px <= onnx_export.BOX_TOLERANCE_PX
    assert parity.max_score_diff <= onnx_export.SCORE_TOLERANCE
    assert f"ONNX parity passed: {FRAMES} frames" in printed and str(folder / onnx_export.ONNX_FILE) in printed
    assert not list(folder.glob("*.tmp")) and not list(folder.glob("*.unchecked"))


def test_the_exported_model_takes_any_frame_size(decisive):
    folder, _ = decisive
    model = training.load_checkpoint(folder)
    session = onnxruntime.InferenceSession(str(folder / onnx_export.ONNX_FILE), providers=["CPUExecutionProvider"])
    image = torch.rand(3, 150, 100, generator=torch.Generator().manual_seed(1))  # portrait, unlike the val frames
    outputs = session.run(list(onnx_export.OUTPUTS), {onnx_export.INPUT: image.numpy()})
    candidate = [dict(zip(onnx_export.OUTPUTS, map(torch.from_numpy, outputs)))]
    parity = onnx_export.compare(predict(model, [image]), candidate, score_thresh=model.roi_heads.score_thresh,
                                 cap=model.roi_heads.detections_per_img)
    assert parity.passed and parity.detections > 0
    assert float(candidate[0]["boxes"][:, 2].max()) <= 100 and float(candidate[0]["boxes"][:, 3].max()) <= 150


def test_the_model_records_its_data_version_class_map_and_source(decisive):
    folder, _ = decisive
    recorded = onnx_export.read_model_metadata(folder / onnx_export.ONNX_FILE)
    meta = training.read_metadata(folder)
    assert recorded["data_version"]["train_view"] == "bdd100k_rider_train"
    assert recorded["data_version"]["train_view_version"] == meta["train_view_version"]
    assert recorded["data_version"]["val_view_version"] == meta["val_view_version"]
    assert recorded["data_version"]["source_table_version"] == meta["source_table_version"]
    assert recorded["class_map"]["1"] == {"coco": "person", "det_20": ["pedestrian", "rider"]}
    assert recorded["class_map"]["13"] == {"coco": "stop sign", "det_20": ["traffic sign"]}
    assert recorded["input_size"] == {"min_size": meta["profile"]["min_size"], "max_size": meta["profile"]["max_size"]}
    assert recorded["source_checkpoint"]["weights"] == str(folder / training.BEST_FILE)
    assert recorded["exported_part"].startswith("whole model")


def test_parity_fails_against_another_models_export(decisive, trained_rider):
    folder, _ = decisive
    parity = onnx_export.check_parity(_rider_checkpoint(trained_rider), folder / onnx_export.ONNX_FILE, frames=2)
    assert not parity.passed and parity.detections == 0  # the plain checkpoint finds nothing above 0.05
    assert parity.mismatches[0].startswith("frame 0: ONNX label")


def _detections(*rows) -> dict:
    """(label, score, x1) rows as one frame's detections, boxes 20 px wide and high."""
    return {"labels": torch.tensor([r[0] for r in rows], dtype=torch.int64),
            "scores": torch.tensor([r[1] for r in rows]),
            "boxes": torch.tensor([[r[2], 10.0, r[2] + 20, 30.0] for r in rows]).reshape(-1, 4)}


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
    parity = onnx_export.compare([reference], [candidate], score_thresh=0.05, cap=100)
    assert (not parity.passed) == failed
    if not failed:
        assert parity.detections == 2 and parity.max_box_diff_px <= 0.9 + 1e-5


def test_the_asset_exports_the_modes_checkpoint(trained_rider):
    result = dg.materialize([build_onnx_model_asset(RIDER)], instance=trained_rider.instance,
                            resources={"workspace": WorkspaceResource(data_location=str(trained_rider.root))},
                            run_config=dg.RunConfig(ops={"rider_onnx_model": OnnxExportConfig(frames=3)}))
    [event] = result.asset_materializations_for_node("rider_onnx_model")
    meta = {k: v.value for k, v in event.metadata.items()}
    checkpoint = trained_rider.metadata("rider_checkpoint")
    assert meta["onnx_model"] == str(Path(checkpoint["checkpoint_dir"]) / onnx_export.ONNX_FILE)
    assert meta["parity"]["passed"] and meta["frames_checked"] == 3
    assert meta["train_view"] == "bdd100k_rider_train"
    assert meta["train_view_version"] == checkpoint["train_view_version"]
    assert meta["exported_part"].startswith("whole model") and meta["class_map"]["3"]["coco"] == "car"
    recorded = onnx_export.read_model_metadata(Path(meta["onnx_model"]))
    assert recorded["source_checkpoint"]["weights"] == checkpoint["weights"]


def test_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert onnx_export.main([str(tmp_path / "nowhere")]) == 2
    assert "no metadata.json in" in capsys.readouterr().err
    (tmp_path / training.METADATA_FILE).write_text("{}")
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
