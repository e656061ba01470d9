"""Writing evaluations down: COCO JSON, PNG panels, matplotlib plots (precision-recall curves,
bootstrap intervals), report.json / report.md, and the summary over every failure mode. Every
figure comes from an `evaluation.Evaluation` and its stored frame matches; nothing here runs a
model. matplotlib is imported by the drawing functions only."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
from torch import Tensor

from avperception_assets.evaluation import base_report, bootstrap, frame_errors, tracks
from avperception_assets.evaluation.comparison import BASELINE, FINETUNED, Evaluation, PanelFrame, frame_rows, tiled_name
from avperception_assets.formats import coco
from avperception_assets.model.detections import METRIC_BACKEND, SIZES, coco_category_names
from avperception_assets.tracking.tracker import TrackerSettings

MODEL_TITLES = {BASELINE: "baseline", FINETUNED: "fine-tuned"}
COLORS = {"ground truth": "green", BASELINE: "red", FINETUNED: "blue"}
DELTA = "delta"  # the intervals' paired difference, fine-tuned − baseline
# Everything the intervals cover, in the order tables and plots show it
INTERVAL_TITLES = {BASELINE: "baseline", FINETUNED: "fine-tuned", tiled_name(BASELINE): "baseline tiled",
                   tiled_name(FINETUNED): "fine-tuned tiled", DELTA: "fine-tuned − baseline (points)"}
INTERVAL_COLORS = {**COLORS, tiled_name(BASELINE): "salmon", tiled_name(FINETUNED): "cornflowerblue", DELTA: "black"}

GROUND_TRUTH_FILE = "ground_truth_coco.json"
PREDICTIONS_FILES = {BASELINE: "baseline_predictions_coco.json",
                     FINETUNED: "finetuned_predictions_coco.json"}
TILED_PREDICTIONS_FILES = {BASELINE: "baseline_tiled_predictions_coco.json",
                           FINETUNED: "finetuned_tiled_predictions_coco.json"}
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PANELS_DIR = "panels"
PR_CURVES_FILE = "pr_curves.png"
INTERVALS_FILE = "intervals.png"


def delta_points(baseline: float | None, finetuned: float | None) -> float | None:
    """Fine-tuned − baseline in points (a difference of APs x 100); None when either is undefined.
    Not a ratio: on a baseline near 0 a ratio is huge and means nothing."""
    if baseline is None or finetuned is None:
        return None
    return (finetuned - baseline) * bootstrap.POINTS


SUMMARY_FIGURES = (("mAP@0.5", "map_50"), ("mAP@[.5:.95]", "map"), ("recall (mAR@100)", "mar_100"))
SIZE_FIGURES = tuple((f"mAP@[.5:.95] {size}", f"map_{size}") for size in SIZES)
MODE_SCOPE, ALL_SCOPE = "mode classes", "all classes"
# Each scope's short name (metadata keys) and its label in the tables
SCOPES = {"mode": MODE_SCOPE, "all_classes": ALL_SCOPE}


def scoped(metrics: Mapping, scope: str) -> Mapping:
    """One model's figures over the mode's classes (`mode`) or over every class (`all_classes`)."""
    return metrics["mode"] if scope == "mode" else metrics


def _scope_rows(baseline: Mapping, finetuned: Mapping, scope: str, figures) -> list[dict]:
    return [{"metric": f"{label} ({SCOPES[scope]})", "baseline": scoped(baseline, scope)[key],
             "finetuned": scoped(finetuned, scope)[key]} for label, key in figures]


def _with_delta(table: list[dict]) -> list[dict]:
    for row in table:
        row["delta_points"] = delta_points(row["baseline"], row["finetuned"])
    return table


def metric_rows(baseline: Mapping, finetuned: Mapping) -> list[dict]:
    """The report's table: one row per figure with baseline, fine-tuned and Δ in points. The headline
    comes first, over the mode's own classes; then each of those classes; then, secondary, the
    figures over every class in the val view."""
    table = _scope_rows(baseline, finetuned, "mode", SUMMARY_FIGURES)
    for name, figures in baseline["per_class"].items():
        tuned = finetuned["per_class"][name]
        covers = "+".join(figures["bdd_classes"])
        for label, key in (("AP@0.5", "ap_50"), ("AP@[.5:.95]", "ap")):
            table.append({"metric": f"{label} {name} ({covers})", "baseline": figures[key],
                          "finetuned": tuned[key]})
    return _with_delta(table + _scope_rows(baseline, finetuned, "all_classes", SUMMARY_FIGURES))


def size_rows(baseline: Mapping, finetuned: Mapping) -> list[dict]:
    """mAP@[.5:.95] by COCO object size (small < 32² px ≤ medium < 96² px ≤ large), over the
    mode's classes and over all classes."""
    return _with_delta([row for scope in SCOPES for row in _scope_rows(baseline, finetuned, scope, SIZE_FIGURES)])


