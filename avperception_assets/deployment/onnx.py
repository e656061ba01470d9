"""ONNX export of a checkpoint's best model, checked with onnxruntime against PyTorch on its frames.

Plain Python (no Dagster). What is exported is the whole detector, as `model([image])` runs it:
resize and normalisation, backbone and FPN, the RPN with its anchor decoding and NMS, the RoI
heads with box decoding, the score threshold, per-class NMS and the detection cap, and boxes
scaled back to the input's pixels. Input `image`: one float32 RGB frame (3, H, W) in [0, 1], any
H and W. Outputs `boxes` (N, 4: x1, y1, x2, y2 px of the input), `labels` (N, COCO ids) and
`scores` (N). The file's `metadata_props` hold the data version it was trained on, the class map,
the input size and the source checkpoint (`model_metadata`; JSON values).

Parity, on the first frames of the checkpoint's train view (at its pinned version): PyTorch's
detections and onnxruntime's (CPU) are paired one to one, each with a twin of the same label, every
box coordinate within 1 px and the score within 0.001 (the pairing with the most twins, then the
closest: detections whose scores tie are interchangeable, in whichever order either side lists
them). Every detection above 0.05 on either side needs a twin, except when its twin may have been
dropped by the model itself on rounding:
- borderline: it scores within the score tolerance of the other side's cut (the model's score
  threshold, or its lowest kept score when the detection cap is full);
- tied in NMS: the other side kept instead a twinless detection of the same label overlapping it
  beyond the NMS threshold and scoring at least as high within the score tolerance. Which of two
  such boxes NMS keeps rests on rounding and on how each library breaks ties (flat regions of a
  frame give boxes of different shapes exactly the same scores). An ONNX detection is excused so
  only if PyTorch's RoI heads scored it too, before NMS and the cap: a box PyTorch never produced
  is a mismatch.
At least 20 detections above 0.05 must have been compared, or the check shows nothing and fails.
`export_checked` only puts a model that passed in place.

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

import networkx as nx
import numpy as np
import onnx
import onnxruntime
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

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
MIN_DETECTIONS = 20  # compared above SCORE_CUT: fewer, and the check shows nothing
DEFAULT_FRAMES = 8


@dataclass(frozen=True)
class Parity:
    """onnxruntime against PyTorch on `frames` frames."""

    frames: int
    detections: int  # PyTorch detections above SCORE_CUT paired with an ONNX twin: what was compared
    max_box_diff_px: float  # over twins
    max_score_diff: float
    borderline: int  # detections whose twin the model's own cut may have dropped
    tied: int  # detections whose twin lost a near-tie in the other side's NMS (see `_nms_tie`)
    mismatches: tuple[str, ...]  # detections with no twin, described

    @property
    def failures(self) -> list[str]:
        """Why parity failed; empty when it passed."""
        failures = [f"{len(self.mismatches)} detections without a twin"] if self.mismatches else []
        if self.detections < MIN_DETECTIONS:
            failures.append(f"only {self.detections} detections above {SCORE_CUT} compared, "
                            f"at least {MIN_DETECTIONS} needed")
        return failures

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        verdict = "passed" if self.passed else f"FAILED ({'; '.join(self.failures)})"
        return (f"ONNX parity {verdict}: {self.frames} frames, {self.detections} detections above {SCORE_CUT}, "
                f"max box diff {self.max_box_diff_px:.2e} px (tolerance {BOX_TOLERANCE_PX}), max score diff "
                f"{self.max_score_diff:.2e} (tolerance {SCORE_TOLERANCE}), {self.borderline} borderline, "
                f"{self.tied} tied in NMS")


@dataclass(frozen=True)
class Reference:
    """PyTorch's side of a parity check, per frame: its detections (`kept`), every detection its RoI
    heads scored before NMS and the detection cap (`scored`), and the cuts between the two."""

    kept: list[dict]
    scored: list[dict]
    score_thresh: float
    nms_thresh: float
    cap: int


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
            "lancedb_uri", "train_view", "train_view_version", "train_filter", "selection_pct",
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
    """The frame (of the first few) the model detects most on: the trace keeps only the
    branches its input takes, and torchvision's `BoxCoder.decode` shapes its boxes per class only
    when there are proposals. Traced on a random-noise frame, or on a frame with no proposal, the
    export of a 192 px model failed on every real frame in onnxruntime (`Reshape
    '/roi_heads/Reshape_2'`, input {150,363} to {-1,4})."""
    meta, _ = _checkpoint(checkpoint_dir)
    images = model_inputs(_first_frames(meta, uri, DEFAULT_FRAMES), "cpu")
    counts = [len(d["boxes"]) for d in predict(model, images)]
    return images[counts.index(max(counts))]


def export(checkpoint_dir: Path, out: Path | None = None, uri: str | None = None) -> Path:
    """Write the best model of `checkpoint_dir` as ONNX to `out` (default `<checkpoint_dir>/model.onnx`),
    atomically: a reader never sees a half-written file. The trace runs on one of the first frames
    of the checkpoint's train view (LanceDB at `uri`, default the recorded one)."""
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


