"""Baseline vs fine-tuned detector on one failure mode's val view: one pass, both models scored.

Plain Python (no Dagster). The frames come from the view pinned to one version through the
loader's decoding collate; both models run on every batch; each is scored with the COCO
metrics of `detections`. Writing the result down (COCO JSON, panels, report files) is
`reports`' job.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import torch
from torch import Tensor

from avperception_assets.model import loader
from avperception_assets.storage import tables as storage
from avperception_assets.model.detections import coco_category_names, compute_metrics, mode_class_ids, predict
from avperception_assets.evaluation import frame_errors, tracks
from avperception_assets.evaluation.frame_errors import FrameErrors, match_frame
from avperception_assets.storage.pixels import PixelReader

# One batch from the loader: images (C,H,W float in [0,1] or uint8), targets with `boxes`
# (x1,y1,x2,y2 pixels) and `labels` (COCO ids), and the frames' `image_id`s.
Batch = tuple[Sequence[Tensor], Sequence[Mapping[str, Tensor]], Sequence[str]]

BASELINE = "baseline"
FINETUNED = "finetuned"


def tiled_name(model: str) -> str:
    """A model's name in `<mode>_eval_frames` and in the intervals when it ran on tiles."""
    return f"{model}_tiled"


@dataclass
class PanelFrame:
    index: int  # position in the evaluation (the COCO image id)
    image_id: str
    image: Tensor  # uint8 (3,H,W)


@dataclass
class Evaluation:
    """Everything one pass over the val view produced, per model."""

    classes: list[str]  # the BDD classes the mode cares about
    image_ids: list[str]
    sizes: list[tuple[int, int]]  # (height, width)
    targets: list[dict[str, Tensor]]
    predictions: dict[str, list[dict[str, Tensor]]]
    metrics: dict[str, dict]
    panel_frames: list[PanelFrame] = field(default_factory=list)
    frame_errors: dict[str, list[FrameErrors]] = field(default_factory=dict)  # per model, in frame order
    worst_frames: list[PanelFrame] = field(default_factory=list)  # the fine-tuned model's, worst first
    seconds: dict[str, float] = field(default_factory=dict)  # per model: wall time of its inference alone
    clips: pa.Table | None = None  # the frames of clips and their tracks (`tracks.clip_rows`); None: none

    def seconds_per_frame(self, model: str) -> float:
        return self.seconds[model] / len(self.image_ids)

    @property
    def class_ids(self) -> list[int]:
        return list(mode_class_ids(self.classes))


def _to_uint8(image: Tensor) -> Tensor:
    if image.dtype == torch.uint8:
        return image
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def _check_target(target: Mapping[str, Tensor], image_id: str) -> dict[str, Tensor]:
    """The frame's boxes and labels, and its crowd flags (`iscrowd`, as COCO's) where it has them."""
    checked = {"boxes": torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4),
               "labels": torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1)}
    if "iscrowd" in target:
        checked["iscrowd"] = torch.as_tensor(target["iscrowd"], dtype=torch.int64).reshape(-1)
    if len({len(value) for value in checked.values()}) > 1:
        raise ValueError(f"frame {image_id}: " + ", ".join(f"{len(v)} {k}" for k, v in checked.items())
                         + ": one of each per object")
    return checked


class _WorstFrames:
    """The `count` frames of highest error score offered so far (ties: the earlier frame);
    frames without an error are never kept."""

    def __init__(self, count: int):
        self.count, self._heap = count, []  # a min-heap of (score, -index, frame)

    def offer(self, score: int, index: int, image_id: str, image: Tensor) -> None:
        full = len(self._heap) == self.count
        if self.count and score > 0 and (not full or (score, -index) > self._heap[0][:2]):
            entry = (score, -index, PanelFrame(index, image_id, _to_uint8(image)))
            (heapq.heapreplace if full else heapq.heappush)(self._heap, entry)

    def frames(self) -> list[PanelFrame]:
        return [frame for *_, frame in sorted(self._heap, key=lambda entry: entry[:2], reverse=True)]