# The tiled table's columns: each model untiled (as in the headline) and tiled.
TILING_COLUMNS = {BASELINE: (BASELINE, False), f"{BASELINE}_tiled": (BASELINE, True),
                  FINETUNED: (FINETUNED, False), f"{FINETUNED}_tiled": (FINETUNED, True)}
TILING_TITLES = {BASELINE: "baseline", f"{BASELINE}_tiled": "baseline tiled",
                 FINETUNED: "fine-tuned", f"{FINETUNED}_tiled": "fine-tuned tiled"}
TILING_FIGURES = (("recall@IoU 0.5", "recall_50"), ("recall (mAR@100)", "mar_100"))
TIME_PER_FRAME = "time per frame (s, inference only)"


def tiling_rows(untiled: Evaluation, tiled: Evaluation) -> list[dict]:
    """Both models untiled and tiled, side by side, over the mode's classes: mAP@0.5, each
    class's AP@0.5, recall at IoU 0.5 and mAR@100, and the inference time per frame."""
    runs = {column: (tiled if is_tiled else untiled, model) for column, (model, is_tiled) in TILING_COLUMNS.items()}

    def row(metric: str, figure) -> dict:
        return {"metric": metric, **{column: figure(*run) for column, run in runs.items()}}

    rows = [row(f"mAP@0.5 ({MODE_SCOPE})", lambda ev, model: ev.metrics[model]["mode"]["map_50"])]
    for name, figures in untiled.metrics[BASELINE]["per_class"].items():
        rows.append(row(f"AP@0.5 {name} ({'+'.join(figures['bdd_classes'])})",
                        lambda ev, model, name=name: ev.metrics[model]["per_class"][name]["ap_50"]))
    rows += [row(f"{label} ({MODE_SCOPE})", lambda ev, model, key=key: ev.metrics[model]["mode"][key])
             for label, key in TILING_FIGURES]
    return rows + [row(TIME_PER_FRAME, lambda ev, model: ev.seconds_per_frame(model))]


def tiling_markdown(rows: Sequence[Mapping]) -> str:
    """A markdown table of tiling rows: metric, then each model untiled and tiled."""
    lines = ["| metric | " + " | ".join(TILING_TITLES.values()) + " |", "|---|" + "---:|" * len(TILING_TITLES)]
    lines += [f"| {row['metric']} | " + " | ".join(_fmt(row[column]) for column in TILING_TITLES) + " |"
              for row in rows]
    return "\n".join(lines)


def tiling_description(tiling: Mapping) -> str:
    whole = " plus the whole frame at the model's input size" if tiling["whole_frame"] else ""
    return (f"{tiling['tile_size']}x{tiling['tile_size']} px tiles at full resolution, overlapping by "
            f"{tiling['overlap']:.0%}{whole}; boxes cut by a tile edge dropped where the object is whole in "
            f"another tile, then class-wise NMS at IoU 0.5")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _fmt_delta(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}"


def rows_markdown(rows: Sequence[Mapping]) -> str:
    """A markdown table of metric rows: metric, baseline, fine-tuned, Δ in points."""
    lines = ["| metric | baseline | fine-tuned | Δ (points) |", "|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['metric']} | {_fmt(row['baseline'])} | "
                     f"{_fmt(row['finetuned'])} | {_fmt_delta(row['delta_points'])} |")
    return "\n".join(lines)


# --- intervals -------------------------------------------------------------------------------

def report_intervals(frames: pa.Table, class_ids: Sequence[int]) -> dict:
    """The bootstrap intervals of every model in `frames` (the `<mode>_eval_frames` rows) over
    the mode's classes, and of fine-tuned − baseline on the same resamples, in INTERVAL_TITLES order."""
    found = bootstrap.intervals(bootstrap.matches_from_rows(frames, class_ids), {DELTA: (BASELINE, FINETUNED)})
    return {name: found[name] for name in INTERVAL_TITLES if name in found}


