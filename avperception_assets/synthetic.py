"""Synthetic dashcam footage in BDD100K format: the embedded default data and the test data.

Frames are drawn, not noise: every object is painted exactly inside its box (pedestrians as
upright figures, riders on bicycles/motorcycles, cars, trucks, buses, traffic lights and
signs), night frames are dark with lit objects, distant pedestrians are small and near the
horizon. Each frame also gets a random low-frequency brightness field so that distinct frames
never look alike to a perceptual hash. Output is deterministic for (batch id, seed).

Footage clips (`write_clip_batch`, or `--clips` on the command line) are BDD100K MOT 2020
(`box_track_20`) videos: one background per clip, tracks that move across it and keep their ids
from frame to frame (and when they leave the view and come back), some clips with a crowd region
or an `other vehicle` (ignore regions). Clips have no rain or snow drawn.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from avperception_assets.ingest.landing import READY_MARKER

LAYOUTS = ("det_20", "split_list_2018", "per_image_2018")

# 2018 label files use the old names; det_20 uses the current ones.
NAMES_2018 = {"pedestrian": "person", "bicycle": "bike", "motorcycle": "motor"}

TIMES_OF_DAY = (("daytime", 0.6), ("night", 0.28), ("dawn/dusk", 0.12))
WEATHERS = (("clear", 0.5), ("overcast", 0.2), ("partly cloudy", 0.12), ("rainy", 0.1),
            ("snowy", 0.04), ("foggy", 0.04))
SCENES = (("city street", 0.6), ("highway", 0.25), ("residential", 0.15))


@dataclass
class SynthObject:
    category: str  # det_20 name
    box: tuple[float, float, float, float]
    occluded: bool = False
    truncated: bool = False
    light_color: str = "NA"


@dataclass
class SynthFrame:
    name: str  # file name, e.g. "1a2b3c4d-5e6f7a8b.jpg"
    split: str
    timeofday: str
    weather: str
    scene: str
    timestamp: int
    objects: list[SynthObject] = field(default_factory=list)


def image_name(batch_id: str, seed: int, index: int) -> str:
    """BDD-style name, unique across batches (the batch id is part of the digest)."""
    digest = hashlib.sha1(f"{batch_id}/{seed}/{index}".encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:16]}.jpg"


def _pick(rng: np.random.Generator, options) -> str:
    names, weights = zip(*options)
    return str(rng.choice(names, p=np.array(weights) / sum(weights)))


def _shade(color, light: float):
    return tuple(int(max(0, min(255, c * light))) for c in color)


def _background(rng, width, height, horizon, timeofday, weather, scene) -> Image.Image:
    if timeofday == "night":
        sky, road, light = (12, 14, 28), (28, 28, 32), 0.25
    elif timeofday == "dawn/dusk":
        sky, road, light = (200, 130, 90), (90, 85, 85), 0.7
    else:
        sky, road, light = (135, 180, 225), (105, 105, 110), 1.0
    if weather in ("overcast", "rainy", "foggy"):
        sky = _shade((170, 172, 178), light)
    img = np.empty((height, width, 3), np.float32)
    img[:horizon] = sky
    img[horizon:] = road
    # Low-frequency field: a unique large-scale signature for each frame.
    field_ = rng.uniform(-1, 1, (6, 10)).astype(np.float32)
    field_img = Image.fromarray(((field_ + 1) * 127.5).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    amplitude = 40 * max(light, 0.3)
    img += (np.asarray(field_img, np.float32)[..., None] / 127.5 - 1) * amplitude
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    if scene != "highway":  # a skyline of buildings or houses on the horizon
        x = int(rng.integers(-50, 0))
        while x < width:
            w = int(rng.integers(60, 220))
            h = int(rng.integers(40, horizon - 20)) if scene == "city street" else int(rng.integers(30, 90))
            grey = int(rng.integers(60, 190))
            draw.rectangle([x, horizon - h, x + w, horizon], fill=_shade((grey, grey - 10, grey - 20), light))
            if timeofday == "night":  # lit windows
                for _ in range(int(rng.integers(0, 6))):
                    wx, wy = x + int(rng.integers(5, max(6, w - 12))), horizon - int(rng.integers(8, max(9, h - 5)))
                    draw.rectangle([wx, wy, wx + 8, wy + 10], fill=(230, 200, 110))
            x += w + int(rng.integers(0, 40))
    for lane in (-0.3, 0.3):  # lane markings converge on the horizon
        draw.line([(width / 2, horizon), (width / 2 + lane * width * 1.6, height)],
                  fill=_shade((230, 230, 230), max(light, 0.5)), width=6)
    return canvas


def _draw_person(draw, box, color, light):
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    head = h * 0.18
    cx = (x1 + x2) / 2
    draw.ellipse([cx - head / 2, y1, cx + head / 2, y1 + head], fill=_shade((230, 190, 160), light))
    draw.rectangle([x1, y1 + head, x2, y1 + h * 0.6], fill=_shade(color, light))
    leg = _shade((40, 40, 90), max(light, 0.5))
    draw.rectangle([x1 + w * 0.1, y1 + h * 0.6, cx - w * 0.05, y2], fill=leg)
    draw.rectangle([cx + w * 0.05, y1 + h * 0.6, x2 - w * 0.1, y2], fill=leg)


def _draw_cycle(draw, box, motor: bool, light):
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    r = min(w * 0.25, h * 0.45)
    tyre = _shade((20, 20, 20), 1.0)
    for cx in (x1 + r, x2 - r):
        draw.ellipse([cx - r, y2 - 2 * r, cx + r, y2], outline=_shade((200, 200, 200), max(light, 0.6)), width=max(2, int(r / 4)), fill=tyre)
    frame = (200, 30, 30) if motor else (30, 160, 60)
    draw.rectangle([x1 + r, y1 + h * 0.2, x2 - r, y2 - r], fill=_shade(frame, max(light, 0.6)))


def _draw_vehicle(draw, box, kind, color, light, night):
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    body = _shade(color, max(light, 0.45))
    if kind == "car":
        draw.rectangle([x1, y1 + h * 0.35, x2, y2 - h * 0.15], fill=body)
        draw.rectangle([x1 + w * 0.2, y1, x2 - w * 0.2, y1 + h * 0.4], fill=_shade((120, 160, 190), max(light, 0.4)))
    elif kind == "truck":
        draw.rectangle([x1, y1, x1 + w * 0.7, y2 - h * 0.12], fill=body)
        draw.rectangle([x1 + w * 0.72, y1 + h * 0.3, x2, y2 - h * 0.12], fill=_shade((220, 220, 220), max(light, 0.45)))
    else:  # bus
        draw.rectangle([x1, y1, x2, y2 - h * 0.1], fill=body)
        for i in range(5):
            wx = x1 + w * (0.05 + i * 0.19)
            draw.rectangle([wx, y1 + h * 0.15, wx + w * 0.14, y1 + h * 0.45], fill=_shade((150, 200, 230), max(light, 0.5)))
    r = h * 0.12
    for cx in (x1 + w * 0.2, x2 - w * 0.2):
        draw.ellipse([cx - r, y2 - 2 * r, cx + r, y2], fill=(15, 15, 15))
    if night:  # tail lights
        draw.rectangle([x1, y1 + h * 0.45, x1 + w * 0.08, y1 + h * 0.6], fill=(255, 40, 40))
        draw.rectangle([x2 - w * 0.08, y1 + h * 0.45, x2, y1 + h * 0.6], fill=(255, 40, 40))


def _ground_box(rng, width, height, horizon, aspect, depth):
    """A box standing on the road at `depth` (0 = horizon, 1 = bottom), `aspect` = h/w."""
    bottom = horizon + depth * (height - horizon)
    h = max(12.0, (bottom - horizon) * 1.1 * aspect / 2.5 + 10)
    w = h / aspect
    x1 = float(rng.uniform(-w * 0.2, width - w * 0.8))
    return [x1, bottom - h, x1 + w, bottom]


def _clip(box, width, height):
    x1, y1, x2, y2 = box
    clipped = [max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)]
    return tuple(round(v, 2) for v in clipped), clipped != [x1, y1, x2, y2]


# Objects per frame. Street scenes are crowded (BDD100K's images average about 18 boxes), and a
# report needs hundreds of each failure mode's objects from a few hundred frames, so the modes'
# objects come in groups: a frame holds a crowd of distant pedestrians only (the distant_person
# slice), a few riders riding together, or a mix of near and far pedestrians. Sizes keep their
# depth distributions: the failure modes stay small, dark and (in frames) rare.
VEHICLES_PER_FRAME = ((1, 0.1), (2, 0.15), (3, 0.2), (4, 0.2), (5, 0.15), (6, 0.1), (7, 0.05), (8, 0.05))
VEHICLE_KINDS = (("car", 0.57), ("truck", 0.28), ("bus", 0.15))
PERSON_SCENES = (("none", 0.2), ("distant crowd", 0.12), ("mixed", 0.68))
DISTANT_CROWD = (10, 21)  # pedestrians, inclusive-exclusive as numpy's integers
MIXED_PEDESTRIANS = (4, 13)
RIDER_FRAME_SHARE = 0.2
RIDERS_PER_FRAME = (2, 8)
SIGNALS_PER_FRAME = ((0, 0.25), (1, 0.35), (2, 0.25), (3, 0.1), (4, 0.05))  # traffic lights, and signs alike


def _count(rng, options) -> int:
    return int(_pick(rng, [(str(n), p) for n, p in options]))


def _pedestrian_boxes(rng, width, height, horizon) -> list[list[float]]:
    scene = _pick(rng, PERSON_SCENES)
    if scene == "none":
        return []
    if scene == "distant crowd":
        return [_ground_box(rng, width, height, horizon, 2.6, rng.uniform(0.02, 0.12))
                for _ in range(int(rng.integers(*DISTANT_CROWD)))]
    boxes = []
    for _ in range(int(rng.integers(*MIXED_PEDESTRIANS))):
        depth = rng.uniform(0.02, 0.12) if rng.random() < 0.4 else rng.uniform(0.3, 0.95)
        boxes.append(_ground_box(rng, width, height, horizon, 2.6, depth))
    return boxes


def _rider_pair(rng, width, height, horizon) -> list[tuple]:
    motor = rng.random() < 0.4
    cycle = _ground_box(rng, width, height, horizon, 0.75, rng.uniform(0.25, 0.9))
    cw, ch = cycle[2] - cycle[0], cycle[3] - cycle[1]
    rider = [cycle[0] + cw * 0.25, cycle[1] - ch * 1.1, cycle[2] - cw * 0.25, cycle[1] + ch * 0.45]
    return [("motorcycle" if motor else "bicycle", cycle, None), ("rider", rider, None)]


def _plan_objects(rng, width, height, horizon):
    """Which objects a frame holds: (category, box, extra) in drawing order to be sorted."""
    planned = []
    for _ in range(_count(rng, VEHICLES_PER_FRAME)):
        kind = _pick(rng, VEHICLE_KINDS)
        aspect = {"car": 0.6, "truck": 0.75, "bus": 0.55}[kind]
        planned.append((kind, _ground_box(rng, width, height, horizon, aspect, rng.uniform(0.15, 0.9)), None))
    planned += [("pedestrian", box, None) for box in _pedestrian_boxes(rng, width, height, horizon)]
    if rng.random() < RIDER_FRAME_SHARE:
        for _ in range(int(rng.integers(*RIDERS_PER_FRAME))):
            planned += _rider_pair(rng, width, height, horizon)
    for _ in range(_count(rng, SIGNALS_PER_FRAME)):
        x = float(rng.uniform(0, width - 30))
        planned.append(("traffic light", [x, horizon * 0.2, x + 24, horizon * 0.2 + 64],
                        _pick(rng, (("red", 1), ("green", 1), ("yellow", 0.3)))))
    for _ in range(_count(rng, SIGNALS_PER_FRAME)):
        x = float(rng.uniform(0, width - 50))
        planned.append(("traffic sign", [x, horizon * 0.45, x + 44, horizon * 0.45 + 44], None))
    return planned


def render_frame(rng: np.random.Generator, width: int, height: int, timeofday: str, weather: str,
                 scene: str) -> tuple[Image.Image, list[SynthObject]]:
    horizon = int(height * rng.uniform(0.38, 0.55))
    canvas = _background(rng, width, height, horizon, timeofday, weather, scene)
    draw = ImageDraw.Draw(canvas)
    night = timeofday == "night"
    light = 0.55 if night else 1.0  # objects lit by headlights and street lamps
    planned = _plan_objects(rng, width, height, horizon)
    # Far objects first so nearer ones paint over them (and occlude them).
    planned.sort(key=lambda p: (p[0] != "traffic light" and p[0] != "traffic sign", p[1][3]))
    objects: list[SynthObject] = []
    for index, (category, box, extra) in enumerate(planned):
        clipped, truncated = _clip(box, width, height)
        if clipped[2] - clipped[0] < 4 or clipped[3] - clipped[1] < 4:
            continue
        color = tuple(int(c) for c in rng.integers(40, 255, 3))
        if category in ("pedestrian", "rider"):
            _draw_person(draw, box, color, light)
        elif category in ("bicycle", "motorcycle"):
            _draw_cycle(draw, box, category == "motorcycle", light)
        elif category in ("car", "truck", "bus"):
            _draw_vehicle(draw, box, category, color, light, night)
        elif category == "traffic light":
            draw.rectangle(box, fill=(25, 25, 25))
            x1, y1, x2, _ = box
            for slot, name in enumerate(("red", "yellow", "green")):
                lit = {"red": (255, 40, 30), "yellow": (255, 200, 0), "green": (30, 230, 90)}[name]
                cy = y1 + 11 + slot * 21
                draw.ellipse([x1 + 3, cy - 9, x2 - 3, cy + 9], fill=lit if name == extra else (60, 60, 60))
        else:
            draw.rectangle(box, fill=(20, 90, 200), outline=(240, 240, 240), width=3)
        later = [p[1] for p in planned[index + 1:]]
        occluded = any(o[0] < box[2] and o[2] > box[0] and o[1] < box[3] and o[3] > box[1] for o in later)
        objects.append(SynthObject(category, clipped, occluded, truncated, extra or "NA"))
    if weather == "rainy":
        for _ in range(300):
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            draw.line([(x, y), (x - 4, y + 14)], fill=_shade((200, 200, 220), 0.8 * (light if night else 1)), width=1)
    elif weather == "snowy":
        for _ in range(400):
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            draw.ellipse([x, y, x + 3, y + 3], fill=(235, 235, 240))
    elif weather == "foggy":
        canvas = Image.blend(canvas, Image.new("RGB", canvas.size, (200, 200, 200)), 0.25)
    return canvas, objects


def _label_object(obj: SynthObject, index: int, layout: str) -> dict:
    category = obj.category if layout == "det_20" else NAMES_2018.get(obj.category, obj.category)
    x1, y1, x2, y2 = obj.box
    return {
        "id": index,
        "category": category,
        "attributes": {"occluded": obj.occluded, "truncated": obj.truncated, "trafficLightColor": obj.light_color},
        "box2d": {"x1": x1, "y1": y1, "x2": x2, "y2": y2},
    }


def _label_record(frame: SynthFrame, layout: str) -> dict:
    labels = [_label_object(o, i, layout) for i, o in enumerate(frame.objects)]
    if layout != "det_20":  # 2018 files also carry lanes and drivable areas, without box2d
        labels.append({"id": len(labels), "category": "lane", "attributes": {"laneDirection": "parallel"},
                       "poly2d": [{"vertices": [[600, 400], [300, 720]], "types": "LL", "closed": False}]})
    attributes = {"weather": frame.weather, "scene": frame.scene, "timeofday": frame.timeofday}
    if layout == "per_image_2018":
        return {"name": frame.name.removesuffix(".jpg"), "attributes": attributes,
                "frames": [{"timestamp": frame.timestamp, "objects": labels}]}
    return {"name": frame.name, "attributes": attributes, "timestamp": frame.timestamp, "labels": labels}


def synth_frame(batch_id: str, seed: int, index: int, val_fraction: float, width: int,
                height: int) -> tuple[SynthFrame, bytes]:
    rng = np.random.default_rng([seed, index, zlib.crc32(batch_id.encode())])
    timeofday = _pick(rng, TIMES_OF_DAY)
    weather, scene = _pick(rng, WEATHERS), _pick(rng, SCENES)
    image, objects = render_frame(rng, width, height, timeofday, weather, scene)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88)
    frame = SynthFrame(
        name=image_name(batch_id, seed, index),
        split="val" if rng.random() < val_fraction else "train",
        timeofday=timeofday, weather=weather, scene=scene,
        timestamp=10000 + index * 100, objects=objects,
    )
    return frame, buffer.getvalue()


def write_batch(landing_dir: Path, batch_id: str, num_frames: int, *, seed: int = 0,
                layout: str = "det_20", val_fraction: float = 0.2, width: int = 1280,
                height: int = 720) -> Path:
    """Write a READY landing batch of `num_frames` frames; returns the batch folder."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    with _new_batch(landing_dir, batch_id) as batch_dir:
        _write_detection_frames(batch_dir, batch_id, num_frames, seed, layout, val_fraction, width, height)
    return batch_dir


