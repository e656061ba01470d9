"""ONNX export of a checkpoint's best model, checked with onnxruntime against PyTorch on val frames.

Plain Python (no Dagster). What is exported is the whole detector, as `model([image])` runs it:
resize and normalisation, backbone and FPN, the RPN with its anchor decoding and NMS, the RoI
heads with box decoding, the score threshold, per-class NMS and the detection cap, and boxes
scaled back to the input's pixels. Input `image`: one float32 RGB frame (3, H, W) in [0, 1], any
H and W. Outputs `boxes` (N, 4: x1, y1, x2, y2 px of the input), `labels` (N, COCO ids) and
`scores` (N). The file's `metadata_props` hold the data version it was trained on, the class map,
the input size and the source checkpoint (`model_metadata`; JSON values).

Parity: for every detection PyTorch makes above 0.05 on the first frames of the checkpoint's val
view (at its pinned version), onnxruntime (CPU) must make one with the same label, every box
coordinate within 1 px and the score within 0.001, and the other way round. A detection with no
twin counts only when its twin cannot have been cut by the model itself: one scoring within the
score tolerance of the other side's cut (the model's score threshold, or its lowest kept score
when the detection cap is full) is reported as borderline instead. `export_checked` only puts a
model that passed in place.

CLI: `python -m avperception_assets.onnx_export CHECKPOINT_DIR [--frames N] [--out PATH] [--uri URI]`.

Library workarounds, all here (torch 2.14.1, torchvision 0.29.1):
- The torch.export-based exporter (`dynamo=True`, torch's default since 2.9; tried with
  onnxscript 0.7.2, static or dynamic image sizes) cannot export the detector: torch.export
  stops in the RPN's proposal filtering (`filter_proposals`), at the `boxes.numel() == 0` test of
  torchvision's per-class NMS (`_batched_nms_coordinate_trick`, torchvision/ops/boxes.py:103),
  since how many proposals survive the small-box and score filters is known only from the data:
  `TorchExportError` caused by `GuardOnDataDependentSymNode: Could not guard on data-dependent
  expression Eq(4*u1, 0)`. The legacy TorchScript exporter (`dynamo=False`, deprecated but
  present in 2.14) exports the whole model, that test as an ONNX `If` (torchvision scripts the
  function when tracing), with dynamic image sizes, at parity.
- Tracing torchvision's detector warns (TracerWarning on its mean/std constants, tensor copy
  UserWarnings, the exporter's own DeprecationWarning): noise here, silenced during the export;
  the parity check is what shows the trace holds for other frames.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from torchvision.models.detection._utils import BoxCoder

from avperception_assets.formats import taxonomy as bdd100k
from avperception_assets.model import checkpoints
from avperception_assets.model.detections import predict
from avperception_assets.model.detector import weights_digest
from avperception_assets.evaluation.comparison import view_batches
from avperception_assets.model.loader import model_inputs

ONNX_FILE = "model.onnx"
OPSET = 17
INPUT = "image"
OUTPUTS = ("boxes", "labels", "scores")
EXPORTED_PART = ("whole model: resize + normalise, backbone + FPN, RPN (anchors, NMS), RoI heads (box decoding, "
                 "score threshold, per-class NMS, detection cap), boxes in input pixels")
SCORE_CUT = 0.05  # detections above this must agree
BOX_TOLERANCE_PX = 1.0
SCORE_TOLERANCE = 0.001
DEFAULT_FRAMES = 8


@dataclass(frozen=True)
class Parity:
    """onnxruntime against PyTorch on `frames` val frames."""

    frames: int
    detections: int  # PyTorch detections above SCORE_CUT, each with its ONNX twin
    max_box_diff_px: float  # over twinned detections
    max_score_diff: float
    borderline: int  # detections whose twin the model's own cut may have dropped
    mismatches: tuple[str, ...]  # detections with no twin, described

    @property
    def passed(self) -> bool:
        return not self.mismatches

    def summary(self) -> str:
        verdict = "passed" if self.passed else f"FAILED ({len(self.mismatches)} detections without a twin)"
        return (f"ONNX parity {verdict}: {self.frames} frames, {self.detections} detections above {SCORE_CUT}, "
                f"max box diff {self.max_box_diff_px:.2e} px (tolerance {BOX_TOLERANCE_PX}), max score diff "
                f"{self.max_score_diff:.2e} (tolerance {SCORE_TOLERANCE}), {self.borderline} borderline")


@dataclass(frozen=True)
class Exported:
    path: Path | None  # None: parity failed and nothing was put in place
    export_seconds: float
    parity: Parity
    metadata: dict


def _checkpoint(checkpoint_dir: Path) -> tuple[dict, Path]:
    """A checkpoint folder's metadata and best weights; a clear error when either is missing."""
    meta = checkpoints.read_metadata(checkpoint_dir)
    weights = Path(checkpoint_dir) / checkpoints.BEST_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no {checkpoints.BEST_FILE} in {checkpoint_dir}: the checkpoint has no saved model")
    return meta, weights


