"""Writing evaluations down: COCO JSON, PNG panels, report.json / report.md, and the summary
over every failure mode. Every figure comes from an `evaluation.Evaluation`; nothing here
runs a model."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from torch import Tensor

from .detections import METRIC_BACKEND, coco_category_names
from .evaluation import BASELINE, FINETUNED, Evaluation, PanelFrame

MODEL_TITLES = {BASELINE: "baseline", FINETUNED: "fine-tuned"}
COLORS = {"ground truth": "green", BASELINE: "red", FINETUNED: "blue"}

GROUND_TRUTH_FILE = "ground_truth_coco.json"
PREDICTIONS_FILES = {BASELINE: "baseline_predictions_coco.json",
                     FINETUNED: "finetuned_predictions_coco.json"}
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PANELS_DIR = "panels"


def delta_pct(baseline: float | None, finetuned: float | None) -> float | None:
    """Relative change of fine-tuned over baseline in percent; None when undefined (baseline 0)."""
    if baseline is None or finetuned is None or baseline == 0:
        return None
    return (finetuned - baseline) / baseline * 100.0


def metric_rows(baseline: Mapping, finetuned: Mapping) -> list[dict]:
    """The report's table: one row per figure with baseline, fine-tuned and Δ%."""
    rows = [("mAP@0.5", "map_50"), ("mAP@[.5:.95]", "map"), ("recall (mAR@100)", "mar_100")]
    table = [{"metric": label, "baseline": baseline[key], "finetuned": finetuned[key]}
             for label, key in rows]
    for name, figures in baseline["per_class"].items():
        tuned = finetuned["per_class"][name]
        covers = "+".join(figures["bdd_classes"])
        for label, key in (("AP@0.5", "ap_50"), ("AP@[.5:.95]", "ap")):
            table.append({"metric": f"{label} {name} ({covers})", "baseline": figures[key],
                          "finetuned": tuned[key]})
    for row in table:
        row["delta_pct"] = delta_pct(row["baseline"], row["finetuned"])
    return table


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _fmt_delta(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}%"


def rows_markdown(rows: Sequence[Mapping]) -> str:
    """A markdown table of metric rows: metric, baseline, fine-tuned, Δ%."""
    lines = ["| metric | baseline | fine-tuned | Δ% |", "|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['metric']} | {_fmt(row['baseline'])} | "
                     f"{_fmt(row['finetuned'])} | {_fmt_delta(row['delta_pct'])} |")
    return "\n".join(lines)


# --- COCO JSON -----------------------------------------------------------------------------

def _xywh(boxes: Tensor) -> list[list[float]]:
    from torchvision.ops import box_convert

    return box_convert(boxes.reshape(-1, 4).float(), "xyxy", "xywh").tolist()