@contextlib.contextmanager
def _new_batch(landing_dir: Path, batch_id: str) -> Iterator[Path]:
    """A batch folder that must not exist yet, marked READY once everything is written."""
    batch_dir = Path(landing_dir) / batch_id
    if batch_dir.exists():
        raise FileExistsError(f"landing batch {batch_dir} already exists; pick another batch id")
    yield batch_dir
    batch_dir.mkdir(parents=True, exist_ok=True)
    (batch_dir / READY_MARKER).write_text("")  # written last: the batch is complete


def _write_detection_frames(batch_dir: Path, batch_id: str, num_frames: int, seed: int, layout: str,
                            val_fraction: float, width: int, height: int) -> None:
    frames: dict[str, list[SynthFrame]] = {"train": [], "val": []}
    for index in range(num_frames):
        frame, jpeg = synth_frame(batch_id, seed, index, val_fraction, width, height)
        image_path = batch_dir / "images" / "100k" / frame.split / frame.name
        image_path.parent.mkdir(parents=True, exist_ok=True)
        image_path.write_bytes(jpeg)
        frames[frame.split].append(frame)
    for split, split_frames in frames.items():
        records = [_label_record(f, layout) for f in split_frames]
        if layout == "per_image_2018":
            for record in records:
                path = batch_dir / "labels" / "100k" / split / f"{record['name']}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(record))
        elif records:
            file_name = f"det_{split}.json" if layout == "det_20" else f"bdd100k_labels_images_{split}.json"
            path = batch_dir / "labels" / file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(records))


