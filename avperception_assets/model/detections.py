"""Detections of a model and their COCO metrics: what training's validation and evaluation share.

The metric is torchmetrics' `MeanAveragePrecision` on its pycocotools backend, i.e. the
official COCO protocol: every prediction is matched against the ground truth of its own image
and class, so a prediction of a class that is absent from an image is a false positive. (A
class absent from the *whole* val set has no AP, as in COCO, and is left out of the means.)

Labels are COCO category ids (`bdd100k.COCO_IDS`), so a COCO-pretrained head stays valid.
BDD's pedestrian and rider both map to COCO "person" (1); per-class AP is therefore reported
per COCO class and named after it, e.g. `AP@0.5 person` with the BDD classes it covers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from avperception_assets.formats import taxonomy as bdd100k
from avperception_assets.model.loader import model_inputs

METRIC_BACKEND = "pycocotools"
SIZES = ("small", "medium", "large")  # COCO's area ranges, in the order of its precision array
# COCOeval's IoU thresholds and recall points (`Params.iouThrs`, `recThrs`), computed as it does.
# torchmetrics' defaults are these rounded to float32, which moves a precision-recall point that
# lands exactly on a recall point (0.3 of 10 objects), so its figures could differ from COCOeval's.
COCO_IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
COCO_RECALL_POINTS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)


def coco_category_names() -> list[str]:
    """torchvision's 91 COCO category names, indexed by category id."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    return list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


def mode_class_ids(classes: Iterable[str]) -> dict[int, list[str]]:
    """COCO ids the mode cares about -> the BDD classes each one covers (sorted by id)."""
    covered: dict[int, list[str]] = {}
    for name in classes:
        if name not in bdd100k.COCO_IDS:
            raise ValueError(f"unknown BDD class {name!r}; expected one of {sorted(bdd100k.COCO_IDS)}")
        covered.setdefault(bdd100k.COCO_IDS[name], []).append(name)
    return dict(sorted(covered.items()))



def predict(model: torch.nn.Module, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
    """Detections of a torchvision detector for one batch of frames (uint8 or float [0, 1]),
    returned on the CPU."""
    model.eval()
    with torch.inference_mode():
        outputs = model(model_inputs(images, next(model.parameters()).device))
    return [{key: out[key].detach().cpu() for key in ("boxes", "scores", "labels")} for out in outputs]


def compute_metrics(predictions: Sequence[Mapping[str, Tensor]],
                    targets: Sequence[Mapping[str, Tensor]],
                    class_ids: Mapping[int, Sequence[str]]) -> dict:
    """COCO box metrics of one model.

    `mode`: the headline, over the mode's classes (`class_ids`) only: mAP@0.5, mAP@[.5:.95],
    mAR@100, recall at IoU 0.5 (of 100 detections, `recall_50`) and mAP@[.5:.95] by object
    size, each COCO's own mean restricted to those classes.
    The same figures over every class sit at the top level. `per_class`: AP@0.5, AP and AR@100
    of each COCO id in `class_ids` (None when the val set has no object of that class) and its
    precision at COCO's 101 recall points at IoU 0.5 (`pr_50`, None where undefined). Every
    figure is read from the COCOeval arrays that COCO's summary averages.
    """
    from torchmetrics.detection import MeanAveragePrecision

    # Of these predictions alone: in a distributed run the leader scores by itself while the
    # other ranks wait, and torchmetrics would otherwise gather every rank's state.
    metric = MeanAveragePrecision(iou_type="bbox", class_metrics=True, extended_summary=True,
                                  backend=METRIC_BACKEND, iou_thresholds=COCO_IOU_THRESHOLDS.tolist(),
                                  rec_thresholds=COCO_RECALL_POINTS.tolist(), sync_on_compute=False)
    metric.warn_on_many_detections = False
    metric.update([dict(p) for p in predictions], [dict(t) for t in targets])
    result = metric.compute()
    classes = [int(c) for c in result["classes"].reshape(-1).tolist()]
    # (IoU thresholds, recall thresholds, classes, areas, max dets) and (IoU, classes, areas, max
    # dets); absent when nothing was updated
    precision, recall = result.get("precision"), result.get("recall")
    names = coco_category_names()
    mode_k = [classes.index(c) for c in class_ids if c in classes]
    per_class = {}
    for coco_id, bdd_names in class_ids.items():
        figures = {"coco_id": coco_id, "bdd_classes": list(bdd_names), "ap_50": None, "ap": None, "ar_100": None,
                   "pr_50": None}
        if coco_id in classes:
            k = classes.index(coco_id)
            figures.update(ap=_figure(result["map_per_class"].reshape(-1)[k]), ap_50=_coco_mean(precision[:1], [k]),
                           ar_100=_figure(result["mar_100_per_class"].reshape(-1)[k]),
                           pr_50=[None if v < 0 else round(float(v), 6) for v in precision[0, :, k, 0, -1].tolist()])
        per_class[names[coco_id]] = figures
    sizes = {f"map_{size}": _figure(result[f"map_{size}"]) for size in SIZES}
    return {
        "mode": _mode_figures(precision, recall, mode_k),
        "map_50": _figure(result["map_50"]),
        "map": _figure(result["map"]),
        "mar_100": _figure(result["mar_100"]),
        **sizes,
        "per_class": per_class,
    }


def _mode_figures(precision: Tensor | None, recall: Tensor | None, ks: Sequence[int]) -> dict:
    """The headline over the classes at positions `ks` (all None when the val set has none)."""
    if not ks:
        return dict.fromkeys(["map_50", "map", "mar_100", "recall_50", *(f"map_{size}" for size in SIZES)])
    return {"map_50": _coco_mean(precision[:1], ks), "map": _coco_mean(precision, ks),
            "mar_100": _coco_mean(recall[:, None], ks), "recall_50": _coco_mean(recall[:1, None], ks),
            **{f"map_{size}": _coco_mean(precision, ks, area) for area, size in enumerate(SIZES, start=1)}}


def _coco_mean(array: Tensor, ks: Sequence[int], area: int = 0) -> float | None:
    """COCOeval.summarize's mean over the entries of classes `ks` at one area range and 100
    detections, in float32 like COCO's other figures; None when nothing is defined."""
    values = array[:, :, ks, area, -1].numpy()
    valid = values[values > -1]
    return float(np.float32(valid.mean())) if len(valid) else None


def _figure(value: Tensor) -> float | None:
    """A COCO figure, None where COCO reports -1 (nothing to measure)."""
    value = float(value)
    return None if value < 0 else value