def class_map() -> dict[str, dict]:
    """COCO id → its COCO name and the det_20 classes trained as it."""
    return {str(coco_id): {"coco": name, "det_20": sorted(c for c, i in bdd100k.COCO_IDS.items() if i == coco_id)}
            for coco_id, name in sorted(bdd100k.COCO_NAMES.items())}


def model_metadata(checkpoint_dir: Path) -> dict:
    """What the ONNX file records about itself: data version, class map, input size, source."""
    meta, weights = _checkpoint(checkpoint_dir)
    return {
        "data_version": {key: meta.get(key) for key in (
            "lancedb_uri", "train_view", "train_view_version", "train_filter", "val_view", "val_view_version",
            "source_table", "source_table_version")},
        "class_map": class_map(),
        "input_size": {"min_size": meta["profile"]["min_size"], "max_size": meta["profile"]["max_size"]},
        "source_checkpoint": {"weights": str(weights), "digest": weights_digest(weights),
                              "best_epoch": meta.get("best_epoch"), "best_val_map_50": meta.get("best_val_map_50"),
                              "profile": meta["profile"]["name"], "architecture": meta["profile"]["architecture"],
                              "code_version": meta.get("code_version")},
        "exported_part": EXPORTED_PART,
        "io": {"input": f"{INPUT}: float32 (3, H, W) RGB in [0, 1]",
               "outputs": "boxes: float32 (N, 4) x1, y1, x2, y2 px; labels: int64 (N) COCO ids; scores: float32 (N)"},
    }


def read_model_metadata(path: Path) -> dict:
    """The `metadata_props` of an ONNX file, JSON values decoded."""
    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: json.loads(prop.value) for prop in model.metadata_props}