# Footage clips (BDD100K MOT, box_track_20): tracks that move and persist across a clip's frames.
# A clip's kinds of track, by weight; a cyclist is a bicycle or motorcycle with its rider, two tracks.
CLIP_TRACK_KINDS = (("car", 0.4), ("pedestrian", 0.3), ("cyclist", 0.12), ("truck", 0.1), ("bus", 0.08))
CLIP_SPEEDS = {"car": 0.02, "truck": 0.015, "bus": 0.012, "cyclist": 0.008, "pedestrian": 0.004}  # frame widths a frame
CLIP_ASPECTS = {"car": 0.6, "truck": 0.75, "bus": 0.55, "pedestrian": 2.6, "cyclist": 0.75}
CROWD_SHARE, OTHER_VEHICLE_SHARE = 0.2, 0.15  # clips with a crowd region, with an `other vehicle`


@dataclass
class SynthTrack:
    """One object of a clip: its box at frame 0 and how it moves (px a frame, a growth factor a
    frame as it nears the camera)."""

    track_id: str
    category: str  # det_20 name, or `other vehicle`
    box: tuple[float, float, float, float]
    dx: float
    growth: float
    color: tuple[int, int, int]
    crowd: bool = False  # a group of pedestrians labelled as one crowd box

    def box_at(self, frame_index: int, horizon: int) -> list[float]:
        """The box at `frame_index`: moved sideways and scaled about its foot, whose height above
        the horizon scales alike (perspective)."""
        x1, y1, x2, y2 = self.box
        scale = self.growth ** frame_index
        bottom = horizon + (y2 - horizon) * scale
        w, h = (x2 - x1) * scale, (y2 - y1) * scale
        cx = (x1 + x2) / 2 + self.dx * frame_index
        return [cx - w / 2, bottom - h, cx + w / 2, bottom]