def intervals_markdown(intervals: Mapping) -> str:
    """A markdown table: each model's figures and the delta, each with its 95% interval."""
    lines = ["| | " + " | ".join(f"{label} (mode classes)" for label in bootstrap.METRICS.values()) + " |",
             "|---|" + "---:|" * len(bootstrap.METRICS)]
    lines += [f"| {INTERVAL_TITLES[name]} | " + " | ".join(bootstrap.interval_text(figures[key], name == DELTA)
                                                           for key in bootstrap.METRICS) + " |"
              for name, figures in intervals.items()]
    return "\n".join(lines)


def intervals_description(intervals: Mapping) -> str:
    """How the intervals were made and how the verdict reads them, in one paragraph."""
    entry = intervals[DELTA][bootstrap.VERDICT_METRIC]
    return (f"{entry['confidence']:.0%} percentile bootstrap intervals over the {entry['frames']} frames "
            f"({entry['objects']} objects of the mode's classes): {entry['resamples']:,} resamples of the frames, "
            f"seed {entry['seed']}, scored from the stored matches; the delta is paired (the same resamples). "
            f"The verdict reads the delta of AP@0.5: better when its interval lies above 0, worse below, "
            f"otherwise no detectable difference.")


# --- COCO JSON -----------------------------------------------------------------------------

def _corners(boxes: Tensor) -> np.ndarray:
    return boxes.reshape(-1, 4).float().numpy()


def coco_ground_truth(evaluation: Evaluation) -> coco.Dataset:
    """The val frames and their boxes as a COCO dataset (image id = position, file = frame id).

    Categories are every class in the ground truth or any model's predictions, as in the
    metric, so `COCOeval` on these files scores exactly what the report scored.
    """
    names = coco_category_names()
    used = {int(c) for t in evaluation.targets for c in t["labels"]}
    used |= {int(c) for preds in evaluation.predictions.values() for p in preds for c in p["labels"]}
    dataset = coco.Dataset({"description": "AV Perception Assets val view ground truth"},
                           {c: names[c] for c in sorted(used)}, first_image_id=0)
    for frame_id, (height, width), target in zip(evaluation.image_ids, evaluation.sizes, evaluation.targets):
        dataset.add_image(frame_id, width, height, target["labels"].tolist(), _corners(target["boxes"]),
                          target["iscrowd"].tolist() if "iscrowd" in target else None)
    return dataset


def coco_detections(predictions: Sequence[Mapping[str, Tensor]]) -> list[dict]:
    """One model's predictions in COCO results format (loadable by `COCO.loadRes`, which
    refuses an empty list: a model with no detection at all scores 0 without it)."""
    return [detection for i, pred in enumerate(predictions)
            for detection in coco.detections(i, pred["labels"].tolist(), _corners(pred["boxes"]),
                                             pred["scores"].tolist())]


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


def write_panels(out_dir: Path, evaluation: Evaluation, *, frames: Sequence[PanelFrame] | None = None,
                 prefix: str = "panel", score_threshold: float = 0.5, tile_width: int = 400) -> list[Path]:
    """Save one PNG panel per frame of `frames` (default: the evaluation's panel frames) under
    `out_dir` as `<prefix>_<n>_<frame id>.png`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, frame in enumerate(evaluation.panel_frames if frames is None else frames):
        preds = {name: evaluation.predictions[name][frame.index] for name in (BASELINE, FINETUNED)}
        panel = draw_panel(frame, evaluation.targets[frame.index], preds,
                           score_threshold=score_threshold, tile_width=tile_width)
        safe_id = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in frame.image_id)
        path = out_dir / f"{prefix}_{n}_{safe_id}.png"
        panel.save(path, format="PNG", optimize=True)
        paths.append(path)
    return paths


def _figure(width: float, height: float):
    """An empty matplotlib figure on the Agg canvas (no pyplot, no display; imported here so that
    the code location loads without matplotlib)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def draw_pr_curves(metrics: Mapping[str, Mapping]):
    """Precision against recall at IoU 0.5 for each of the mode's classes, baseline (red) and
    fine-tuned (blue), one plot per class side by side. Returns a matplotlib Figure."""
    classes = list(metrics[BASELINE]["per_class"])
    figure = _figure(4.2 * len(classes), 3.6)
    recall = np.linspace(0, 1, 101)  # COCO's recall points
    for axes, name in zip(figure.subplots(1, len(classes), squeeze=False)[0], classes):
        for model in (BASELINE, FINETUNED):
            figures = metrics[model]["per_class"][name]
            precision = [np.nan if p is None else p for p in figures["pr_50"] or [None] * len(recall)]
            axes.plot(recall, precision, color=COLORS[model], linewidth=1.5,
                      label=f"{MODEL_TITLES[model]} (AP@0.5 {_fmt(figures['ap_50'])})")
        covers = "+".join(metrics[BASELINE]["per_class"][name]["bdd_classes"])
        axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
                 title=f"{name} ({covers}) at IoU 0.5")
        axes.grid(alpha=0.3)
        axes.legend(loc="lower left", fontsize="small")
    return figure