class _ExportBoxCoder(BoxCoder):
    """torchvision's box coder with no branch on the proposal count: `BoxCoder.decode` reshapes
    to (proposals, -1) and (proposals, -1, 4) only when there are proposals, so the trace fixed
    whichever branch its frame took, and onnxruntime could not reshape a frame with no proposal
    ({0,364} to {0,-1}). Reshaping to (-1, width) and (-1, classes, 4) is the same for any count."""

    def decode(self, rel_codes: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        width = rel_codes.shape[-1]
        pred_boxes = self.decode_single(rel_codes.reshape(-1, width), torch.cat(boxes, dim=0))
        return pred_boxes.reshape(-1, width // 4, 4)


def _trace_input(model, checkpoint_dir: Path, uri: str | None) -> torch.Tensor:
    """The val frame (of the first few) the model detects most on: the trace keeps only the
    branches its input takes, and torchvision's `BoxCoder.decode` shapes its boxes per class only
    when there are proposals. Traced on a random-noise frame, or on a frame with no proposal, the
    export of a 192 px model failed on every real frame in onnxruntime (`Reshape
    '/roi_heads/Reshape_2'`, input {150,363} to {-1,4})."""
    meta, _ = _checkpoint(checkpoint_dir)
    images = model_inputs(_val_frames(meta, uri, DEFAULT_FRAMES), "cpu")
    counts = [len(d["boxes"]) for d in predict(model, images)]
    return images[counts.index(max(counts))]


def export(checkpoint_dir: Path, out: Path | None = None, uri: str | None = None) -> Path:
    """Write the best model of `checkpoint_dir` as ONNX to `out` (default `<checkpoint_dir>/model.onnx`),
    atomically: a reader never sees a half-written file. The trace runs on the first frame of the
    checkpoint's val view (LanceDB at `uri`, default the recorded one)."""
    out = Path(out) if out else Path(checkpoint_dir) / ONNX_FILE
    metadata = model_metadata(checkpoint_dir)
    model = checkpoints.load_checkpoint(checkpoint_dir).eval()
    coder = model.roi_heads.box_coder
    model.roi_heads.box_coder = _ExportBoxCoder(coder.weights, coder.bbox_xform_clip)
    tmp = out.with_name(out.name + ".tmp")
    dynamic = {INPUT: {1: "height", 2: "width"}, **{name: {0: "detections"} for name in OUTPUTS}}
    with warnings.catch_warnings():
        for category in (torch.jit.TracerWarning, UserWarning, FutureWarning, DeprecationWarning):
            warnings.simplefilter("ignore", category)
        torch.onnx.export(model, ([_trace_input(model, checkpoint_dir, uri)],), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=list(OUTPUTS), dynamic_axes=dynamic)
    proto = onnx.load(str(tmp))
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=json.dumps(value, sort_keys=True))
    onnx.save(proto, str(tmp))
    os.replace(tmp, out)
    return out


def _val_frames(meta: dict, uri: str | None, frames: int):
    """The first `frames` frames of the checkpoint's val view at its pinned version."""
    if not meta.get("val_view"):
        raise ValueError("the checkpoint records no val view to check parity on")
    images = []
    for batch_images, _, _ in view_batches(uri or meta["lancedb_uri"], meta["val_view"], meta["val_view_version"],
                                           batch_size=min(frames, 8)):
        images.extend(batch_images[:frames - len(images)])
        if len(images) == frames:
            break
    return images


def _twins(source: dict, other: dict, other_floor: float):
    """`source`'s detections above SCORE_CUT against `other`'s: the box and score diffs of each
    twin (same label, within both tolerances; the nearest box), the borderline count, and the
    detections without a twin, described."""
    box_diffs, score_diffs, borderline, missing = [], [], 0, []
    for i in torch.nonzero(source["scores"] > SCORE_CUT).flatten().tolist():
        label, score = int(source["labels"][i]), float(source["scores"][i])
        same = other["labels"] == label
        box = (other["boxes"][same] - source["boxes"][i]).abs().amax(dim=1)
        score_diff = (other["scores"][same] - score).abs()
        within = (box <= BOX_TOLERANCE_PX) & (score_diff <= SCORE_TOLERANCE)
        if within.any():
            j = torch.argmin(torch.where(within, box, torch.inf))
            box_diffs.append(float(box[j]))
            score_diffs.append(float(score_diff[j]))
        elif score <= other_floor + SCORE_TOLERANCE:
            borderline += 1
        else:
            nearest = f"nearest of that label {float(box.min()):.3g} px away" if len(box) else "none of that label"
            missing.append(f"label {label} score {score:.4f} box {[round(v, 1) for v in source['boxes'][i].tolist()]}"
                           f": {nearest}")
    return box_diffs, score_diffs, borderline, missing


def _floor(detections: dict, score_thresh: float, cap: int) -> float:
    """The score under which `detections` may have dropped a twin: the model's threshold, or its
    lowest kept score when the detection cap is full."""
    scores = detections["scores"]
    return max(score_thresh, float(scores.min())) if len(scores) >= cap else score_thresh


def compare(reference: list[dict], candidate: list[dict], *, score_thresh: float, cap: int) -> Parity:
    """PyTorch's detections (`reference`) against the ONNX model's (`candidate`), frame by frame."""
    box_diffs, score_diffs, borderline, missing, detections = [], [], 0, [], 0
    for frame, (ref, cand) in enumerate(zip(reference, candidate, strict=True)):
        for source, other, side in ((ref, cand, "PyTorch"), (cand, ref, "ONNX")):
            boxes, scores, edge, lost = _twins(source, other, _floor(other, score_thresh, cap))
            box_diffs += boxes
            score_diffs += scores
            borderline += edge
            missing += [f"frame {frame}: {side} {m}" for m in lost]
            if side == "PyTorch":
                detections += len(boxes)
    return Parity(frames=len(reference), detections=detections, max_box_diff_px=max(box_diffs, default=0.0),
                  max_score_diff=max(score_diffs, default=0.0), borderline=borderline, mismatches=tuple(missing))


def check_parity(checkpoint_dir: Path, onnx_path: Path, *, frames: int = DEFAULT_FRAMES,
                 uri: str | None = None) -> Parity:
    """Run the best model of `checkpoint_dir` in PyTorch and `onnx_path` in onnxruntime (CPU) on the
    first `frames` frames of the checkpoint's val view (LanceDB at `uri`, default the recorded one)."""
    if frames < 1:
        raise ValueError(f"frames must be at least 1, not {frames}")
    meta, _ = _checkpoint(checkpoint_dir)
    images = model_inputs(_val_frames(meta, uri, frames), "cpu")
    if not images:
        raise ValueError(f"{meta['val_view']}@{meta['val_view_version']} has no frames to check parity on")
    model = checkpoints.load_checkpoint(checkpoint_dir)
    reference = predict(model, images)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    candidate = [dict(zip(OUTPUTS, map(torch.from_numpy, session.run(list(OUTPUTS), {INPUT: np.ascontiguousarray(
        image.numpy())})))) for image in images]
    return compare(reference, candidate, score_thresh=model.roi_heads.score_thresh,
                   cap=model.roi_heads.detections_per_img)


def export_checked(checkpoint_dir: Path, out: Path | None = None, *, frames: int = DEFAULT_FRAMES,
                   uri: str | None = None) -> Exported:
    """Export the best model, check parity, and put it at `out` (default `<checkpoint_dir>/model.onnx`)
    only if it passed; a failed one is removed."""
    out = Path(out) if out else Path(checkpoint_dir) / ONNX_FILE
    staged = out.with_name(out.name + ".unchecked")
    started = time.perf_counter()
    export(checkpoint_dir, staged, uri)
    seconds = time.perf_counter() - started
    try:
        metadata = read_model_metadata(staged)
        parity = check_parity(checkpoint_dir, staged, frames=frames, uri=uri)
        if parity.passed:
            os.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)
    return Exported(out if parity.passed else None, round(seconds, 2), parity, metadata)