@dataclass
class SynthClip:
    video_name: str
    split: str
    timeofday: str
    weather: str
    scene: str
    horizon: int
    tracks: list[SynthTrack]


def video_name(batch_id: str, seed: int, clip: int) -> str:
    """BDD-style video name, unique across batches (the batch id is part of the digest)."""
    digest = hashlib.sha1(f"clip/{batch_id}/{seed}/{clip}".encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:16]}"


def _clip_rng(batch_id: str, seed: int, clip: int) -> np.random.Generator:
    return np.random.default_rng([seed, clip, zlib.crc32(f"clip/{batch_id}".encode())])


def _plan_tracks(rng: np.random.Generator, width: int, height: int, horizon: int) -> list[SynthTrack]:
    """Two to six tracks, sometimes a crowd region and an `other vehicle` (ignore regions)."""
    tracks: list[SynthTrack] = []

    def add(category: str, box, dx: float, growth: float, crowd: bool = False) -> None:
        color = tuple(int(c) for c in rng.integers(40, 255, 3))
        tracks.append(SynthTrack(str(len(tracks) + 1), category, tuple(box), dx, growth, color, crowd))

    for _ in range(int(rng.integers(2, 7))):
        kind = _pick(rng, CLIP_TRACK_KINDS)
        box = _ground_box(rng, width, height, horizon, CLIP_ASPECTS[kind], rng.uniform(0.1, 0.8))
        dx = float(rng.choice([-1, 1]) * rng.uniform(0.5, 1.0) * CLIP_SPEEDS[kind] * width)
        growth = float(rng.uniform(0.99, 1.02))
        if kind == "cyclist":
            cw, ch = box[2] - box[0], box[3] - box[1]
            rider = [box[0] + cw * 0.25, box[1] - ch * 1.1, box[2] - cw * 0.25, box[1] + ch * 0.45]
            add("motorcycle" if rng.random() < 0.4 else "bicycle", box, dx, growth)
            add("rider", rider, dx, growth)
        else:
            add(kind, box, dx, growth)
    if rng.random() < CROWD_SHARE:
        add("pedestrian", _ground_box(rng, width, height, horizon, 1.2, rng.uniform(0.1, 0.3)),
            float(rng.uniform(-1, 1)), 1.0, crowd=True)
    if rng.random() < OTHER_VEHICLE_SHARE:
        add("other vehicle", _ground_box(rng, width, height, horizon, 0.75, rng.uniform(0.2, 0.6)),
            float(rng.uniform(-0.01, 0.01) * width), 1.0)
    return tracks