def coco_ground_truth(evaluation: Evaluation) -> dict:
    """The val frames and their boxes as a COCO dataset (image id = position, file = frame id).

    Categories are every class in the ground truth or any model's predictions, as in the
    metric, so `COCOeval` on these files scores exactly what the report scored.
    """
    names = coco_category_names()
    used = {int(c) for t in evaluation.targets for c in t["labels"]}
    used |= {int(c) for preds in evaluation.predictions.values() for p in preds for c in p["labels"]}
    images = [{"id": i, "file_name": image_id, "height": h, "width": w}
              for i, (image_id, (h, w)) in enumerate(zip(evaluation.image_ids, evaluation.sizes))]
    annotations = []
    for i, target in enumerate(evaluation.targets):
        for box, label in zip(_xywh(target["boxes"]), target["labels"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(label),
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    categories = [{"id": c, "name": names[c]} for c in sorted(used)]
    return {"info": {"description": "AV Perception Assets val view ground truth"},
            "images": images, "annotations": annotations, "categories": categories}


def coco_detections(predictions: Sequence[Mapping[str, Tensor]]) -> list[dict]:
    """One model's predictions in COCO results format (loadable by `COCO.loadRes`, which
    refuses an empty list: a model with no detection at all scores 0 without it)."""
    results = []
    for i, pred in enumerate(predictions):
        for box, score, label in zip(_xywh(pred["boxes"]), pred["scores"].tolist(),
                                     pred["labels"].tolist()):
            results.append({"image_id": i, "category_id": int(label), "bbox": box, "score": score})
    return results


# --- panels --------------------------------------------------------------------------------

def _resize(image: Tensor, boxes: Tensor, width: int) -> tuple[Tensor, Tensor]:
    from torchvision.transforms.functional import resize

    scale = width / image.shape[-1]
    height = max(1, round(image.shape[-2] * scale))
    return resize(image, [height, width], antialias=True), boxes.reshape(-1, 4) * scale


def _draw(image: Tensor, boxes: Tensor, labels: Sequence[str], color: str) -> Tensor:
    from torchvision.utils import draw_bounding_boxes

    if len(boxes) == 0:
        return image
    return draw_bounding_boxes(image, boxes, labels=list(labels), colors=color, width=2)


def draw_panel(frame: PanelFrame, target: Mapping[str, Tensor],
               predictions: Mapping[str, Mapping[str, Tensor]], *,
               score_threshold: float = 0.5, tile_width: int = 400):
    """The same frame side by side: ground truth (green), baseline (red), fine-tuned (blue).

    Predictions below `score_threshold` are not drawn (they still count in the metrics).
    Returns a PIL image with a caption over each tile.
    """
    from PIL import Image, ImageDraw
    from torchvision.transforms.functional import to_pil_image

    names = coco_category_names()
    tiles = []
    image, boxes = _resize(frame.image, target["boxes"], tile_width)
    gt_labels = [names[int(c)] for c in target["labels"]]
    tiles.append((f"ground truth ({len(boxes)})", _draw(image, boxes, gt_labels, COLORS["ground truth"])))
    for name in (BASELINE, FINETUNED):
        pred = predictions[name]
        keep = pred["scores"] >= score_threshold
        _, boxes = _resize(frame.image, pred["boxes"][keep], tile_width)
        labels = [f"{names[int(c)]} {float(s):.2f}"
                  for c, s in zip(pred["labels"][keep], pred["scores"][keep])]
        tiles.append((f"{MODEL_TITLES[name]} ({len(boxes)} >= {score_threshold})",
                      _draw(image, boxes, labels, COLORS[name])))
    caption = 18
    height = image.shape[-2]
    panel = Image.new("RGB", (tile_width * len(tiles), height + caption), "white")
    pen = ImageDraw.Draw(panel)
    for i, (title, tile) in enumerate(tiles):
        panel.paste(to_pil_image(tile), (i * tile_width, caption))
        color = COLORS["ground truth"] if i == 0 else COLORS[(BASELINE, FINETUNED)[i - 1]]
        pen.text((i * tile_width + 4, 3), title, fill=color)
    return panel


def write_panels(out_dir: Path, evaluation: Evaluation, *, score_threshold: float = 0.5,
                 tile_width: int = 400) -> list[Path]:
    """Save one PNG panel per kept frame under `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, frame in enumerate(evaluation.panel_frames):
        preds = {name: evaluation.predictions[name][frame.index] for name in (BASELINE, FINETUNED)}
        panel = draw_panel(frame, evaluation.targets[frame.index], preds,
                           score_threshold=score_threshold, tile_width=tile_width)
        safe_id = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in frame.image_id)
        path = out_dir / f"panel_{n}_{safe_id}.png"
        panel.save(path, format="PNG", optimize=True)
        paths.append(path)
    return paths


def png_markdown(path: Path) -> str:
    """Markdown that embeds a PNG (base64 data URIs render in the Dagster UI)."""
    return f"**{path.stem}**\n\n![{path.stem}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode('ascii')})"


def panels_markdown(paths: Sequence[Path]) -> str:
    legend = "Ground truth **green** · baseline **red** · fine-tuned **blue**"
    return "\n\n".join([legend, *(png_markdown(p) for p in paths)])


# --- report --------------------------------------------------------------------------------

@dataclass
class Report:
    out_dir: Path
    data: dict  # the content of report.json
    markdown: str  # the content of report.md
    panels: list[Path]

    @property
    def rows(self) -> list[dict]:
        return self.data["rows"]


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(out_dir: Path, evaluation: Evaluation, *, mode: str, val_view: Mapping, baseline: Mapping, finetuned: Mapping,
                 score_threshold: float = 0.5) -> Report:
    """Write COCO JSON (ground truth + both models), panels, report.json and report.md.

    `val_view` names the view and version evaluated on; `baseline`/`finetuned` describe the
    models (checkpoint path and its metadata, or the weights source). Rewrites the folder's
    files, so re-running for the same view version is safe.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"ground_truth": GROUND_TRUTH_FILE, **{f"{k}_predictions": v for k, v in PREDICTIONS_FILES.items()}}
    (out_dir / GROUND_TRUTH_FILE).write_text(json.dumps(coco_ground_truth(evaluation)))
    for name, filename in PREDICTIONS_FILES.items():
        (out_dir / filename).write_text(json.dumps(coco_detections(evaluation.predictions[name])))
    panel_dir = out_dir / PANELS_DIR
    for stale in panel_dir.glob("panel_*.png"):
        stale.unlink()
    panels = write_panels(panel_dir, evaluation, score_threshold=score_threshold)
    rows = metric_rows(evaluation.metrics[BASELINE], evaluation.metrics[FINETUNED])
    num_objects = sum(len(t["labels"]) for t in evaluation.targets)
    data = _json_safe({
        "mode": mode,
        "classes": evaluation.classes,
        "generated_at": datetime.now(timezone.utc).isoformat(),
        "val_view": dict(val_view),
        "report_dir": out_dir,
        "num_images": len(evaluation.image_ids),
        "num_objects": num_objects,
        "models": {BASELINE: dict(baseline), FINETUNED: dict(finetuned)},
        "metrics": evaluation.metrics,
        "delta_pct": {row["metric"]: row["delta_pct"] for row in rows},
        "rows": rows,
        "protocol": {"metric": "torchmetrics.detection.MeanAveragePrecision", "backend": METRIC_BACKEND,
                     "iou_type": "bbox", "label_space": "COCO category ids (bdd100k.COCO_IDS)",
                     "panel_score_threshold": score_threshold},
        "files": {**files, "panels": [str(p.relative_to(out_dir)) for p in panels]},
    })
    (out_dir / REPORT_JSON).write_text(json.dumps(data, indent=2))
    markdown = report_markdown(data)
    (out_dir / REPORT_MD).write_text(markdown)
    return Report(out_dir, data, markdown, panels)


def report_markdown(data: Mapping) -> str:
    """report.md: the table, what was evaluated, and the panels (as relative links)."""
    view = data["val_view"]
    lines = [
        f"# Failure mode `{data['mode']}`: baseline vs fine-tuned",
        "",
        f"Val view `{view.get('name')}` version {view.get('version')}: {data['num_images']} frame(s), "
        f"{data['num_objects']} objects. Classes that matter: {', '.join(data['classes'])}.",
        "",
        rows_markdown(data["rows"]),
        "",
        "Δ% = (fine-tuned − baseline) / baseline; n/a where the baseline is 0 or there is "
        "nothing to measure. COCO protocol (torchmetrics `MeanAveragePrecision`, pycocotools); "
        "a prediction of a class absent from a frame is a false positive. Per-class AP is per "
        "COCO class: `person` scores BDD pedestrians and riders alike (both are COCO person); "
        "the parentheses name the mode's classes it stands for.",
        "",
        "## Models",
    ]
    for name, info in data["models"].items():
        lines.append(f"- **{MODEL_TITLES[name]}**: `{json.dumps(info, sort_keys=True)}`")
    lines += ["", "## Files",
              f"- ground truth: `{data['files']['ground_truth']}` (COCO dataset)",
              *[f"- {MODEL_TITLES[k]} predictions: `{v}` (COCO results)"
                for k, v in PREDICTIONS_FILES.items()],
              "", "## Panels", "Ground truth green · baseline red · fine-tuned blue", ""]
    lines += [f"![{Path(p).stem}]({p})" for p in data["files"]["panels"]]
    return "\n".join(lines) + "\n"


def summary_rows(reports: Mapping[str, Mapping]) -> list[dict]:
    """Rows over all modes from their report.json contents (mode -> report data)."""
    return [{"mode": mode, **row} for mode, data in reports.items() for row in data["rows"]]


def summary_markdown(reports: Mapping[str, Mapping]) -> str:
    """One table over every failure mode: metric, baseline, fine-tuned, Δ%."""
    lines = ["| failure mode | metric | baseline | fine-tuned | Δ% |", "|---|---|---:|---:|---:|"]
    for row in summary_rows(reports):
        lines.append(f"| {row['mode']} | {row['metric']} | {_fmt(row['baseline'])} | "
                     f"{_fmt(row['finetuned'])} | {_fmt_delta(row['delta_pct'])} |")
    return "\n".join(lines)


def write_summary(out_dir: Path, reports: Mapping[str, Mapping]) -> tuple[Path, Path, str]:
    """Write summary.md and summary.json (rows plus each mode's data/model versions)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = summary_markdown(reports)
    md_path, json_path = out_dir / "summary.md", out_dir / "summary.json"
    md_path.write_text("# Failure modes: baseline vs fine-tuned\n\n" + markdown + "\n")
    sources = {mode: {"val_view": data["val_view"], "models": data["models"],
                      "report_dir": data["report_dir"]} for mode, data in reports.items()}
    json_path.write_text(json.dumps(_json_safe({
        "generated_at": datetime.now(timezone.utc).isoformat(),
        "rows": summary_rows(reports), "modes": sources}), indent=2))
    return md_path, json_path, markdown


def read_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())


