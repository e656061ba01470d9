"""Golden files for `avperception_assets.tracking`: BDD100K's own box_track evaluation on constructed
cases and on a synthetic clip.

It runs BDD100K's toolkit (`python -m bdd100k.eval.run -t box_track`, on scalabel's `eval/mot.py` and
py-motmetrics), which needs NumPy < 2, pandas < 2 and pydantic < 2, so it runs in an environment of
its own, never the project's:

    python3.11 -m venv /work/exp/motref-venv
    /work/exp/motref-venv/bin/pip install 'numpy<2' 'pandas<2' 'pydantic<2' scipy \\
        motmetrics==1.4.0 bdd100k==1.0.1 scalabel==0.3.1
    /work/exp/motref-venv/bin/python scripts/tracking_reference.py

For each case it writes, under `avperception_assets_tests/data/tracking_golden/<case>/`, the inputs
(`gt.json` and `pred.json`, or folders `gt/` and `pred/` of one file per video) and `expected.json`:
the toolkit's figures in the layout `python -m avperception_assets.tracking evaluate` prints
(undefined ratios, -inf or NaN in the toolkit, as null) and the versions that computed them.
Predicted track ids are digit strings: the toolkit reads them as integers.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).resolve().parent.parent / "avperception_assets_tests" / "data" / "tracking_golden"
SUPER_CLASSES = {"human": ["pedestrian", "rider"], "vehicle": ["car", "truck", "bus", "train"],
                 "bike": ["motorcycle", "bicycle"]}
CLASSES = [name for members in SUPER_CLASSES.values() for name in members]
METRICS = ["MOTA", "MOTP", "IDF1", "FP", "FN", "IDSw", "MT", "PT", "ML", "FM"]
PACKAGES = ["bdd100k", "scalabel", "motmetrics", "numpy", "scipy", "pandas", "pydantic"]


def label(track_id, category, box, crowd=False, score=None) -> dict:
    x1, y1, x2, y2 = box
    entry = {"id": str(track_id), "category": category,
             "box2d": {"x1": x1, "y1": y1, "x2": x2, "y2": y2},
             "attributes": {"occluded": False, "truncated": False, "crowd": crowd}}
    if score is not None:
        entry["score"] = score
    return entry


def pred(track_id, category, box, crowd=False) -> dict:
    return label(track_id, category, box, crowd, score=0.9)


def clip(video: str, labels_per_frame: list[list[dict]]) -> list[dict]:
    return [{"name": f"{video}-{index + 1:07d}.jpg", "videoName": video, "frameIndex": index, "labels": labels}
            for index, labels in enumerate(labels_per_frame)]


def shifted(box, dx=0.0, dy=0.0):
    x1, y1, x2, y2 = box
    return (x1 + dx, y1 + dy, x2 + dx, y2 + dy)


# --- constructed cases: each returns (gt videos, predicted videos), lists of frames by video name ---

def id_switch():
    """A car whose tracker id changes once; a pedestrian whose id changes for one frame and back."""
    car = [(100 + 10 * t, 100, 199 + 10 * t, 179) for t in range(6)]
    person = [(600, 200 + 5 * t, 639, 299 + 5 * t) for t in range(6)]
    gt = [[label(1, "car", car[t]), label(2, "pedestrian", person[t])] for t in range(6)]
    predicted = [[pred(10 if t < 3 else 11, "car", shifted(car[t], 3)),
                  pred(21 if t == 2 else 20, "pedestrian", shifted(person[t], 0, 2))] for t in range(6)]
    return {"s1": clip("s1", gt)}, {"s1": clip("s1", predicted)}


def kept_match():
    """Two overlapping cars: in frame 1 the optimal assignment would swap their trackers, but each
    keeps the tracker it was matched with while their IoU stays at least 0.5 (CLEAR-MOT)."""
    a, b = (0, 0, 99, 99), (30, 0, 129, 99)
    gt = [[label(1, "car", a), label(2, "car", b)] for _ in range(3)]
    predicted = [[pred(10, "car", a), pred(20, "car", b)],
                 [pred(10, "car", (20, 0, 119, 99)), pred(20, "car", (10, 0, 109, 99))],
                 [pred(10, "car", a), pred(20, "car", b)]]
    return {"k1": clip("k1", gt)}, {"k1": clip("k1", predicted)}


def fragmentation():
    """Tracks matched in 6/10 (two fragments), 9/10, 1/10, 4/5 and 1/5 of their frames."""
    tracked = {1: {0, 1, 2, 5, 6, 8}, 2: set(range(9)), 3: {4}}
    gt, predicted = [], []
    for t in range(10):
        frame_gt, frame_pred = [], []
        for track_id, hits in tracked.items():
            box = (200 * track_id, 100, 200 * track_id + 99, 199)
            frame_gt.append(label(track_id, "car", box))
            if t in hits:
                frame_pred.append(pred(10 * track_id, "car", shifted(box, 2, 2)))
        truck_id, hits = (4, {0, 1, 3, 4}) if t < 5 else (5, {7})
        box = (100, 400, 249, 519)
        frame_gt.append(label(truck_id, "truck", box))
        if t in hits:
            frame_pred.append(pred(10 * truck_id, "truck", shifted(box, -3)))
        gt.append(frame_gt)
        predicted.append(frame_pred)
    return {"f1": clip("f1", gt)}, {"f1": clip("f1", predicted)}


def ignore_regions():
    """other person, trailer and other vehicle regions: unmatched predictions mostly inside one are
    not counted, whatever their class; exactly half inside is a false positive; a prediction that
    matches an object inside a region is a match; an ignored-class prediction is dropped; `van` is
    a car."""
    other_person, trailer, other_vehicle = (300, 100, 349, 199), (500, 100, 699, 249), (800, 100, 899, 199)
    walker = (100, 100, 139, 199)
    hidden = (305, 105, 345, 195)
    gt, predicted = [], []
    for t in range(3):
        frame_gt = [label(1, "pedestrian", walker), label(2, "other person", other_person),
                    label(3, "trailer", trailer), label(4, "other vehicle", other_vehicle)]
        if t > 0:
            frame_gt.append(label(9, "pedestrian", hidden))
        gt.append(frame_gt)
        predicted.append([
            pred(1, "pedestrian", shifted(walker, 2)),
            pred(2, "pedestrian", shifted(hidden, 1)),
            pred(3, "car", (520, 110, 680, 240)),
            pred(4, "bicycle", (850, 100, 949, 199)),
            pred(5, "other vehicle", (1000, 100, 1099, 199)),
            pred(7, "van", (1000, 400, 1099, 499)),
        ])
    return {"i1": clip("i1", gt)}, {"i1": clip("i1", predicted)}


def crowd():
    """A crowd box is an ignore region, never a miss; predictions inside it are not counted, of any
    class; one mostly outside is a false positive; a prediction marked crowd is dropped."""
    region, car = (0, 300, 399, 499), (500, 300, 599, 399)
    gt = [[label(1, "car", region, crowd=True), label(2, "car", car)] for _ in range(2)]
    predicted = [[pred(1, "car", shifted(car, 2)), pred(2, "car", (50, 320, 149, 419)),
                  pred(3, "pedestrian", (200, 350, 239, 449)), pred(4, "car", (350, 320, 449, 419)),
                  pred(5, "car", (700, 300, 799, 399), crowd=True)] for _ in range(2)]
    return {"c1": clip("c1", gt)}, {"c1": clip("c1", predicted)}


def unmatched_in_ignore():
    """A car inside an ignore region, tracked by 10, then also by 11, which fits it better: the
    ignore rule's own assignment pairs the car with 11, so 10 (mostly inside the region) is dropped
    before CLEAR-MOT, which then switches the car to 11."""
    region, car = (0, 0, 299, 199), (100, 50, 199, 149)
    gt = [[label(1, "car", car), label(2, "other vehicle", region)] for _ in range(3)]
    predicted = [[pred(10, "car", car)],
                 [pred(10, "car", shifted(car, 10)), pred(11, "car", car), pred(12, "car", (20, 20, 59, 59))],
                 [pred(11, "car", car)]]
    return {"u1": clip("u1", gt)}, {"u1": clip("u1", predicted)}


def two_videos_same_id():
    """Track id "1" in three videos is three tracks; a video without predictions is all misses."""
    car_a = [(100 + 5 * t, 100, 199 + 5 * t, 199) for t in range(4)]
    car_b = [(400, 300 + 5 * t, 549, 399 + 5 * t) for t in range(4)]
    gt = {"va": clip("va", [[label(1, "car", box)] for box in car_a]),
          "vb": clip("vb", [[label(1, "car", box)] for box in car_b]),
          "vc": clip("vc", [[label(1, "pedestrian", (50, 50, 89, 149))] for _ in range(3)])}
    predicted = {"va": clip("va", [[pred(1, "car", shifted(box, 1))] for box in car_a]),
                 "vb": clip("vb", [[pred(2, "car", shifted(box, 1))] for box in car_b])}
    return gt, predicted


def class_without_objects():
    """Cars tracked, a truck never found, and bus predictions where there is no bus: the bus's MOTA
    is undefined and counts as 0 in mMOTA; the overall figures count its false positives."""
    cars = [(100, 100, 199, 179), (400, 100, 519, 199)]
    truck = (700, 100, 899, 299)
    gt = [[label(1, "car", cars[0]), label(2, "car", cars[1]), label(3, "truck", truck)] for _ in range(4)]
    predicted = [[pred(1, "car", shifted(cars[0], 4)), pred(2, "car", shifted(cars[1], -4)),
                  pred(5, "bus", (1000, 100, 1199, 299))] for _ in range(4)]
    return {"n1": clip("n1", gt)}, {"n1": clip("n1", predicted)}


# --- the synthetic clip: moving boxes with stable ids, and a noisy tracker ---

SYNTH_CLASSES = ["car", "car", "car", "pedestrian", "pedestrian", "truck", "bus", "rider", "bicycle", "motorcycle"]
WIDTH, HEIGHT = 1280, 720


def _inside(box) -> bool:
    x1, y1, x2, y2 = box
    return x1 >= 0 and y1 >= 0 and x2 < WIDTH and y2 < HEIGHT


def _synthetic_video(rng: np.random.Generator, video: str, frames: int) -> tuple[list[dict], list[dict]]:
    objects = []
    for track_id in range(1, 13):
        w, h = rng.uniform(40, 220), rng.uniform(40, 160)
        start = int(rng.integers(0, frames // 2))
        objects.append({"id": str(track_id), "category": str(rng.choice(SYNTH_CLASSES)),
                        "start": start, "end": int(rng.integers(start + 5, frames + 1)),
                        "origin": (rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)), "size": (w, h),
                        "velocity": (rng.uniform(-8, 8), rng.uniform(-3, 3)),
                        "tracker": str(100 + track_id),
                        "switch_at": int(rng.integers(0, frames)) if rng.random() < 0.4 else None})
    regions = [label("901", "car", (900, 500, 1179, 679), crowd=True),
               label("902", "other vehicle", (60, 420, 259, 599))]
    next_tracker, clutter = 500, []
    gt_frames, pred_frames = [], []
    for t in range(frames):
        frame_gt, frame_pred = list(regions), []
        for obj in objects:
            if not obj["start"] <= t < obj["end"]:
                continue
            (x, y), (w, h), (vx, vy) = obj["origin"], obj["size"], obj["velocity"]
            box = tuple(round(v, 1) for v in (x + vx * t, y + vy * t, x + vx * t + w, y + vy * t + h))
            if not _inside(box):
                continue
            frame_gt.append(label(obj["id"], obj["category"], box))
            if obj["switch_at"] == t:
                obj["tracker"] = str(next_tracker)
                next_tracker += 1
            if rng.random() < 0.12:  # missed
                continue
            noisy = tuple(round(v + rng.normal(0, 0.06) * (w if i % 2 == 0 else h), 1) for i, v in enumerate(box))
            noisy = (min(noisy[0], noisy[2]), min(noisy[1], noisy[3]), max(noisy[0], noisy[2]), max(noisy[1], noisy[3]))
            category = obj["category"] if rng.random() > 0.03 else "truck"  # an occasional wrong class
            frame_pred.append(label(obj["tracker"], category, noisy, score=round(float(rng.uniform(0.3, 1.0)), 3)))
        # Clutter: short false tracks, some inside the ignore regions.
        clutter = [c for c in clutter if c["until"] > t]
        if rng.random() < 0.3:
            x, y = rng.uniform(0, WIDTH - 80), rng.uniform(0, HEIGHT - 80)
            if rng.random() < 0.4:
                x, y = rng.uniform(920, 1080), rng.uniform(520, 600)
            clutter.append({"id": str(next_tracker), "box": (x, y, x + rng.uniform(30, 90), y + rng.uniform(30, 70)),
                            "until": t + int(rng.integers(1, 6)), "category": str(rng.choice(SYNTH_CLASSES))})
            next_tracker += 1
        for c in clutter:
            frame_pred.append(label(c["id"], c["category"], tuple(round(v, 1) for v in c["box"]),
                                    score=round(float(rng.uniform(0.05, 0.6)), 3)))
        gt_frames.append(frame_gt)
        pred_frames.append(frame_pred)
    return clip(video, gt_frames), clip(video, pred_frames)


def synthetic_clip():
    """Two 60-frame videos (ids "1".."12" in both) of moving boxes, and a tracker that misses, jitters,
    switches ids, now and then names the wrong class and adds clutter; seed 35."""
    rng = np.random.default_rng(35)
    gt, predicted = {}, {}
    for video in ("synth-0001", "synth-0002"):
        gt[video], predicted[video] = _synthetic_video(rng, video, 60)
    return gt, predicted


CASES = {
    "id_switch": (id_switch, "file"),
    "kept_match": (kept_match, "file"),
    "fragmentation": (fragmentation, "file"),
    "ignore_regions": (ignore_regions, "file"),
    "crowd": (crowd, "file"),
    "unmatched_in_ignore": (unmatched_in_ignore, "file"),
    "two_videos_same_id": (two_videos_same_id, "folder"),
    "class_without_objects": (class_without_objects, "file"),
    "synthetic_clip": (synthetic_clip, "folder"),
}


def write_inputs(case_dir: Path, kind: str, videos: dict[str, list[dict]], layout: str) -> Path:
    if layout == "file":
        path = case_dir / f"{kind}.json"
        path.write_text(json.dumps([frame for frames in videos.values() for frame in frames], indent=1))
        return path
    folder = case_dir / kind
    folder.mkdir()
    for video, frames in videos.items():
        (folder / f"{video}.json").write_text(json.dumps(frames, separators=(",", ":")))
    return folder


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def toolkit_figures(gt: Path, predicted: Path) -> dict:
    """BDD100K's box_track evaluation of the files, in the layout the project's command prints."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, "-m", "bdd100k.eval.run", "-t", "box_track", "-g", str(gt),
                        "-r", str(predicted), "--nproc", "1", "--out-file", str(out)],
                       check=True, capture_output=True, text=True)
        result = json.loads(out.read_text())
    # Each metric is a list of {name: value} tables: classes, super-categories, AVERAGE and OVERALL.
    table = {metric: {k: v for part in result[metric] for k, v in part.items()} for metric in METRICS}
    figures = {metric: _finite(table[metric]["OVERALL"]) for metric in METRICS}
    figures.update({f"m{metric}": result[f"m{metric}"] for metric in ("MOTA", "MOTP", "IDF1")})
    figures["classes"] = {name: {metric: _finite(table[metric][name]) for metric in METRICS}
                          for name in CLASSES + list(SUPER_CLASSES)}
    return figures


def main() -> None:
    reference = {name: version(name) for name in PACKAGES}
    for case, (build, layout) in CASES.items():
        case_dir = GOLDEN / case
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir(parents=True)
        gt_videos, pred_videos = build()
        gt = write_inputs(case_dir, "gt", gt_videos, layout)
        predicted = write_inputs(case_dir, "pred", pred_videos, layout)
        figures = toolkit_figures(gt, predicted)
        expected = {"case": build.__doc__.strip(), "reference": reference, "figures": figures}
        (case_dir / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
        print(f"{case:22s} MOTA {figures['MOTA']!s:>22} IDF1 {figures['IDF1']!s:>22} "
              + " ".join(f"{m} {figures[m]}" for m in ("FP", "FN", "IDSw", "MT", "PT", "ML", "FM")))


if __name__ == "__main__":
    main()
