"""Tracks on the footage with clips of a val view: what a report adds for frames that have a clip.

From the detections and matches the report already has (no model runs again):

- each model's detections of a clip, in clip order, linked into tracks (`tracking.tracker`) and
  scored against the clip's ground-truth tracks with BDD100K's box_track figures
  (`tracking.metrics`: MOTA, MOTP, IDF1, …). Both sides are written as BDD100K MOT JSON next to
  the report, and the figures are those of `python -m avperception_assets.tracking evaluate` on
  those files. They are in the detector's label space: its classes are COCO's, so COCO person
  stands for BDD pedestrian and rider alike and both are written as `pedestrian`; traffic lights
  and signs are not tracked. Crowd boxes and the ignored-as classes stay ignore regions.
- per-track coverage (`tracking.coverage`): for each ground-truth track (clip, id) of the mode's
  classes, the share of its frames in which the model found it and its longest run of misses, read
  from the stored matches of `<mode>_eval_frames` (COCO matching at IoU 0.5, as the report's
  errors). A frame counts for a track where its box is an object of the evaluation: crowd boxes,
  and boxes with no area once clipped to the frame, are not.

A clip's frames are those of the val view (a view may hold only some frames of a clip); frames
with a clip but no position in it (BDD100K's detection images) are left out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from avperception_assets.evaluation.frame_errors import FOUND, GROUND_TRUTH, IGNORED, ground_truth_order
from avperception_assets.formats.taxonomy import COCO_IDS
from avperception_assets.model import loader
from avperception_assets.tracking import metrics
from avperception_assets.tracking.coverage import TrackCoverage, track_coverage
from avperception_assets.tracking.tracker import Detection, TrackerSettings, box2d, track_clip

CLIP_COLUMNS = ("image_id", "clip_id", "clip_frame_index", "ann_categories", "ann_bboxes", "ann_track_ids",
                "ann_crowd")
# The detector's label space in box_track's names: each COCO id as the first of the classes it
# stands for (person: pedestrian). Built from the last class back, so that the first one stays.
TRACKED_CLASSES = {COCO_IDS[name]: name for name in reversed(metrics.CLASSES)}
GROUND_TRUTH_FILE = "tracks_ground_truth.json"
PREDICTIONS_FILE = "tracks_{model}.json"
UNDER = 0.5  # a track found in fewer of its frames than this share is counted apart
WORST_TRACKS = 5
FIGURES = ("MOTA", "MOTP", "IDF1", "FP", "FN", "IDSw", "MT", "PT", "ML", "FM")


def clip_rows(uri: str, name: str, version: int) -> pa.Table | None:
    """The frames of clips in `name@version` (a clip and a position in it) with their boxes' tracks;
    None when the view has none, or no clip columns (a view made before clips)."""
    table = loader.open_table(uri, name, version)
    if not set(CLIP_COLUMNS) <= set(table.schema.names):
        return None
    rows = table.to_lance().to_table(columns=list(CLIP_COLUMNS), filter="clip_id IS NOT NULL AND "
                                     "clip_frame_index IS NOT NULL AND ann_track_ids IS NOT NULL")
    return rows if rows.num_rows else None


@dataclass(frozen=True)
class ClipFrame:
    image_id: str
    position: int  # the frame's position in the evaluation
    frame_index: int  # its position in the clip
    categories: list[str]
    boxes: list[list[float]]
    track_ids: list[str]
    crowd: list[bool]


def clips_of(rows: pa.Table, image_ids: Sequence[str]) -> dict[str, list[ClipFrame]]:
    """The evaluated frames of each clip, in clip order."""
    position = {image_id: k for k, image_id in enumerate(image_ids)}
    clips: dict[str, list[ClipFrame]] = {}
    for row in rows.to_pylist():
        boxes = row["ann_bboxes"] or []
        clips.setdefault(row["clip_id"], []).append(ClipFrame(
            row["image_id"], position[row["image_id"]], row["clip_frame_index"], row["ann_categories"] or [], boxes,
            row["ann_track_ids"], row["ann_crowd"] or [False] * len(boxes)))
    return {clip: sorted(frames, key=lambda f: f.frame_index) for clip, frames in sorted(clips.items())}


def ground_truth_frames(clips: Mapping[str, list[ClipFrame]]) -> list[dict]:
    """The clips' ground truth as BDD100K MOT frames, in the detector's label space."""
    frames = []
    for clip, clip_frames in clips.items():
        for frame in clip_frames:
            labels = [{"id": track, "category": TRACKED_CLASSES[COCO_IDS[category]], "box2d": box2d(box),
                       "attributes": {"crowd": bool(crowd)}}
                      for category, box, track, crowd in zip(frame.categories, frame.boxes, frame.track_ids, frame.crowd)
                      if COCO_IDS.get(category) in TRACKED_CLASSES and box is not None]
            frames.append({"name": frame.image_id, "videoName": clip, "frameIndex": frame.frame_index,
                           "labels": labels})
    return frames


def _detections(prediction: Mapping) -> list[Detection]:
    return [Detection(TRACKED_CLASSES[label], tuple(box), score)
            for box, label, score in zip(prediction["boxes"].tolist(), prediction["labels"].tolist(),
                                         prediction["scores"].tolist()) if label in TRACKED_CLASSES]


def tracked_frames(clips: Mapping[str, list[ClipFrame]], predictions: Sequence[Mapping],
                   settings: TrackerSettings) -> list[dict]:
    """One model's detections on the clips linked into tracks, as BDD100K MOT prediction frames."""
    return [frame for clip, clip_frames in clips.items()
            for frame in track_clip(clip, [(f.image_id, f.frame_index, _detections(predictions[f.position]))
                                           for f in clip_frames], settings)]


