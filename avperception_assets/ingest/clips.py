"""Splits by clip, and the rules of footage clips, for the frames of one batch.

A frame of a clip (a MOT frame, or a detection image of the video its stem names) takes its
clip's split, so a clip never lands in two splits. A clip's split is, in order:
1. the split of its rows already in the table: a clip never changes split;
2. the split its frames' folders name in this batch: a label file's `<split>` folder first, then
   an image's (`images/track/<split>/<video>/`), in frame order;
3. else a hash of the clip id (`assign_split`): the same clip always gets the same split.
A frame without a clip is its own, split by its labels' folder or a hash of its image id.

Rejected, each alone (the clip's other frames land):
- `clip_split_conflict`: a frame whose folder names another split than its clip's;
- `repeated_frame_index`: a frame whose index its clip already has, in the table or earlier in
  the batch (of two frames with one index, the one first in the label files, in path order, lands);
- `track_category_changed`: a box whose track (clip, id) has another category in an earlier frame
  (in the table, or earlier in the batch); the frame keeps its other boxes.

Only the batch's clips are looked up in the table (`clip_id IN (...)`), so the cost follows the batch.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from avperception_assets.formats.records import SPLITS, BadObject, LabelRecord, split_from_path
from avperception_assets.formats.taxonomy import normalize_category
from avperception_assets.storage import tables as storage
from avperception_assets.storage.quarantine import Rejection


def assign_split(key: str, val_fraction: float = 0.2) -> str:
    """The split of a clip, or of a frame without one, whose folders name none: a hash of its id,
    `val_fraction` of them in val."""
    bucket = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big") / 2**32
    return "val" if bucket < val_fraction else "train"


@dataclass
class KnownClip:
    """What the table holds of a clip: its splits, frame indexes and track categories."""

    splits: set[str] = field(default_factory=set)
    indexes: dict[int, str] = field(default_factory=dict)  # clip_frame_index → image id
    tracks: dict[str, str] = field(default_factory=dict)  # track id → category


def known_clips(table, clip_ids) -> dict[str, KnownClip]:
    """The table's rows of these clips, by clip id."""
    rows = storage.rows_with(table.to_lance(), storage.CLIP_ID, clip_ids,
                             [storage.CLIP_ID, "image_id", "split", "clip_frame_index", "ann_track_ids", "ann_categories"])
    clips: dict[str, KnownClip] = defaultdict(KnownClip)
    for row in rows.to_pylist():
        clip = clips[row[storage.CLIP_ID]]
        clip.splits.add(row["split"])
        if row["clip_frame_index"] is not None:
            clip.indexes[row["clip_frame_index"]] = row["image_id"]
        for track, category in zip(row["ann_track_ids"] or [], row["ann_categories"] or []):
            clip.tracks.setdefault(track, category)
    return dict(clips)


def _folder_splits(frame) -> list[tuple[str, str]]:
    """(split, where it is named) for each folder of the frame that names one: its label file's,
    and a MOT frame's image folder."""
    named = [(frame.label.split, frame.label.label_file)] if frame.label.split in SPLITS else []
    image_split = split_from_path(frame.rel) if frame.label.tracked else None
    return named + ([(image_split, frame.rel)] if image_split else [])


def _clip_split(clip_id: str, frames: Sequence, known: KnownClip | None,
                val_fraction: float) -> tuple[str, str]:
    """(split, why) of a clip."""
    if known and known.splits:
        return min(known.splits), "its frames already in the table"
    named = [_folder_splits(f) for f in frames]
    for position in (0, 1):  # label folders first, then image folders
        for splits in named:
            if len(splits) > position:
                return splits[position][0], f"the folder of {splits[position][1]}"
    return assign_split(clip_id, val_fraction), "a hash of its clip id (no folder names a split)"


def _frame_order(frames: Sequence, order: Mapping[str, int]) -> list:
    """MOT frames by frame index (in label order for equal indexes), then detection images."""
    return sorted(frames, key=lambda f: (f.label.clip_frame_index is None, f.label.clip_frame_index or 0,
                                         order.get(f.label.image_id, 0)))


@dataclass
class Settled:
    """The batch's frames that land, each with its `split` set, and those rejected."""

    frames: list = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)


def settle(frames: Sequence, known: dict[str, KnownClip], val_fraction: float, order: Mapping[str, int]) -> Settled:
    """Each frame's split by its clip, and the clip rules applied. A frame is a dataclass with the
    image's path inside the batch (`rel`), its `label` (a `LabelRecord`) and its `split`, set here;
    `order` is each image id's position in the batch's label files."""
    settled, clips = Settled(), defaultdict(list)
    for frame in frames:
        if frame.label.clip_id is None:
            split = frame.label.split if frame.label.split in SPLITS else assign_split(frame.label.image_id, val_fraction)
            settled.frames.append(replace(frame, split=split))
        else:
            clips[frame.label.clip_id].append(frame)
    for clip_id, clip_frames in clips.items():
        _settle_clip(clip_id, _frame_order(clip_frames, order), known.get(clip_id), val_fraction, settled)
    return settled


def _settle_clip(clip_id: str, frames: list, known: KnownClip | None, val_fraction: float, settled: Settled) -> None:
    split, why = _clip_split(clip_id, frames, known, val_fraction)
    indexes = dict(known.indexes) if known else {}
    tracks = dict(known.tracks) if known else {}
    for frame in frames:
        label = frame.label
        where = f"{label.label_file}#{label.image_id}"
        other = next(((s, rel) for s, rel in _folder_splits(frame) if s != split), None)
        if other:
            settled.rejections.append(Rejection(where, "clip_split_conflict", (
                f"the folder of {other[1]} puts frame {label.image_id} in {other[0]}, but its clip {clip_id} "
                f"is in {split} (by {why}): a clip is in one split")))
            continue
        if label.clip_frame_index is not None:
            if label.clip_frame_index in indexes:
                settled.rejections.append(Rejection(where, "repeated_frame_index", (
                    f"clip {clip_id} already has frame index {label.clip_frame_index} "
                    f"(frame {indexes[label.clip_frame_index]})")))
                continue
            indexes[label.clip_frame_index] = label.image_id
        if label.tracked:
            label = _one_category_per_track(label, clip_id, tracks)
        settled.frames.append(replace(frame, label=label, split=split))


def _one_category_per_track(label: LabelRecord, clip_id: str, tracks: dict[str, str]) -> LabelRecord:
    """The label with each box whose track had another category before made a bad object; the
    categories of the tracks first seen here recorded."""
    objects = []
    for obj in label.objects:
        category = normalize_category(str(obj.get("category", ""))) if isinstance(obj, dict) else None
        if category is None:  # a bad object already, or no class: rejected by normalize_objects
            objects.append(obj)
            continue
        first = tracks.setdefault(obj["id"], category)
        if first != category:
            obj = BadObject("track_category_changed",
                            f"track {obj['id']!r} of clip {clip_id} is a {first} in an earlier frame, a {category} here")
        objects.append(obj)
    return replace(label, objects=objects)