def _first_frames(meta: dict, uri: str | None, frames: int):
    """The first `frames` frames of the checkpoint's train view at its pinned version (any frames
    do: parity compares two runtimes of one model)."""
    images = []
    for batch_images, _, _ in view_batches(uri or meta["lancedb_uri"], meta["train_view"], meta["train_view_version"],
                                           batch_size=min(frames, 8)):
        images.extend(batch_images[:frames - len(images)])
        if len(images) == frames:
            break
    return images


def _differences(a: dict, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest box-coordinate difference (inf across labels) and the score difference of every
    detection in `a` against every one in `b`."""
    box = (a["boxes"][:, None] - b["boxes"][None]).abs().amax(dim=2)
    box = torch.where(a["labels"][:, None] == b["labels"][None], box, torch.inf)
    return box, (a["scores"][:, None] - b["scores"][None]).abs()


def _within(box: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    return (box <= BOX_TOLERANCE_PX) & (score <= SCORE_TOLERANCE)


def _twins(ref: dict, cand: dict) -> list[tuple[int, int]]:
    """(PyTorch, ONNX) detection pairs, one to one: the most pairs within tolerance, then the
    closest. Detections whose scores tie are interchangeable, in whichever order each side lists
    them; a nearest-twin search would let one twin serve two detections."""
    box, score = _differences(ref, cand)
    graph = nx.Graph()
    for i, j in torch.nonzero(_within(box, score)).tolist():
        distance = float(box[i, j]) / BOX_TOLERANCE_PX + float(score[i, j]) / SCORE_TOLERANCE  # 0 to 2
        graph.add_edge(("pytorch", i), ("onnx", j), weight=3.0 - distance)
    matching = nx.max_weight_matching(graph, maxcardinality=True)
    return sorted((a[1], b[1]) if a[0] == "pytorch" else (b[1], a[1]) for a, b in matching)


def _floor(detections: dict, score_thresh: float, cap: int) -> float:
    """The score under which `detections` may have dropped a twin: the model's threshold, or its
    lowest kept score when the detection cap is full."""
    scores = detections["scores"]
    return max(score_thresh, float(scores.min())) if len(scores) >= cap else score_thresh


def _nms_tie(source: dict, lone: list[int], other: dict, other_lone: list[int], nms_thresh: float) -> torch.Tensor:
    """For each of `source`'s twinless detections `lone`: whether the other side's NMS may have
    dropped its twin for a near-tie, keeping instead a twinless detection of the same label that
    overlaps it beyond the NMS threshold and scores at least as high within the score tolerance.
    Which of two such boxes NMS keeps rests on rounding; the box it dropped in turn no longer
    suppresses others, hence a chain of such detections, all rooted at a near-tie."""
    keep = torch.zeros(len(lone), dtype=torch.bool)
    if lone and other_lone:
        overlap = box_iou(source["boxes"][lone], other["boxes"][other_lone]) > nms_thresh
        same = source["labels"][lone][:, None] == other["labels"][other_lone][None]
        outranks = other["scores"][other_lone][None] >= source["scores"][lone][:, None] - SCORE_TOLERANCE
        keep = (overlap & same & outranks).any(dim=1)
    return keep


def _describe(source: dict, i: int, other: dict) -> str:
    label, score = int(source["labels"][i]), float(source["scores"][i])
    box, _ = _differences({k: v[i:i + 1] for k, v in source.items()}, other)
    nearest = f"nearest of that label {float(box.min()):.3g} px away" if torch.isfinite(box).any() else "none of that label"
    return f"label {label} score {score:.4f} box {[round(v, 1) for v in source['boxes'][i].tolist()]}: {nearest}"


def _compare_frame(ref: dict, cand: dict, scored: dict, reference: Reference) -> dict:
    """One frame: the twins' differences, and the twinless detections above SCORE_CUT sorted into
    borderline, tied and mismatched. An ONNX detection can be excused by a near-tie only when
    PyTorch's RoI heads scored it too (NMS chooses between boxes that were there to choose from):
    a box PyTorch never produced is a mismatch."""
    twins = _twins(ref, cand)
    box, score = _differences(ref, cand)
    compared = [(i, j) for i, j in twins if max(float(ref["scores"][i]), float(cand["scores"][j])) > SCORE_CUT]
    lone_ref = sorted(set(range(len(ref["scores"]))) - {i for i, _ in twins})
    lone_cand = sorted(set(range(len(cand["scores"]))) - {j for _, j in twins})
    scored_too = _within(*_differences(cand, scored)).any(dim=1)
    sides = [("PyTorch", ref, lone_ref, lone_ref), ("ONNX", cand, lone_cand, [j for j in lone_cand if scored_too[j]])]
    result = {"box_diffs": [float(box[i, j]) for i, j in compared],
              "score_diffs": [float(score[i, j]) for i, j in compared],
              "detections": sum(float(ref["scores"][i]) > SCORE_CUT for i, _ in compared),
              "borderline": 0, "tied": 0, "mismatches": []}
    for (side, source, lone, genuine), (_, other, _, other_genuine) in zip(sides, sides[::-1]):
        floor = _floor(other, reference.score_thresh, reference.cap)
        tied = {k for k, is_tied in zip(genuine, _nms_tie(source, genuine, other, other_genuine,
                                                          reference.nms_thresh).tolist()) if is_tied}
        for k in lone:
            k_score = float(source["scores"][k])
            if k_score <= SCORE_CUT:
                continue
            if k_score <= floor + SCORE_TOLERANCE:
                result["borderline"] += 1
            elif k in tied:
                result["tied"] += 1
            else:
                result["mismatches"].append(f"{side} {_describe(source, k, other)}")
    return result


def compare(reference: Reference, candidate: list[dict]) -> Parity:
    """PyTorch's detections against the ONNX model's (`candidate`), frame by frame."""
    frames = [_compare_frame(ref, cand, scored, reference)
              for ref, cand, scored in zip(reference.kept, candidate, reference.scored, strict=True)]
    return Parity(frames=len(frames), detections=sum(f["detections"] for f in frames),
                  max_box_diff_px=max((d for f in frames for d in f["box_diffs"]), default=0.0),
                  max_score_diff=max((d for f in frames for d in f["score_diffs"]), default=0.0),
                  borderline=sum(f["borderline"] for f in frames), tied=sum(f["tied"] for f in frames),
                  mismatches=tuple(f"frame {n}: {m}" for n, f in enumerate(frames) for m in f["mismatches"]))


def pytorch_reference(model: torch.nn.Module, images: list[torch.Tensor]) -> Reference:
    """`model`'s detections on `images`, and every detection its RoI heads scored above the score
    threshold before NMS and the cap: the same model with NMS dropping no box and no cap."""
    heads = model.roi_heads
    kept = predict(model, images)
    cuts = heads.nms_thresh, heads.detections_per_img
    heads.nms_thresh, heads.detections_per_img = 1.0, sys.maxsize  # NMS drops boxes overlapping more than this
    try:
        scored = predict(model, images)
    finally:
        heads.nms_thresh, heads.detections_per_img = cuts
    return Reference(kept=kept, scored=scored, score_thresh=heads.score_thresh, nms_thresh=heads.nms_thresh,
                     cap=heads.detections_per_img)


def onnx_detections(onnx_path: Path, images: list[torch.Tensor]) -> list[dict]:
    """The ONNX model's detections on `images`, run by onnxruntime on the CPU."""
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return [dict(zip(OUTPUTS, map(torch.from_numpy, session.run(list(OUTPUTS), {INPUT: np.ascontiguousarray(
        image.numpy())})))) for image in images]


def check_parity(checkpoint_dir: Path, onnx_path: Path, *, frames: int = DEFAULT_FRAMES,
                 uri: str | None = None) -> Parity:
    """Run the best model of `checkpoint_dir` in PyTorch and `onnx_path` in onnxruntime (CPU) on the
    first `frames` frames of the checkpoint's train view (LanceDB at `uri`, default the recorded one)."""
    if frames < 1:
        raise ValueError(f"frames must be at least 1, not {frames}")
    meta, _ = _checkpoint(checkpoint_dir)
    images = model_inputs(_first_frames(meta, uri, frames), "cpu")
    if not images:
        raise ValueError(f"{meta['train_view']}@{meta['train_view_version']} has no frames to check parity on")
    return compare(pytorch_reference(checkpoints.load_checkpoint(checkpoint_dir), images), onnx_detections(onnx_path, images))


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
            "box_tolerance_px": BOX_TOLERANCE_PX, "score_tolerance": SCORE_TOLERANCE, "score_cut": SCORE_CUT,
            "min_detections": MIN_DETECTIONS, "failures": parity.failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avperception_assets.onnx_export",
                                     description="Export a checkpoint's best model to ONNX and check parity.")
    parser.add_argument("checkpoint_dir", type=Path)
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="frames to check (default 8)")
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