def evaluate(models: Mapping[str, torch.nn.Module], batches: Iterable[Batch], *,
             classes: Iterable[str], panel_count: int = 3, worst_count: int = 3) -> Evaluation:
    """Run every model over the val batches once, score each with COCO metrics, match every
    frame's boxes (`frame_errors`) and time each model's inference (decoding excluded).

    Keeps `panel_count` frames for pictures, preferring frames that contain the mode's
    classes (first come, so the choice is stable across runs of the same view version), and
    the `worst_count` frames with the fine-tuned model's highest error score on the mode's
    classes (ties: the earlier frame).
    """
    classes = list(classes)
    class_ids = mode_class_ids(classes)
    names = coco_category_names()
    image_ids: list[str] = []
    sizes: list[tuple[int, int]] = []
    targets: list[dict[str, Tensor]] = []
    predictions: dict[str, list[dict[str, Tensor]]] = {name: [] for name in models}
    errors: dict[str, list[FrameErrors]] = {name: [] for name in models}
    preferred: list[PanelFrame] = []
    others: list[PanelFrame] = []
    worst = _WorstFrames(worst_count)
    seconds = dict.fromkeys(models, 0.0)
    for images, batch_targets, batch_ids in batches:
        if not (len(images) == len(batch_targets) == len(batch_ids)):
            raise ValueError("a batch must hold as many images as targets and image ids")
        batch_predictions = {}
        for name, model in models.items():
            started = time.perf_counter()
            batch_predictions[name] = predict(model, images)
            seconds[name] += time.perf_counter() - started
        for k, (image, target, image_id) in enumerate(zip(images, batch_targets, batch_ids)):
            target = _check_target(target, image_id)
            index = len(image_ids)
            for name, preds in batch_predictions.items():
                predictions[name].append(preds[k])
                errors[name].append(match_frame(preds[k], target, names))
            wanted = preferred if any(int(c) in class_ids for c in target["labels"]) else others
            if len(wanted) < panel_count:
                wanted.append(PanelFrame(index, str(image_id), _to_uint8(image)))
            if FINETUNED in errors:
                worst.offer(errors[FINETUNED][index].error_score(class_ids), index, str(image_id), image)
            image_ids.append(str(image_id))
            sizes.append((int(image.shape[-2]), int(image.shape[-1])))
            targets.append(target)
    if not image_ids:
        raise ValueError("the val view yielded no frames to evaluate on")
    metrics = {name: compute_metrics(preds, targets, class_ids) for name, preds in predictions.items()}
    panel_frames = (preferred + others)[:panel_count]
    return Evaluation(classes, image_ids, sizes, targets, predictions, metrics, panel_frames, errors, worst.frames(),
                      seconds)


def view_batches(uri: str, name: str, version: int, *, batch_size: int = 8, where: str | None = None) -> Iterator[Batch]:
    """Every frame of `name@version` (those `where` keeps, when given) once, in stored order,
    decoded by the loader's collate.

    A sequential Lance scan: evaluation needs no shuffle, and a scan also reads Geneva
    materialized views, on which LanceDB's permutation builder (lancedb 0.39) panics.
    """
    table = loader.open_table(uri, name, version)
    pixels, collate = PixelReader.of(uri, table), loader.DecodeCollate()
    for record_batch in table.to_lance().to_batches(columns=pixels.columns(loader.read_columns(table)), filter=where,
                                                    batch_size=batch_size):
        if record_batch.num_rows:
            yield collate(pixels.attach(record_batch))


def evaluate_view(uri: str, view_name: str, models: Mapping[str, torch.nn.Module], *, classes: Sequence[str],
                  version: int | None = None, batch_size: int = 8, panel_count: int = 3,
                  worst_count: int = 3) -> tuple[Evaluation, dict]:
    """Evaluate the baseline and fine-tuned models on a val view pinned to one version; returns the
    evaluation, with the view's frames of clips, and what was evaluated on (the view's name,
    version and the frames-table version it reflects)."""
    missing = {BASELINE, FINETUNED} - set(models)
    if missing:
        raise ValueError(f"models must include {sorted(missing)}")
    view = loader.pin_view(uri, view_name, version)
    source_table, source_version = storage.source_table_version(uri, view.name, view.version)
    batches = view_batches(uri, view.name, view.version, batch_size=batch_size)
    result = evaluate(models, batches, classes=classes, panel_count=panel_count, worst_count=worst_count)
    result.clips = tracks.clip_rows(uri, view.name, view.version)
    val_view = {"name": view.name, "version": view.version, "uri": uri,
                "source_table": source_table, "source_table_version": source_version}
    return result, val_view


def frame_rows(evaluation: Evaluation, tiled: Evaluation | None = None) -> pa.Table:
    """The `<mode>_eval_frames` rows of an evaluation: each model's matches on every frame, and
    with `tiled` (the same frames evaluated on tiles) each tiled model's, as `tiled_name(model)`."""
    errors = dict(evaluation.frame_errors)
    if tiled is not None:
        if tiled.image_ids != evaluation.image_ids:
            raise ValueError("the tiled evaluation must cover the same frames, in the same order")
        errors.update({tiled_name(model): frames for model, frames in tiled.frame_errors.items()})
    return frame_errors.frame_rows(errors, evaluation.image_ids, evaluation.class_ids, coco_category_names())
