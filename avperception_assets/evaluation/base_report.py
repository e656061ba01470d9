"""The base detector as a user deploys it, outside every failure mode's slice and inside each.

Plain Python (no Dagster). One pass of the base detector over the curated val frames of the
frames table (split 'val', decoded by curation: `dhash` set; what a val view may hold), at the
frames-table version the val views reflect, stored as any report's matches are
(`comparison.frame_rows`, `frame_errors`). The frames then fall into sets by the views' rows:
inside a mode's slice are the frames its val view holds, outside every slice the val frames no
val view holds. The sets come from the views' source row ids, not from the modes' filters: so
a slice is exactly what its `<mode>_eval_report` scores and no frame any report scores is
counted outside, whatever a view's filter does with NULLs and even when a view was built with
another filter than today's registry. No frame here is trained or selected on: base_detector
trains on the train split and chooses its epoch on a share of it.

From the stored matches (no model runs again), with 95% bootstrap intervals over frames:
- outside: all-class AP@0.5, AP@[.5:.95] and recall at IoU 0.5, and the labelled objects per class;
- each mode: AP off the slices − AP on the slice, over the mode's classes, the two frame sets
  resampled independently (`bootstrap.independent_intervals`). A mode whose classes do not all
  occur outside the slices (rider: riders occur only in its slice) is compared with the base's
  all-class AP off the slices instead. The slice is measurably worse when the interval of the
  AP@0.5 difference lies above 0, measurably better when below, else neither.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import torch

from avperception_assets.evaluation import bootstrap, comparison
from avperception_assets.evaluation.comparison import Evaluation
from avperception_assets.formats.taxonomy import COCO_IDS
from avperception_assets.model import loader
from avperception_assets.model.detections import mode_class_ids
from avperception_assets.storage import tables as storage
from avperception_assets.storage.pixels import SOURCE_ROW_ID

BASE = "base_detector"  # the model's name in the stored rows
VAL_FRAMES = "split = 'val' AND dhash IS NOT NULL"  # the frames a val view may hold
ALL_CLASSES = tuple(COCO_IDS)  # every class the detector is scored on
OFF, ON, OFF_MINUS_ON = "off_slices", "on_slice", "off_minus_on"
MODE_CLASSES, ALL_CLASSES_REFERENCE = "mode classes", "all classes"
WORSE_ON_SLICE, BETTER_ON_SLICE = "measurably worse", "measurably better"
# The verdict of off − on, read as what it says of the slice
SLICE_VERDICTS = {bootstrap.BETTER: WORSE_ON_SLICE, bootstrap.WORSE: BETTER_ON_SLICE,
                  bootstrap.NO_DIFFERENCE: bootstrap.NO_DIFFERENCE}
REPORT_JSON, REPORT_MD = "report.json", "report.md"


@dataclass
class FrameSets:
    """The curated val frames of the frames table at one version, by where they stand."""

    frames_version: int
    outside: list[str]  # image ids of the val frames that no val view holds
    views: dict[str, dict]  # mode -> its val view's name, version and image ids
    categories: dict[str, list[str]]  # image id -> its labelled classes

    def objects_per_class(self, image_ids: Sequence[str]) -> dict[str, int]:
        """Labelled objects of each scored class in the frames `image_ids`, most first."""
        counts = Counter(c for image_id in image_ids for c in self.categories[image_id] if c in COCO_IDS)
        return dict(counts.most_common())


def _view_rows(uri: str, view: loader.ViewRef) -> list[int]:
    table = loader.open_table(uri, view.name, view.version).to_lance()
    return table.to_table(columns=[SOURCE_ROW_ID])[SOURCE_ROW_ID].to_pylist()


def frame_sets(uri: str, val_views: Mapping[str, str]) -> FrameSets:
    """The frames outside every view of `val_views` (mode -> val view name, each at its latest
    version) and inside each, among the curated val frames of the frames table at the version
    the views reflect (its latest when none records one)."""
    pinned = {mode: loader.pin_view(uri, name) for mode, name in val_views.items()}
    reflected = {storage.source_table_version(uri, v.name, v.version)[1] for v in pinned.values()} - {None}
    if len(reflected) > 1:
        raise ValueError(f"the val views reflect different versions of {storage.FRAMES_TABLE} ({sorted(reflected)}): "
                         "refresh the slice views together")
    frames = loader.open_table(uri, storage.FRAMES_TABLE, reflected.pop() if reflected else None)
    val = frames.to_lance().to_table(columns=["image_id", "ann_categories"], filter=VAL_FRAMES, with_row_id=True)
    image_of_row = dict(zip(val["_rowid"].to_pylist(), val["image_id"].to_pylist()))
    views, inside = {}, set()
    for mode, view in pinned.items():
        rows = _view_rows(uri, view)
        stray = [row for row in rows if row not in image_of_row]
        if stray:
            raise ValueError(f"{view.name}@{view.version} holds {len(stray)} rows that are no curated val frame of "
                             f"{storage.FRAMES_TABLE}@{frames.version}")
        views[mode] = {"name": view.name, "version": view.version, "image_ids": [image_of_row[r] for r in rows]}
        inside.update(rows)
    outside = [image for row, image in image_of_row.items() if row not in inside]
    categories = dict(zip(val["image_id"].to_pylist(), (c or [] for c in val["ann_categories"].to_pylist())))
    return FrameSets(int(frames.version), outside, views, categories)


def evaluate(uri: str, sets: FrameSets, model: torch.nn.Module, *, batch_size: int = 8) -> Evaluation:
    """The base detector's one pass over every curated val frame (outside and inside the slices)."""
    batches = comparison.view_batches(uri, storage.FRAMES_TABLE, sets.frames_version, batch_size=batch_size,
                                      where=VAL_FRAMES)
    return comparison.evaluate({BASE: model}, batches, classes=ALL_CLASSES, panel_count=0, worst_count=0)


