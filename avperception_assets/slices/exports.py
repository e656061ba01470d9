"""A slice view at one pinned version, written out as a COCO or a YOLO data set for other tools.

COCO: `images/<split>/<image id>.<ext>` and `annotations/instances_<split>.json`, whose `info`
names the view, its version and the frames-table version it reflects. YOLO (Ultralytics):
`images/<split>/`, `labels/<split>/<image id>.txt` (`class cx cy w h`, normalised) and
`data.yaml`, which names the same. Both use the det_20 class names, in `bdd100k.CLASSES` order
(COCO category ids from 1, YOLO class indices from 0), and the image bytes exactly as stored.
Crowd boxes (`ann_crowd`, ignore regions) are COCO annotations with `iscrowd` 1; YOLO has no
such notion, so its labels leave them out (`Export.crowd_boxes` counts them either way).
Both layouts are among those ingestion reads, so an export lands again as a batch. The label
files are written by `formats.coco` and `formats.yolo`; this module reads the pinned view and
writes the images.

An export is written to a temporary folder beside its destination and renamed into place, so a
killed export leaves no half-written data set under the name; exporting the same view version
again replaces it. Nothing here knows about Dagster.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from avperception_assets.model import loader
from avperception_assets.storage import tables as storage
from avperception_assets.formats import coco, yolo
from avperception_assets.formats.taxonomy import CLASSES
from avperception_assets.storage.pixels import IMAGE_BYTES, PixelReader

COCO, YOLO = coco.LAYOUT, yolo.LAYOUT  # an export lands again with its format as `label_format`
FORMATS = (COCO, YOLO)
_COLUMNS = ["image_id", "split", "width", "height", "image_format", IMAGE_BYTES, "ann_categories", "ann_bboxes"]
_SUFFIXES = {"jpeg": ".jpg", "png": ".png"}


@dataclass(frozen=True)
class Export:
    """What one export wrote."""

    path: Path
    format: str
    view: str
    version: int
    source_table: str
    source_table_version: int | None
    frames: int
    boxes: int  # every box of the frames, crowd boxes included
    crowd_boxes: int
    splits: tuple[str, ...]

    def as_metadata(self) -> dict:
        return {"path": str(self.path), "format": self.format, "view": self.view, "view_version": self.version,
                "source_table": self.source_table, "source_table_version": self.source_table_version,
                "frames": self.frames, "boxes": self.boxes, "crowd_boxes": self.crowd_boxes, "splits": list(self.splits), "classes": list(CLASSES)}


def export_name(view: str, version: int, fmt: str) -> str:
    """The export's folder name: the view, its version and the format."""
    return f"{view}@v{version}_{fmt}"


def _frames(view: loader.ViewRef, batch_size: int = 64) -> Iterator[dict]:
    """Every frame of the pinned view as a dict of `_COLUMNS` (and `ann_crowd` where the view has
    it: views from before clips lack it), image bytes included."""
    table = loader.open_table(view.uri, view.name, view.version)
    pixels = PixelReader.of(view.uri, table)
    columns = _COLUMNS + [loader.CROWD] if loader.CROWD in table.schema.names else _COLUMNS
    for batch in table.to_lance().to_batches(columns=pixels.columns(columns), batch_size=batch_size):
        if batch.num_rows:
            yield from pixels.attach(batch).select(columns).to_pylist()


def _image_file(frame: dict) -> str:
    suffix = _SUFFIXES.get(frame["image_format"])
    if suffix is None:
        raise ValueError(f"frame {frame['image_id']!r} is stored as {frame['image_format']!r}, which no export writes")
    return f"{frame['image_id']}{suffix}"


def _write_image(root: Path, frame: dict) -> str:
    name = _image_file(frame)
    target = root / "images" / frame["split"] / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(frame[IMAGE_BYTES])
    return name


_WRITERS = {COCO: coco.CocoWriter, YOLO: yolo.YoloWriter}


def export_view(uri: str, view_name: str, fmt: str, out_dir: Path, version: int | None = None,
                log=lambda message: None) -> Export:
    """Write `view_name` at `version` (default: the latest) as a `fmt` data set under `out_dir`."""
    if fmt not in _WRITERS:
        raise ValueError(f"unknown export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    view = loader.pin_view(uri, view_name, version)
    source_table, source_version = storage.source_table_version(uri, view.name, view.version)
    info = {"description": f"{view.name} at version {view.version}", "view": view.name,
            "view_version": view.version, "source_table": source_table, "source_table_version": source_version,
            "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    target = Path(out_dir) / export_name(view.name, view.version, fmt)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        writer, frames, boxes, crowd_boxes = _WRITERS[fmt](staging, info, CLASSES), 0, 0, 0
        for frame in _frames(view):
            writer.add(frame, _write_image(staging, frame))
            frames, boxes = frames + 1, boxes + len(frame["ann_categories"])
            crowd_boxes += sum(frame.get(loader.CROWD) or [])
            if frames % 500 == 0:
                log(f"{target.name}: {frames} frames written")
        writer.close()
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"{target.name}: {frames} frames, {boxes} boxes ({crowd_boxes} crowd boxes)")
    splits = tuple(sorted(p.name for p in (target / "images").iterdir())) if frames else ()
    return Export(target, fmt, view.name, view.version, source_table, source_version, frames, boxes, crowd_boxes,
                  splits)


def main(argv: list[str] | None, *, uri: str, exports_dir: Path) -> int:
    """The command line, exporting from the LanceDB at `uri` to `exports_dir` unless `--out` is given."""
    parser = argparse.ArgumentParser(prog="python -m avperception_assets.exports",
                                     description="Export a slice view at a pinned version as COCO JSON or a YOLO folder.")
    parser.add_argument("view", help="the view (or table) to export, e.g. bdd100k_rider_val")
    parser.add_argument("--format", choices=FORMATS, default=COCO)
    parser.add_argument("--version", type=int, help="the view version (default: the latest)")
    parser.add_argument("--out", type=Path, default=None, help=f"parent folder (default: {exports_dir})")
    args = parser.parse_args(argv)
    try:
        export = export_view(uri, args.view, args.format, args.out or exports_dir, args.version, log=print)
    except (ValueError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(export.as_metadata(), indent=2))
    return 0
