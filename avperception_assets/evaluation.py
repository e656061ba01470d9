"""Baseline vs fine-tuned detector on one failure mode's val view: one pass, both models scored.

Plain Python (no Dagster). The frames come from the view pinned to one version through the
loader's decoding collate; both models run on every batch; each is scored with the COCO
metrics of `detections`. Writing the result down (COCO JSON, panels, report files) is
`reports`' job.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import loader, storage
from .detections import compute_metrics, mode_class_ids, predict
from .pixels import PixelReader

# One batch from the loader: images (C,H,W float in [0,1] or uint8), targets with `boxes`
# (x1,y1,x2,y2 pixels) and `labels` (COCO ids), and the frames' `image_id`s.
Batch = tuple[Sequence[Tensor], Sequence[Mapping[str, Tensor]], Sequence[str]]

BASELINE = "baseline"
FINETUNED = "finetuned"


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


def _to_uint8(image: Tensor) -> Tensor:
    if image.dtype == torch.uint8:
        return image
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def _check_target(target: Mapping[str, Tensor], image_id: str) -> dict[str, Tensor]:
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1)
    if len(boxes) != len(labels):
        raise ValueError(f"frame {image_id}: {len(boxes)} boxes but {len(labels)} labels")
    return {"boxes": boxes, "labels": labels}



def evaluate(models: Mapping[str, torch.nn.Module], batches: Iterable[Batch], *,
             classes: Iterable[str], panel_count: int = 3) -> Evaluation:
    """Run every model over the val batches once and score each with COCO metrics.

    Keeps `panel_count` frames for pictures, preferring frames that contain the mode's
    classes (first come, so the choice is stable across runs of the same view version).
    """
    classes = list(classes)
    class_ids = mode_class_ids(classes)
    image_ids: list[str] = []
    sizes: list[tuple[int, int]] = []
    targets: list[dict[str, Tensor]] = []
    predictions: dict[str, list[dict[str, Tensor]]] = {name: [] for name in models}
    preferred: list[PanelFrame] = []
    others: list[PanelFrame] = []
    for images, batch_targets, batch_ids in batches:
        if not (len(images) == len(batch_targets) == len(batch_ids)):
            raise ValueError("a batch must hold as many images as targets and image ids")
        for name, model in models.items():
            predictions[name].extend(predict(model, images))
        for image, target, image_id in zip(images, batch_targets, batch_ids):
            target = _check_target(target, image_id)
            wanted = preferred if any(int(c) in class_ids for c in target["labels"]) else others
            if len(wanted) < panel_count:
                wanted.append(PanelFrame(len(image_ids), str(image_id), _to_uint8(image)))
            image_ids.append(str(image_id))
            sizes.append((int(image.shape[-2]), int(image.shape[-1])))
            targets.append(target)
    if not image_ids:
        raise ValueError("the val view yielded no frames to evaluate on")
    metrics = {name: compute_metrics(preds, targets, class_ids) for name, preds in predictions.items()}
    panel_frames = (preferred + others)[:panel_count]
    return Evaluation(classes, image_ids, sizes, targets, predictions, metrics, panel_frames)


def view_batches(uri: str, name: str, version: int, *, batch_size: int = 8) -> Iterator[Batch]:
    """Every frame of `name@version` once, in stored order, decoded by the loader's collate.

    A sequential Lance scan: evaluation needs no shuffle, and a scan also reads Geneva
    materialized views, on which LanceDB's permutation builder (lancedb 0.39) panics.
    """
    table = loader.open_table(uri, name, version)
    pixels, collate = PixelReader.of(uri, table), loader.DecodeCollate()
    for record_batch in table.to_lance().to_batches(columns=pixels.columns(loader.COLUMNS), batch_size=batch_size):
        if record_batch.num_rows:
            yield collate(pixels.attach(record_batch))


def evaluate_view(uri: str, view_name: str, models: Mapping[str, torch.nn.Module], *, classes: Sequence[str],
                  version: int | None = None, batch_size: int = 8, panel_count: int = 3) -> tuple[Evaluation, dict]:
    """Evaluate the baseline and fine-tuned models on a val view pinned to one version; returns the
    evaluation and what was evaluated on (the view's name, version and the frames-table version
    it reflects)."""
    missing = {BASELINE, FINETUNED} - set(models)
    if missing:
        raise ValueError(f"models must include {sorted(missing)}")
    view = loader.pin_view(uri, view_name, version)
    source_table, source_version = storage.source_table_version(uri, view.name, view.version)
    batches = view_batches(uri, view.name, view.version, batch_size=batch_size)
    result = evaluate(models, batches, classes=classes, panel_count=panel_count)
    val_view = {"name": view.name, "version": view.version, "uri": uri,
                "source_table": source_table, "source_table_version": source_version}
    return result, val_view