def _stored_boxes(frames: pa.Table, model: str, positions: Sequence[int]) -> dict[int, list[dict]]:
    """The stored ground-truth boxes of `model` at each of `positions`, in their stored order."""
    wanted = pc.is_in(frames["frame_index"], value_set=pa.array(positions, frames.schema.field("frame_index").type))
    rows = frames.filter(pc.and_(pc.equal(frames["model"], model), wanted))
    return {row["frame_index"]: [b for b in row["boxes"] if b["source"] == GROUND_TRUTH]
            for row in rows.select(["frame_index", "boxes"]).to_pylist()}


def coverage(clips: Mapping[str, list[ClipFrame]], sizes: Sequence[tuple[int, int]], frames: pa.Table, model: str,
             classes: Sequence[str]) -> dict[tuple[str, str], tuple[str, TrackCoverage]]:
    """Each ground-truth track of `classes` -> (its class, its coverage by `model`), from the stored matches."""
    stored = _stored_boxes(frames, model, [f.position for fs in clips.values() for f in fs])
    found: dict[tuple[str, str], tuple[str, TrackCoverage]] = {}
    for clip, clip_frames in clips.items():
        category_of, sequence = {}, []
        for frame in clip_frames:
            height, width = sizes[frame.position]
            kept = loader.target_boxes(frame.categories, frame.boxes, width, height, frame.crowd)
            boxes = stored[frame.position]
            if len(boxes) != len(kept):
                raise ValueError(f"frame {frame.image_id}: {len(boxes)} stored ground-truth boxes of {model}, "
                                 f"{len(kept)} in the frame: the matches are not of these frames")
            ids, hits = [], []
            for target_index, box in zip(ground_truth_order([k.label for k in kept]), boxes):
                index = kept[target_index].index
                if box["outcome"] != IGNORED and frame.categories[index] in classes:
                    ids.append(frame.track_ids[index])
                    hits.append(box["outcome"] == FOUND)
                    category_of[frame.track_ids[index]] = frame.categories[index]
            sequence.append((ids, hits))
        found.update({(clip, track): (category_of[track], cover) for track, cover in track_coverage(sequence).items()})
    return found


def coverage_summary(tracks: Mapping[tuple[str, str], tuple[str, TrackCoverage]]) -> dict:
    """How many tracks, their mean coverage, how many were found in under half their frames, the longest gap."""
    covers = [cover for _, cover in tracks.values()]
    return {"tracks": len(covers),
            "mean_coverage": sum(c.coverage for c in covers) / len(covers) if covers else None,
            "tracks_under_half": sum(c.coverage < UNDER for c in covers),
            "longest_gap": max((c.longest_gap for c in covers), default=None)}


def _track_rows(by_model: Mapping[str, Mapping[tuple[str, str], tuple[str, TrackCoverage]]], worst_by: str) -> list[dict]:
    """Every track with each model's coverage, worst first by `worst_by` (least covered, then
    longest gap, then most frames)."""
    rows = []
    for (clip, track), (category, cover) in by_model[worst_by].items():
        covers = {model: tracks[clip, track][1] for model, tracks in by_model.items()}
        rows.append({"clip_id": clip, "track_id": track, "category": category, "frames": cover.frames,
                     **{model: {"found": c.found, "coverage": c.coverage, "longest_gap": c.longest_gap}
                        for model, c in covers.items()}})
    return sorted(rows, key=lambda r: (r[worst_by]["coverage"], -r[worst_by]["longest_gap"], -r["frames"],
                                       r["clip_id"], r["track_id"]))