def _interval_bar(axes, row: int, entry: Mapping, color: str, label: str) -> None:
    if entry["point"] is None or entry["low"] is None:
        return  # nothing measured (no object of the mode's classes)
    spread = [[entry["point"] - entry["low"]], [entry["high"] - entry["point"]]]
    axes.errorbar(entry["point"], row, xerr=spread, fmt="o", color=color, capsize=4, label=label)


def draw_intervals(intervals: Mapping, verdict: str, mode: str):
    """The intervals as a plot: per metric, each model's figure (top) and fine-tuned − baseline
    in points against the 0 line (bottom), each a point with its 95% interval. Returns a Figure."""
    models = [name for name in intervals if name != DELTA]
    figure = _figure(3.6 * len(bootstrap.METRICS) + 2.2, 1.6 + 0.45 * (len(models) + 2))
    grid = figure.subplots(2, len(bootstrap.METRICS), squeeze=False, height_ratios=[len(models) + 1, 2])
    for column, (key, label) in enumerate(bootstrap.METRICS.items()):
        top, bottom = grid[0, column], grid[1, column]
        for row, name in enumerate(models):
            _interval_bar(top, row, intervals[name][key], INTERVAL_COLORS[name], INTERVAL_TITLES[name])
        top.set(xlim=(0, 1), ylim=(len(models) - 0.5, -0.5), xlabel=f"{label} (mode classes)",
                yticks=range(len(models)), yticklabels=[INTERVAL_TITLES[name] for name in models] if not column else [])
        top.grid(axis="x", alpha=0.3)
        bottom.axvline(0, color="gray", linestyle="--", label="no difference")
        _interval_bar(bottom, 0, intervals[DELTA][key], INTERVAL_COLORS[DELTA], "fine-tuned − baseline")
        bottom.set(xlabel=f"Δ {label} (points)", yticks=[])
        bottom.grid(axis="x", alpha=0.3)
    # One legend per row, beside the plots (each metric shows the same entries)
    for axes, place in ((grid[0, 0], "outside right upper"), (grid[1, 0], "outside right lower")):
        figure.legend(*axes.get_legend_handles_labels(), loc=place, fontsize="small")
    entry = intervals[DELTA][bootstrap.VERDICT_METRIC]
    figure.suptitle(f"{mode}: {entry['confidence']:.0%} bootstrap intervals over {entry['frames']} frames "
                    f"({entry['objects']} objects), verdict: {verdict}")
    return figure


def confusion_markdown(confusion: Mapping) -> str:
    """A confusion matrix as a markdown table: rows ground truth, columns prediction."""
    classes = confusion["classes"]
    lines = ["| ground truth \\ predicted | " + " | ".join(classes) + " |",
             "|---|" + "---:|" * len(classes)]
    lines += [f"| {gt} | " + " | ".join(str(n) for n in row) + " |" for gt, row in zip(classes, confusion["matrix"])]
    return "\n".join(lines)


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
    worst_panels: list[Path]

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


def _worst_frames(evaluation: Evaluation, panels: Sequence[Path], out_dir: Path) -> list[dict]:
    class_ids = evaluation.class_ids
    rows = []
    for frame, panel in zip(evaluation.worst_frames, panels):
        errors = evaluation.frame_errors[FINETUNED][frame.index]
        counts = errors.total(class_ids)
        rows.append({"image_id": frame.image_id, "frame_index": frame.index,
                     "error_score": errors.error_score(class_ids), "misses": counts.misses,
                     "confident_fp": counts.confident_fp, "panel": str(panel.relative_to(out_dir))})
    return rows


def _write_pictures(out_dir: Path, evaluation: Evaluation, score_threshold: float) -> tuple[list[Path], list[Path]]:
    """The panels (first frames with the mode's classes, and the fine-tuned model's worst
    frames) and the precision-recall curves, replacing those of an earlier write."""
    panel_dir = out_dir / PANELS_DIR
    for stale in [*panel_dir.glob("panel_*.png"), *panel_dir.glob("worst_*.png")]:
        stale.unlink()
    panels = write_panels(panel_dir, evaluation, score_threshold=score_threshold)
    worst = write_panels(panel_dir, evaluation, frames=evaluation.worst_frames, prefix="worst",
                         score_threshold=score_threshold)
    draw_pr_curves(evaluation.metrics).savefig(out_dir / PR_CURVES_FILE, format="png")
    return panels, worst