def plan_clip(batch_id: str, seed: int, clip: int, val_fraction: float, width: int, height: int) -> SynthClip:
    rng = _clip_rng(batch_id, seed, clip)
    timeofday, weather, scene = _pick(rng, TIMES_OF_DAY), _pick(rng, WEATHERS), _pick(rng, SCENES)
    horizon = int(height * rng.uniform(0.38, 0.55))
    return SynthClip(video_name(batch_id, seed, clip), "val" if rng.random() < val_fraction else "train",
                     timeofday, weather, scene, horizon, _plan_tracks(rng, width, height, horizon))


def _draw_track(draw, track: SynthTrack, box, light: float, night: bool) -> None:
    if track.crowd:  # three figures side by side fill the region
        x1, y1, x2, y2 = box
        step = (x2 - x1) / 3
        for k in range(3):
            _draw_person(draw, [x1 + k * step, y1 + (k % 2) * 0.08 * (y2 - y1), x1 + (k + 1) * step, y2], track.color, light)
    elif track.category in ("pedestrian", "rider"):
        _draw_person(draw, box, track.color, light)
    elif track.category in ("bicycle", "motorcycle"):
        _draw_cycle(draw, box, track.category == "motorcycle", light)
    else:  # car, truck, bus; an `other vehicle` looks like a truck
        _draw_vehicle(draw, box, track.category if track.category in ("car", "bus") else "truck", track.color, light, night)