def parity_figures(parity: Parity) -> dict:
    """The parity result, flat and JSON-shaped."""
    return {**asdict(parity), "mismatches": list(parity.mismatches[:10]), "passed": parity.passed,
            "box_tolerance_px": BOX_TOLERANCE_PX, "score_tolerance": SCORE_TOLERANCE, "score_cut": SCORE_CUT}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avperception_assets.onnx_export",
                                     description="Export a checkpoint's best model to ONNX and check parity.")
    parser.add_argument("checkpoint_dir", type=Path)
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="val frames to check (default 8)")
    parser.add_argument("--out", type=Path, default=None, help="ONNX file (default CHECKPOINT_DIR/model.onnx)")
    parser.add_argument("--uri", default=None, help="LanceDB location (default: the recorded one)")
    args = parser.parse_args(argv)
    if args.frames < 1:
        parser.error(f"--frames must be at least 1, not {args.frames}")
    try:
        result = export_checked(args.checkpoint_dir, args.out, frames=args.frames, uri=args.uri)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.parity.summary())
    print(f"exported ({EXPORTED_PART}) in {result.export_seconds:.1f} s")
    if not result.parity.passed:
        print("\n".join(result.parity.mismatches[:10]), file=sys.stderr)
        print("nothing written", file=sys.stderr)
        return 1
    data = result.metadata["data_version"]
    print(f"{result.path}: trained on {data['train_view']}@{data['train_view_version']}")
    return 0