def _matches(rows: pa.Table, image_ids: Sequence[str], classes: Sequence[str]) -> bootstrap.Matches:
    return bootstrap.matches_from_rows(bootstrap.rows_of_frames(rows, image_ids), mode_class_ids(classes))[BASE]


def measure(rows: pa.Table, sets: FrameSets, modes: Mapping[str, Sequence[str]], *,
            resamples: int = bootstrap.RESAMPLES, seed: int = bootstrap.SEED) -> dict:
    """The figures from the stored `rows` of the pass: outside every slice, and each mode of
    `modes` (mode -> its classes) off the slices against on its slice, with the verdict."""
    if not sets.outside:
        raise ValueError("no curated val frame lies outside every slice: nothing to measure the base detector on")
    outside_all = _matches(rows, sets.outside, ALL_CLASSES)
    outside_counts = sets.objects_per_class(sets.outside)
    outside = {"frames": len(sets.outside), "objects": outside_all.objects, "objects_per_class": outside_counts,
               "intervals": bootstrap.independent_intervals({OFF: outside_all}, {}, resamples=resamples, seed=seed)[OFF]}
    measured, without_frames = {}, []
    for mode, classes in modes.items():
        view = sets.views[mode]
        if not view["image_ids"]:
            without_frames.append(mode)
            continue
        reference = MODE_CLASSES if all(outside_counts.get(c) for c in classes) else ALL_CLASSES_REFERENCE
        off = outside_all if reference == ALL_CLASSES_REFERENCE else _matches(rows, sets.outside, classes)
        on = _matches(rows, view["image_ids"], classes)
        # OFF first: it draws the outside's own resamples, so its all-class interval is the outside's
        found = bootstrap.independent_intervals({OFF: off, ON: on}, {OFF_MINUS_ON: (ON, OFF)},
                                                resamples=resamples, seed=seed)
        measured[mode] = {
            "classes": list(classes), "val_view": {"name": view["name"], "version": view["version"]},
            "frames": on.frames, "objects": on.objects, "objects_per_class": sets.objects_per_class(view["image_ids"]),
            "reference": reference, "intervals": found,
            "verdict": SLICE_VERDICTS[bootstrap.verdict(found[OFF_MINUS_ON][bootstrap.VERDICT_METRIC])]}
    return {"outside": outside, "modes": measured, "modes_without_frames": without_frames}


def protocol(resamples: int, seed: int) -> dict:
    return {
        "frames": f"the curated val frames of {storage.FRAMES_TABLE} ({VAL_FRAMES}) at the version the val views "
                  "reflect; inside a slice: the rows of its val view (by source row id); outside: the rest",
        "metric": "COCO AP from the stored matches (COCOeval's greedy matching, 100 detections per frame)",
        "intervals": f"95% percentile bootstrap over frames, {resamples} resamples, seed {seed}; off and on a slice "
                     "resampled independently (no frame is in both)",
        "reference": f"a mode's classes off the slices; {ALL_CLASSES_REFERENCE} off the slices for a mode whose "
                     "classes do not all occur there",
        "verdict": f"from the interval of off − on AP@0.5 (points): {WORSE_ON_SLICE} (on the slice) above 0, "
                   f"{BETTER_ON_SLICE} below 0, otherwise {bootstrap.NO_DIFFERENCE}",
    }


# --- writing it down -------------------------------------------------------------------------