def render_clip_frame(clip: SynthClip, background: Image.Image, frame_index: int) -> tuple[Image.Image, list[dict]]:
    """One frame of `clip` on its background, and its box_track_20 labels (tracks in view only)."""
    canvas = background.copy()
    width, height = canvas.size
    draw = ImageDraw.Draw(canvas)
    night = clip.timeofday == "night"
    light = 0.55 if night else 1.0
    placed = sorted(((t, t.box_at(frame_index, clip.horizon)) for t in clip.tracks), key=lambda p: p[1][3])
    labels = []
    for position, (track, box) in enumerate(placed):  # far first: nearer ones paint over them
        clipped, truncated = _clip(box, width, height)
        if clipped[2] - clipped[0] < 4 or clipped[3] - clipped[1] < 4:
            continue  # out of view in this frame; its id comes back with it
        _draw_track(draw, track, box, light, night)
        occluded = any(o[0] < box[2] and o[2] > box[0] and o[1] < box[3] and o[3] > box[1] for _, o in placed[position + 1:])
        x1, y1, x2, y2 = clipped
        labels.append({"id": track.track_id, "category": track.category,
                       "attributes": {"occluded": occluded, "truncated": truncated, "crowd": track.crowd},
                       "box2d": {"x1": x1, "y1": y1, "x2": x2, "y2": y2}})
    return canvas, labels