def write_tracking(out_dir: Path, clips: Mapping[str, list[ClipFrame]] | None, *, image_sizes: Sequence[tuple[int, int]],
                   predictions: Mapping[str, Sequence[Mapping]], frames: pa.Table, classes: Sequence[str],
                   worst_by: str, settings: TrackerSettings = TrackerSettings()) -> dict | None:
    """Write the clips' ground truth and each model's tracks as BDD100K MOT JSON under `out_dir` and
    return the report's `tracking` object: each model's box_track figures on those files, the
    coverage of the mode's tracks by each model (`frames` holds the stored matches) and every
    track's, worst first by `worst_by`. None without clips, after removing the files of an earlier
    write."""
    files = {"ground_truth": GROUND_TRUTH_FILE, **{model: PREDICTIONS_FILE.format(model=model) for model in predictions}}
    if not clips:
        for stale in files.values():
            (Path(out_dir) / stale).unlink(missing_ok=True)
        return None
    (Path(out_dir) / GROUND_TRUTH_FILE).write_text(json.dumps(ground_truth_frames(clips)))
    figures, by_model = {}, {}
    for model, model_predictions in predictions.items():
        (Path(out_dir) / files[model]).write_text(json.dumps(tracked_frames(clips, model_predictions, settings)))
        figures[model] = metrics.evaluate_paths(Path(out_dir) / GROUND_TRUTH_FILE, Path(out_dir) / files[model])
        by_model[model] = coverage(clips, image_sizes, frames, model, classes)
    tracked_names = sorted({TRACKED_CLASSES[COCO_IDS[c]] for c in classes if COCO_IDS[c] in TRACKED_CLASSES},
                           key=metrics.CLASSES.index)
    return {"clips": len(clips), "frames": sum(len(f) for f in clips.values()),
            "tracker": asdict(settings), "mode_tracked_classes": tracked_names,
            "figures": figures,
            "coverage": {model: coverage_summary(tracks) for model, tracks in by_model.items()},
            "tracks": _track_rows(by_model, worst_by),
            "files": files}


def headline(tracking: Mapping | None) -> dict | None:
    """Per model: MOTA, IDF1 and the coverage summary; None without clips."""
    if not tracking:
        return None
    return {model: {"MOTA": figures["MOTA"], "IDF1": figures["IDF1"], **tracking["coverage"][model]}
            for model, figures in tracking["figures"].items()}


def fmt(value) -> str:
    """A box_track figure: a ratio (percent) to one decimal, a count as it is."""
    if value is None:
        return "n/a"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def figures_markdown(tracking: Mapping, titles: Mapping[str, str]) -> str:
    """Each model's box_track figures over all tracked classes, then MOTA and IDF1 of the mode's classes."""
    classes = tracking["mode_tracked_classes"]
    lines = ["| model | " + " | ".join(FIGURES) + " | " + " | ".join(f"MOTA {c} | IDF1 {c}" for c in classes) + " |",
             "|---|" + "---:|" * (len(FIGURES) + 2 * len(classes))]
    for model, figures in tracking["figures"].items():
        per_class = [fmt(figures["classes"][c][key]) for c in classes for key in ("MOTA", "IDF1")]
        lines.append(f"| {titles[model]} | " + " | ".join([*(fmt(figures[key]) for key in FIGURES), *per_class]) + " |")
    return "\n".join(lines)


def coverage_markdown(tracking: Mapping, titles: Mapping[str, str]) -> str:
    """Each model's coverage of the mode's tracks, then the worst tracks."""
    lines = ["| model | tracks | mean coverage | tracks under 50% | longest gap (frames) |", "|---|---:|---:|---:|---:|"]
    for model, summary in tracking["coverage"].items():
        lines.append(f"| {titles[model]} | {summary['tracks']} | {share(summary['mean_coverage'])} | "
                     f"{summary['tracks_under_half']} | "
                     f"{fmt(summary['longest_gap'])} |")
    models = list(tracking["coverage"])
    lines += ["", "| clip | track | class | frames | " + " | ".join(f"{titles[m]} found (longest gap)" for m in models) + " |",
              "|---|---|---|---:|" + "---:|" * len(models)]
    lines += [f"| `{row['clip_id']}` | {row['track_id']} | {row['category']} | {row['frames']} | "
              + " | ".join(f"{row[m]['found']} ({row[m]['longest_gap']})" for m in models) + " |"
              for row in tracking["tracks"][:WORST_TRACKS]]
    return "\n".join(lines)