def _tiling_data(out_dir: Path, evaluation: Evaluation, tiled: Evaluation | None, tiling: Mapping | None) -> dict | None:
    """The tiled figures beside the untiled ones, and the tiled models' COCO predictions; None
    without a tiled evaluation (stale tiled files are removed)."""
    if (tiled is None) != (tiling is None):
        raise ValueError("a tiled evaluation comes with its tiling, and a tiling with its evaluation")
    for name, filename in TILED_PREDICTIONS_FILES.items():
        path = out_dir / filename
        if tiled is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(json.dumps(coco_detections(tiled.predictions[name])))
    if tiled is None:
        return None
    return {"spec": dict(tiling), "metrics": tiled.metrics,
            "seconds_per_frame": {name: tiled.seconds_per_frame(name) for name in TILED_PREDICTIONS_FILES},
            "rows": tiling_rows(evaluation, tiled),
            "files": {f"{k}_predictions": v for k, v in TILED_PREDICTIONS_FILES.items()}}


def _tracking_data(out_dir: Path, evaluation: Evaluation, frames: pa.Table, tracker: TrackerSettings) -> dict | None:
    """Both models' tracks on the val view's clips and the coverage of the mode's tracks
    (`tracks.write_tracking`); None when the view has no frame of a clip."""
    clips = None if evaluation.clips is None else tracks.clips_of(evaluation.clips, evaluation.image_ids)
    return tracks.write_tracking(out_dir, clips, image_sizes=evaluation.sizes,
                                 predictions={model: evaluation.predictions[model] for model in (BASELINE, FINETUNED)},
                                 frames=frames, classes=evaluation.classes, worst_by=FINETUNED, settings=tracker)