def outside_markdown(data: Mapping) -> str:
    """The base outside every slice: its all-class figures with their intervals, and the objects per class."""
    outside = data["outside"]
    lines = ["| outside every slice | frames | objects | " + " | ".join(f"{label} (all classes)" for label in
                                                                        bootstrap.METRICS.values()) + " |",
             "|---|---:|---:|" + "---:|" * len(bootstrap.METRICS),
             f"| base detector | {outside['frames']} | {outside['objects']} | "
             + " | ".join(bootstrap.interval_text(outside["intervals"][key]) for key in bootstrap.METRICS) + " |",
             "", "| class | objects outside every slice |", "|---|---:|"]
    lines += [f"| {name} | {count} |" for name, count in outside["objects_per_class"].items()]
    return "\n".join(lines)


def modes_markdown(data: Mapping) -> str:
    """Each mode: the base's AP@0.5 off the slices and on the slice, the difference and the verdict."""
    key = bootstrap.VERDICT_METRIC
    label = bootstrap.METRICS[key]
    lines = [f"| failure mode | frames | objects | over | {label} off the slices | {label} on the slice "
             f"| off − on (points) | the slice is |", "|---|---:|---:|---|---:|---:|---:|---|"]
    for mode, figures in data["modes"].items():
        intervals = figures["intervals"]
        lines.append(f"| {mode} | {figures['frames']} | {figures['objects']} | {figures['reference']} "
                     f"| {bootstrap.interval_text(intervals[OFF][key])} | {bootstrap.interval_text(intervals[ON][key])} "
                     f"| {bootstrap.interval_text(intervals[OFF_MINUS_ON][key], points=True)} | {figures['verdict']} |")
    lines += [f"| {mode} | 0 | | | | | | no val frames |" for mode in data["modes_without_frames"]]
    return "\n".join(lines)


def summary_markdown(data: Mapping) -> str:
    """The base detector's figures as the failure-mode summary shows them."""
    return "\n".join([f"## Base detector outside and inside the slices ({data['frames_table']['name']}@"
                      f"{data['frames_table']['version']})", "", outside_markdown(data), "", modes_markdown(data)])


def report_markdown(data: Mapping) -> str:
    frames = data["eval_frames"]
    protocol_lines = [f"- {name}: {text}" for name, text in data["protocol"].items()]
    return "\n".join([
        "# Base detector outside and inside the failure modes' slices", "",
        f"Weights `{data['model'].get('weights')}`, at its own input size {data['model'].get('input_size')}. "
        f"{data['num_images']} curated val frames of `{data['frames_table']['name']}` version "
        f"{data['frames_table']['version']}; every frame's matches: table `{frames['table']}` version "
        f"{frames['version']}.", "",
        "## Outside every slice", "", outside_markdown(data), "",
        "## Each slice against the frames outside every slice", "", modes_markdown(data), "",
        "Off − on is in points (AP x 100): above 0, the base does worse on the slice.", "",
        "## Protocol", *protocol_lines, ""])


def write_report(out_dir: Path, figures: Mapping, *, sets: FrameSets, model: Mapping, eval_frames: Mapping,
                 num_images: int, resamples: int = bootstrap.RESAMPLES, seed: int = bootstrap.SEED) -> dict:
    """Write report.json and report.md under `out_dir` from `measure`'s figures; returns report.json's content."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"generated_at": datetime.now(timezone.utc).isoformat(), "model": dict(model),
            "frames_table": {"name": storage.FRAMES_TABLE, "version": sets.frames_version, "filter": VAL_FRAMES},
            "eval_frames": dict(eval_frames), "num_images": num_images, "report_dir": str(out_dir), **figures,
            "protocol": protocol(resamples, seed)}
    (out_dir / REPORT_JSON).write_text(json.dumps(data, indent=2))
    (out_dir / REPORT_MD).write_text(report_markdown(data))
    return data


def metadata_figures(data: Mapping) -> dict[str, float | int | str | None]:
    """The headline figures, flat: outside all-class AP@0.5 with its interval, and per mode the
    off − on difference of AP@0.5 in points with its interval, and the verdict."""
    key = bootstrap.VERDICT_METRIC
    entry = data["outside"]["intervals"][key]
    figures = {f"outside_{key}": entry["point"], f"outside_{key}_low": entry["low"],
               f"outside_{key}_high": entry["high"], "outside_frames": data["outside"]["frames"],
               "outside_objects": data["outside"]["objects"]}
    for mode, measured in data["modes"].items():
        entry = measured["intervals"][OFF_MINUS_ON][key]
        figures.update({f"{mode}_off_minus_on_{key}_points": entry["point"], f"{mode}_off_minus_on_{key}_low": entry["low"],
                        f"{mode}_off_minus_on_{key}_high": entry["high"], f"{mode}_verdict": measured["verdict"]})
    return figures