def clip_frame_name(video: str, frame_index: int) -> str:
    """BDD100K's track frame name: the video's name and the frame's number, counting from 1."""
    return f"{video}-{frame_index + 1:07d}.jpg"


def write_clip_batch(landing_dir: Path, batch_id: str, clips: int, frames_per_clip: int, *, seed: int = 0,
                     split_folders: bool = True, val_fraction: float = 0.2, width: int = 1280,
                     height: int = 720) -> Path:
    """Write a READY landing batch of `clips` footage clips of `frames_per_clip` frames each, in
    BDD100K's MOT layout (with or without `<split>` folders); returns the batch folder."""
    with _new_batch(landing_dir, batch_id) as batch_dir:
        _write_clips(batch_dir, batch_id, clips, frames_per_clip, seed, split_folders, val_fraction, width, height)
    return batch_dir


def _write_clips(batch_dir: Path, batch_id: str, clips: int, frames_per_clip: int, seed: int, split_folders: bool,
                 val_fraction: float, width: int, height: int) -> None:
    """`labels/box_track_20/[<split>/]<video>.json` and `images/track/[<split>/]<video>/<name>`."""
    for number in range(clips):
        clip = plan_clip(batch_id, seed, number, val_fraction, width, height)
        rng = _clip_rng(batch_id, seed, number)
        background = _background(rng, width, height, clip.horizon, clip.timeofday, clip.weather, clip.scene)
        split = [clip.split] if split_folders else []
        image_dir = batch_dir.joinpath("images", "track", *split, clip.video_name)
        image_dir.mkdir(parents=True, exist_ok=True)
        frames = []
        for index in range(frames_per_clip):
            image, labels = render_clip_frame(clip, background, index)
            name = clip_frame_name(clip.video_name, index)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=88)
            (image_dir / name).write_bytes(buffer.getvalue())
            frames.append({"name": name, "videoName": clip.video_name, "frameIndex": index, "labels": labels,
                           "attributes": {"weather": clip.weather, "scene": clip.scene, "timeofday": clip.timeofday}})
        label_path = batch_dir.joinpath("labels", "box_track_20", *split, f"{clip.video_name}.json")
        label_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.write_text(json.dumps(frames))


def main(argv: list[str] | None = None) -> None:
    from avperception_assets.workspace import Workspace, variable_for

    parser = argparse.ArgumentParser(description="Write a synthetic BDD100K landing batch: detection frames "
                                     "(images/100k) and, with --clips, footage clips in the MOT layout (images/track).")
    parser.add_argument("--batch-id", required=True)
    parser.add_argument("--frames", type=int, default=200, help="detection frames")
    parser.add_argument("--clips", type=int, default=0, help="footage clips (box_track_20) in the same batch")
    parser.add_argument("--frames-per-clip", type=int, default=20)
    parser.add_argument("--no-split-folders", action="store_true",
                        help="clips without <split> folders: ingest splits them by a hash of the clip id")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=LAYOUTS, default="det_20")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--landing-dir", type=Path, default=None, help=f"default: ${variable_for('data_location')}/landing")
    parser.add_argument("--if-empty", action="store_true", help="do nothing when the landing zone already holds a batch")
    args = parser.parse_args(argv)
    landing = args.landing_dir or Workspace.from_env().landing_dir
    if args.if_empty and landing.is_dir() and any(p.is_dir() for p in landing.iterdir()):
        print(f"landing zone {landing} already holds footage; not generating")
        return
    with _new_batch(landing, args.batch_id) as path:
        _write_detection_frames(path, args.batch_id, args.frames, args.seed, args.layout, args.val_fraction, 1280, 720)
        _write_clips(path, args.batch_id, args.clips, args.frames_per_clip, args.seed, not args.no_split_folders,
                     args.val_fraction, 1280, 720)
    print(f"wrote {args.frames} frames and {args.clips} clips of {args.frames_per_clip} frames to {path}")


if __name__ == "__main__":
    main()