def write_report(out_dir: Path, evaluation: Evaluation, *, mode: str, val_view: Mapping, baseline: Mapping, finetuned: Mapping,
                 score_threshold: float = 0.5, eval_frames: Mapping | None = None, tiled: Evaluation | None = None,
                 tiling: Mapping | None = None, frames: pa.Table | None = None,
                 tracker: TrackerSettings = TrackerSettings()) -> Report:
    """Write COCO JSON (ground truth + both models), panels, the precision-recall curves, the
    bootstrap intervals and their plot, report.json and report.md.

    `val_view` names the view and version evaluated on; `baseline`/`finetuned` describe the
    models (checkpoint path and its metadata, or the weights source); `eval_frames` names the
    `<mode>_eval_frames` table and version holding this evaluation's frames, and `frames` are
    its rows as stored, from which the intervals are computed (default: the rows this
    evaluation makes, `comparison.frame_rows`). `tiled`, the same frames evaluated with tiled
    inference as `tiling` describes it (tile_size, overlap, whole_frame), adds a table of both
    models untiled and tiled. Where the evaluation has frames of clips, both models' detections
    are linked into tracks by `tracker` and scored against the clips' tracks, with the coverage
    of each track of the mode's classes (`tracks`; report.json's `tracking`, None without clips).
    Rewrites the folder's files, so re-running for the same view version is safe.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"ground_truth": GROUND_TRUTH_FILE, **{f"{k}_predictions": v for k, v in PREDICTIONS_FILES.items()}}
    frames = frame_rows(evaluation, tiled) if frames is None else frames
    intervals = report_intervals(frames, evaluation.class_ids)
    verdict = bootstrap.verdict(intervals[DELTA][bootstrap.VERDICT_METRIC])
    coco_ground_truth(evaluation).write(out_dir / GROUND_TRUTH_FILE)
    for name, filename in PREDICTIONS_FILES.items():
        (out_dir / filename).write_text(json.dumps(coco_detections(evaluation.predictions[name])))
    tiling_data = _tiling_data(out_dir, evaluation, tiled, tiling)
    tracking = _tracking_data(out_dir, evaluation, frames, tracker)
    panels, worst = _write_pictures(out_dir, evaluation, score_threshold)
    draw_intervals(intervals, verdict, mode).savefig(out_dir / INTERVALS_FILE, format="png")
    rows = metric_rows(evaluation.metrics[BASELINE], evaluation.metrics[FINETUNED])
    names = coco_category_names()
    data = _json_safe({
        "mode": mode,
        "classes": evaluation.classes,
        "generated_at": datetime.now(timezone.utc).isoformat(),
        "val_view": dict(val_view),
        "eval_frames": dict(eval_frames or {}),
        "report_dir": out_dir,
        "num_images": len(evaluation.image_ids),
        "num_objects": sum(len(t["labels"]) - int(t["iscrowd"].sum()) if "iscrowd" in t else len(t["labels"])
                           for t in evaluation.targets),  # crowd regions are no objects
        "models": {BASELINE: dict(baseline), FINETUNED: dict(finetuned)},
        "metrics": evaluation.metrics,
        "seconds_per_frame": {model: evaluation.seconds_per_frame(model) for model in (BASELINE, FINETUNED)},
        "tiling": tiling_data,
        "tracking": tracking,
        "intervals": intervals,
        "verdict": verdict,
        "delta_points": {row["metric"]: row["delta_points"] for row in rows},
        "rows": rows,
        "size_rows": size_rows(evaluation.metrics[BASELINE], evaluation.metrics[FINETUNED]),
        "confusion": {model: frame_errors.confusion(evaluation.predictions[model], evaluation.targets, names,
                                                    min_score=score_threshold) for model in (BASELINE, FINETUNED)},
        "worst_frames": _worst_frames(evaluation, worst, out_dir),
        "protocol": {"metric": "torchmetrics.detection.MeanAveragePrecision", "backend": METRIC_BACKEND,
                     "iou_type": "bbox", "label_space": "COCO category ids (bdd100k.COCO_IDS)",
                     "headline": "over the mode's classes; all-class figures are secondary",
                     "frame_matching": "COCO greedy matching at IoU 0.50:0.05:0.95 (errors and panels at "
                                       f"IoU {frame_errors.IOU_THRESHOLD})",
                     "intervals": "percentile bootstrap over frames from the stored matches, paired delta; "
                                  "models' figures as fractions, the delta in points (AP x 100)",
                     "verdict": f"from the delta's interval of {bootstrap.VERDICT_METRIC} (mode classes): "
                                f"{bootstrap.BETTER} above 0, {bootstrap.WORSE} below 0, "
                                f"otherwise {bootstrap.NO_DIFFERENCE}",
                     "delta": "fine-tuned − baseline in points (AP x 100)",
                     "tracking": "on the val view's frames of clips: each model's detections linked into tracks "
                                 "(tracking.tracker), BDD100K box_track figures in percent (tracking.metrics) in the "
                                 "detector's label space; per-track coverage of the mode's classes from the frame "
                                 f"matches at IoU {frame_errors.IOU_THRESHOLD}",
                     "panel_score_threshold": score_threshold},
        "files": {**files, "panels": [str(p.relative_to(out_dir)) for p in panels], "pr_curves": PR_CURVES_FILE,
                  "intervals": INTERVALS_FILE},
    })
    (out_dir / REPORT_JSON).write_text(json.dumps(data, indent=2))
    markdown = report_markdown(data)
    (out_dir / REPORT_MD).write_text(markdown)
    return Report(out_dir, data, markdown, panels, worst)


def worst_frames_markdown(data: Mapping) -> str:
    """The fine-tuned model's worst frames on the mode's classes, as a table."""
    lines = ["| frame | misses | confident false positives | panel |", "|---|---:|---:|---|"]
    lines += [f"| `{w['image_id']}` | {w['misses']} | {w['confident_fp']} | `{w['panel']}` |"
              for w in data["worst_frames"]]
    return "\n".join(lines)


def _tiling_section(data: Mapping) -> list[str]:
    tiling = data.get("tiling")
    if not tiling:
        return []
    return ["## Tiled inference", "",
            f"The same frames with tiled inference: {tiling_description(tiling['spec'])}. Recall@IoU 0.5 is "
            "COCO's recall at IoU 0.5 (100 detections per frame); time per frame is the wall time of "
            "inference alone, decoding excluded. Predictions: "
            + ", ".join(f"`{f}`" for f in tiling["files"].values()) + ".", "",
            tiling_markdown(tiling["rows"]), ""]


def tracking_description(tracking: Mapping) -> str:
    """How the tracks were made and scored, in one paragraph."""
    tracker, files = tracking["tracker"], tracking["files"]
    return (f"{tracking['clips']} clip(s), {tracking['frames']} frame(s) of the val view. Each model's detections "
            f"scoring at least {tracker['min_score']} are linked frame to frame (IoU at least {tracker['min_iou']} "
            f"with a track's last box, an optimal assignment per class, a track kept through {tracker['max_missed']} "
            "missed frames) and scored against the clips' ground-truth tracks with BDD100K's box_track figures "
            "(ratios in percent), in the detector's label space: COCO person counts BDD pedestrians and riders "
            "alike, as pedestrian. To re-run: `python -m avperception_assets.tracking evaluate --gt "
            f"{files['ground_truth']} --pred {files[FINETUNED]}`.")


def coverage_description(data: Mapping) -> str:
    return (f"Coverage of each ground-truth track of {', '.join(data['classes'])}: the share of its frames in "
            f"which the model found it (matched at IoU {frame_errors.IOU_THRESHOLD}, as the frame errors), and its "
            f"longest run of missed frames; crowd regions are no tracks. The {tracks.WORST_TRACKS} worst tracks of "
            "the fine-tuned model:")


def _tracking_files(data: Mapping) -> list[str]:
    if not data.get("tracking"):
        return []
    files = data["tracking"]["files"]
    return [f"- clips' ground-truth tracks: `{files['ground_truth']}` (BDD100K MOT)",
            *(f"- {title} tracks: `{files[model]}` (BDD100K MOT)" for model, title in MODEL_TITLES.items())]


def _tracking_section(data: Mapping) -> list[str]:
    tracking = data.get("tracking")
    if not tracking:
        return []
    return ["## Tracks on clips", "", tracking_description(tracking), "",
            tracks.figures_markdown(tracking, MODEL_TITLES), "", coverage_description(data), "",
            tracks.coverage_markdown(tracking, MODEL_TITLES), ""]


def report_markdown(data: Mapping) -> str:
    """report.md: the tables, what was evaluated, and the pictures (as relative links)."""
    view, frames = data["val_view"], data.get("eval_frames") or {}
    threshold = data["protocol"]["panel_score_threshold"]
    lines = [
        f"# Failure mode `{data['mode']}`: baseline vs fine-tuned",
        "",
        f"Val view `{view.get('name')}` version {view.get('version')}: {data['num_images']} frame(s), "
        f"{data['num_objects']} objects. Classes that matter: {', '.join(data['classes'])}; the headline "
        f"figures are over those classes only.",
        "",
        f"**Verdict: {data['verdict']}** (fine-tuned against baseline, AP@0.5 over the mode's classes).",
        "",
        intervals_markdown(data["intervals"]),
        "",
        intervals_description(data["intervals"]),
        "",
        f"![intervals]({data['files']['intervals']})",
        "",
        rows_markdown(data["rows"]),
        "",
        "Δ = fine-tuned − baseline in points (AP x 100); n/a where there is nothing to measure. "
        "COCO protocol (torchmetrics `MeanAveragePrecision`, pycocotools); "
        "a prediction of a class absent from a frame is a false positive. Per-class AP is per "
        "COCO class: `person` scores BDD pedestrians and riders alike (both are COCO person); "
        "the parentheses name the mode's classes it stands for.",
        "",
        *_tiling_section(data),
        *_tracking_section(data),
        "## By object size",
        rows_markdown(data["size_rows"]),
        "",
        f"## Precision-recall at IoU 0.5\n\n![precision-recall]({data['files']['pr_curves']})",
        "",
        f"## Confusion between classes (IoU ≥ 0.5, score ≥ {threshold})",
    ]
    for model in (BASELINE, FINETUNED):
        lines += ["", f"**{MODEL_TITLES[model]}**", "", confusion_markdown(data["confusion"][model])]
    every_frame = f" Every frame's matches: table `{frames['table']}` version {frames['version']}." if frames else ""
    lines += ["", "## Worst frames of the fine-tuned model",
              f"Misses plus false positives scoring ≥ {frame_errors.CONFIDENT} on the mode's classes.{every_frame}", "",
              worst_frames_markdown(data), ""]
    lines += [f"![{Path(w['panel']).stem}]({w['panel']})" for w in data["worst_frames"]]
    lines += ["", "## Models"]
    for name, info in data["models"].items():
        lines.append(f"- **{MODEL_TITLES[name]}**: `{json.dumps(info, sort_keys=True)}`")
    lines += ["", "## Files",
              f"- ground truth: `{data['files']['ground_truth']}` (COCO dataset)",
              *[f"- {MODEL_TITLES[k]} predictions: `{v}` (COCO results)"
                for k, v in PREDICTIONS_FILES.items()],
              *_tracking_files(data),
              "", "## Panels", "Ground truth green · baseline red · fine-tuned blue", ""]
    lines += [f"![{Path(p).stem}]({p})" for p in data["files"]["panels"]]
    return "\n".join(lines) + "\n"


def summary_rows(reports: Mapping[str, Mapping]) -> list[dict]:
    """Rows over all modes from their report.json contents (mode -> report data)."""
    return [{"mode": mode, **row} for mode, data in reports.items() for row in data["rows"]]


def verdicts_markdown(reports: Mapping[str, Mapping]) -> str:
    """One line per failure mode: its frames and objects, both models' AP@0.5 over the mode's
    classes and the paired delta in points, each with its 95% interval, and the verdict."""
    key = bootstrap.VERDICT_METRIC
    label = bootstrap.METRICS[key]
    lines = [f"| failure mode | frames | objects | baseline {label} | fine-tuned {label} | Δ {label} (points) | verdict |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for mode, data in reports.items():
        intervals = data["intervals"]
        delta = intervals[DELTA][key]
        lines.append(f"| {mode} | {delta['frames']} | {delta['objects']} | {bootstrap.interval_text(intervals[BASELINE][key])} "
                     f"| {bootstrap.interval_text(intervals[FINETUNED][key])} | {bootstrap.interval_text(delta, True)} "
                     f"| {data['verdict']} |")
    return "\n".join(lines)


def tracks_markdown(reports: Mapping[str, Mapping]) -> str:
    """One line per failure mode whose val view has clips: both models' MOTA and IDF1 (all tracked
    classes) and their coverage of the mode's tracks; empty when no mode has clips."""
    with_clips = {mode: data for mode, data in reports.items() if data.get("tracking")}
    if not with_clips:
        return ""
    lines = ["| failure mode (clips) | clips | tracks | MOTA | IDF1 | mean track coverage | tracks found in under half "
             "their frames |", "|---|---:|---:|---:|---:|---:|---:|"]
    models = (BASELINE, FINETUNED)
    for mode, data in with_clips.items():
        figures, coverage = data["tracking"]["figures"], data["tracking"]["coverage"]
        cells = [" → ".join(tracks.fmt(figures[m][key]) for m in models) for key in ("MOTA", "IDF1")]
        cells += [" → ".join(tracks.share(coverage[m]["mean_coverage"]) for m in models),
                  " → ".join(str(coverage[m]["tracks_under_half"]) for m in models)]
        lines.append(f"| {mode} | {data['tracking']['clips']} | {coverage[FINETUNED]['tracks']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines + ["", "Baseline → fine-tuned; MOTA and IDF1 in percent."])


def summary_markdown(reports: Mapping[str, Mapping]) -> str:
    """The verdicts with their intervals, the tracking figures of the modes with clips, then one
    table over every failure mode: metric, baseline, fine-tuned, Δ in points."""
    tracked = tracks_markdown(reports)
    lines = [verdicts_markdown(reports), "", *([tracked, ""] if tracked else []),
             "| failure mode | metric | baseline | fine-tuned | Δ (points) |", "|---|---|---:|---:|---:|"]
    for row in summary_rows(reports):
        lines.append(f"| {row['mode']} | {row['metric']} | {_fmt(row['baseline'])} | "
                     f"{_fmt(row['finetuned'])} | {_fmt_delta(row['delta_points'])} |")
    return "\n".join(lines)


def write_summary(out_dir: Path, reports: Mapping[str, Mapping], base: Mapping | None = None) -> tuple[Path, Path, str]:
    """Write summary.md and summary.json (rows plus each mode's data/model versions) and, with
    `base` (base_detector_report's report.json), the base detector outside and inside the slices."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = ([summary_markdown(reports)] if reports else []) + ([base_report.summary_markdown(base)] if base else [])
    markdown = "\n\n".join(parts)
    md_path, json_path = out_dir / "summary.md", out_dir / "summary.json"
    md_path.write_text("# Failure modes: baseline vs fine-tuned\n\n" + markdown + "\n")
    sources = {mode: {"val_view": data["val_view"], "models": data["models"], "report_dir": data["report_dir"],
                      "verdict": data["verdict"], "intervals": data["intervals"],
                      "tracking": tracks.headline(data.get("tracking"))} for mode, data in reports.items()}
    base_figures = base and {key: base[key] for key in ("frames_table", "report_dir", "outside", "modes")}
    json_path.write_text(json.dumps(_json_safe({
        "generated_at": datetime.now(timezone.utc).isoformat(),
        "rows": summary_rows(reports), "modes": sources, "base_detector": base_figures}), indent=2))
    return md_path, json_path, markdown


def read_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())


