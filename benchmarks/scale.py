"""Does a batch cost the same at 20,000 frames as at 2,000? Every stage of a footage run, timed.

For each table size (default 2,000 and 20,000 frames of 1280x720 distinct JPEGs) the table is
built and curated once, untimed, with its views. Then `--batches` READY batches of `--new`
frames land one after another, and each goes through the footage run a sensor requests
(raw_frames → curation columns → table_maintenance → slice views, with every check those steps
launch), each run in a process of its own that starts its local Ray, as Dagster's run launcher
and the lancedb resource do (so no run carries another's memory or Ray). Per stage the median
seconds over the batches and the highest peak RSS of the run's process tree (its Ray included;
sampled every 0.1 s) are compared between the sizes (targets: at 20,000 frames <= 1.2x the
2,000-frame figure; at 100,000 or more, time <= 1.3x and RSS still <= 1.2x). Also: the views'
disk next to the table's (target <= 10%), and the whole batch from READY to refreshed views, the
run process's start and exit included and shown apart (goal <= 60 s at 20,000 frames on a quiet
machine), and the CPU time the run's process tree used, per stage and per batch: divided by the
CPUs, the least a batch can take here however its work is ordered.

With `--shared-ray` each size then lands `--batches` more batches whose runs attach as drivers
to one long-lived Ray head (`cluster.head`, what `make ray` starts, with every CPU) instead of
starting a Ray each; their whole batch is reported beside the figure above (goal <= 45 s at
20,000 frames on a quiet machine). The head runs only while those batches do, so it adds
nothing to the figures above.

Frames are made quickly: a pool of rendered synthetic frames, each copy overlaid with its own
random 9x8 block pattern so every frame has a distinct difference hash (none is a duplicate);
labels are the pool frame's. The tables are kept under --root for `benchmarks/search.py` and for
later runs: a size whose table --root already holds (`built.json` beside it) is measured on it as
it is, the batches of earlier runs included, without building it again (a 100,000-frame table
takes hours here: build it once with --build-only, in the background).

    .venv/bin/python benchmarks/scale.py [--sizes 2000 20000] [--batches 3] [--new 500] [--shared-ray]
                                         [--root DIR [--build-only]]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from targets import target  # noqa: E402

RATIO_GOAL = 1.2
TIME_RATIO_GOAL_100K = 1.3  # a stage's time at 100,000 frames or more
VIEWS_DISK_GOAL = 0.10
BATCH_GOAL_S = 60.0
SHARED_RAY_BATCH_GOAL_S = 45.0
POOL_FRAMES = 64
STAGES = ("raw_frames", "curation_columns", "slice_views", "table_maintenance")
BUILT = "built.json"  # beside a kept table: it was built and curated (see the module docstring)


# --- quick distinct frames ---------------------------------------------------------------


def _pool(root: Path, width: int, height: int) -> list[tuple[bytes, dict, str]]:
    """Rendered synthetic frames: (JPEG, det_20 label record, split)."""
    from avperception_assets import synthetic

    batch = root / "pool" / "pool"  # a kept root's pool (the same seed) is read as it is
    if not batch.is_dir():
        synthetic.write_batch(root / "pool", "pool", POOL_FRAMES, seed=99, width=width, height=height)
    pool = []
    for labels_file in sorted((batch / "labels").glob("det_*.json")):
        split = labels_file.stem.removeprefix("det_")
        for record in json.loads(labels_file.read_text()):
            pool.append(((batch / "images" / "100k" / split / record["name"]).read_bytes(), record, split))
    return pool


def _distinct(args) -> list[tuple[str, bytes]]:
    """Copies of pool frames, each blended with its own random block pattern."""
    pool_jpegs, start, count, seed = args
    rng = np.random.default_rng(seed)
    out = []
    for n in range(start, start + count):
        base = Image.open(io.BytesIO(pool_jpegs[n % len(pool_jpegs)])).convert("RGB")
        blocks = Image.fromarray(rng.integers(0, 256, (8, 9), dtype=np.uint8)).resize(base.size, Image.Resampling.NEAREST)
        frame = Image.blend(base, Image.merge("RGB", [blocks] * 3), 0.5)
        buffer = io.BytesIO()
        frame.save(buffer, "JPEG", quality=85)
        out.append((f"f{seed}-{n:06d}", buffer.getvalue()))
    return out


def land_batch(landing: Path, batch_id: str, frames: int, pool: list[tuple[bytes, dict, str]], seed: int) -> Path:
    """A READY det_20 batch of `frames` distinct frames (each keeps its pool frame's split)."""
    from avperception_assets.ingest.landing import READY_MARKER

    batch = landing / batch_id
    jpegs = [p[0] for p in pool]
    chunks = [(jpegs, start, min(250, frames - start), seed * 1000 + start // 250) for start in range(0, frames, 250)]
    labels: dict[str, list[dict]] = {}
    with ProcessPoolExecutor(os.cpu_count()) as workers:
        for chunk_start, chunk in zip(range(0, frames, 250), workers.map(_distinct, chunks)):
            for offset, (name, data) in enumerate(chunk):
                _, record, split = pool[(chunk_start + offset) % len(pool)]
                folder = batch / "images" / "100k" / split
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{batch_id}-{name}.jpg").write_bytes(data)
                labels.setdefault(split, []).append(dict(record, name=f"{batch_id}-{name}.jpg"))
    (batch / "labels").mkdir()
    for split, records in labels.items():
        (batch / "labels" / f"det_{split}.json").write_text(json.dumps(records))
    (batch / READY_MARKER).touch()
    return batch


# --- measuring -----------------------------------------------------------------------------


def _tree() -> dict[tuple[int, int], tuple[int, float]]:
    """(pid, start tick) → (RSS bytes, CPU seconds so far) of every descendant of this process
    (the run's process, its Ray's raylet, GCS and workers). This process is left out: it holds
    the landing of the table it built (more at 20,000 frames), which is no part of a run."""
    parents, stats = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid = int(stat.parent.name)
            parents[pid] = int(fields[1])
            stats[pid] = (int(fields[19]), int(fields[21]), int(fields[11]) + int(fields[12]))
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = set(), [os.getpid()]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    page, tick = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
    return {(pid, stats[pid][0]): (stats[pid][1] * page, stats[pid][2] / tick) for pid in tree if pid in stats}


class TreeSampler:
    """Samples the process tree in the background: (time, {process: (RSS bytes, CPU seconds)})."""

    def __init__(self, every_s: float = 0.1):
        self.samples: list[tuple[float, dict]] = []
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append((time.time(), _tree()))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def peak(self, start: float, end: float) -> int:
        """Peak RSS over [start, end]; widened by one sampling interval only for a step too short
        to hold a sample, since the widened window takes in the neighbouring steps' memory."""
        def totals(lo: float, hi: float) -> list[int]:
            return [sum(rss for rss, _ in tree.values()) for t, tree in self.samples if lo <= t <= hi]

        return max(totals(start, end) or totals(start - self.every_s, end + self.every_s) or [0])

    def cpu_s(self, start: float, end: float) -> float:
        """CPU seconds the tree used over [start, end], to within one sampling interval at each
        end; a process that lives less than one interval is missed."""
        before, last = {}, {}
        for t, tree in self.samples:
            target = before if t < start else last if t <= end else None
            if target is not None:
                target.update((process, cpu) for process, (_, cpu) in tree.items())
        return sum(cpu - before.get(process, 0.0) for process, cpu in last.items())


def step_spans(instance, run_id: str) -> dict[str, tuple[float, float]]:
    """Step key → (start, end) wall time, from the run's event log."""
    import dagster as dg

    starts, spans = {}, {}
    for entry in instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS,
                                                    dg.DagsterEventType.STEP_FAILURE}):
        key = entry.dagster_event.step_key
        if entry.dagster_event.event_type == dg.DagsterEventType.STEP_START:
            starts[key] = entry.timestamp
        elif key in starts:
            spans[key] = (starts[key], entry.timestamp)
    return spans


def stage_of(step_key: str) -> str:
    """The stage a step belongs to: an asset step, or a check step of that asset's stage."""
    from avperception_assets.curation import columns as curation

    if step_key in STAGES:
        return step_key
    if step_key.startswith(("raw_frames", "no_duplicate", "boxes_inside", "frames_decode")):
        return "raw_frames checks"
    if step_key.startswith("slice_view"):
        return "slice_views checks"
    if any(step_key.startswith(c) for c in curation.COLUMNS) or "coverage" in step_key or "duplicate" in step_key:
        return "curation checks"
    return step_key


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --- the runs ------------------------------------------------------------------------------


def _footage_run(instance_ref, batch_id: str, data_dir: str, ray_address: str | None) -> None:
    """The footage run a sensor requests for `batch_id` (in a spawned process)."""
    import dagster as dg

    from avperception_assets.defs.resources import WorkspaceResource
    from avperception_assets.defs.sensors import FOOTAGE_SELECTION, footage_request
    from avperception_assets.definitions import defs

    request = footage_request(batch_id)
    run_config = {**request.run_config, "loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    with dg.DagsterInstance.from_ref(instance_ref) as instance:
        result = dg.materialize([*defs.assets, *defs.asset_checks], selection=FOOTAGE_SELECTION, instance=instance,
                                resources={"workspace": WorkspaceResource(data_location=data_dir,
                                                                          ray_address=ray_address)},
                                run_config=run_config, tags={**request.tags, "batch": batch_id})
    if not result.success:
        raise SystemExit(f"footage run of {batch_id} failed")


def footage_run(instance, batch_id: str, data_dir: str, ray_address: str | None = None) -> tuple[str, float, float]:
    """One footage run in a process of its own, as Dagster's run launcher gives every run: its
    memory and its Ray are its own and end with it (or it attaches to the Ray head at
    `ray_address`). Returns (run id, start, end)."""
    import dagster as dg

    context = multiprocessing.get_context("spawn")
    started = time.time()
    process = context.Process(target=_footage_run, args=(instance.get_ref(), batch_id, data_dir, ray_address))
    process.start()
    process.join()
    if process.exitcode:
        raise RuntimeError(f"the footage run of {batch_id} failed (exit code {process.exitcode})")
    [run] = instance.get_runs(filters=dg.RunsFilter(tags={"batch": batch_id}))
    return run.run_id, started, time.time()


@dataclass
class Batches:
    """Figures of the batches of one size: per stage (seconds, peak RSS), per batch (whole,
    CPU seconds, run start to first step, last step to exit)."""

    stage_s: dict[str, list[float]] = field(default_factory=dict)
    stage_rss: dict[str, list[int]] = field(default_factory=dict)
    whole: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    outside: list[tuple[float, float]] = field(default_factory=list)

    def medians(self) -> dict:
        return {"whole_s": statistics.median(self.whole), "cpu_s": statistics.median(self.cpu),
                "start_s": statistics.median(o[0] for o in self.outside),
                "exit_s": statistics.median(o[1] for o in self.outside)}


def run_batch(instance, sampler: TreeSampler, landing: Path, data_dir: str, batch_id: str, new: int, pool,
              seed: int, batches: Batches, ray_address: str | None = None) -> None:
    """Land one batch, run its footage run and add its figures to `batches`."""
    land_batch(landing, batch_id, new, pool, seed=seed)
    run_id, t0, t1 = footage_run(instance, batch_id, data_dir, ray_address)
    batches.whole.append(t1 - t0)
    batches.cpu.append(sampler.cpu_s(t0, t1))
    spans: dict[str, list[tuple[float, float]]] = {}
    steps = step_spans(instance, run_id)
    for key, span in steps.items():
        spans.setdefault(stage_of(key), []).append(span)
    batches.outside.append((min(start for start, _ in steps.values()) - t0, t1 - max(end for _, end in steps.values())))
    line = []
    for stage, stage_spans in sorted(spans.items()):
        seconds = sum(end - start for start, end in stage_spans)
        peak = max(sampler.peak(start, end) for start, end in stage_spans)
        batches.stage_s.setdefault(stage, []).append(seconds)
        batches.stage_rss.setdefault(stage, []).append(peak)
        cpu_s = sum(sampler.cpu_s(start, end) for start, end in stage_spans)
        line.append(f"{stage} {seconds:.1f} s, {cpu_s:.0f} s of CPU, {peak / 2**30:.2f} GB")
    ray = f"shared Ray head {ray_address}" if ray_address else "a Ray of its own"
    print(f"   +{new} ({batch_id}, {ray}): {t1 - t0:.1f} s from READY to refreshed views, {batches.cpu[-1]:.0f} s "
          f"of CPU: run start {batches.outside[-1][0]:.1f} s; {'; '.join(line)}; after the last step "
          f"{batches.outside[-1][1]:.1f} s", flush=True)


def measure_size(root: Path, frames: int, batches: int, new: int, pool, shared_ray: bool = False) -> dict:
    import dagster as dg

    from avperception_assets.cluster import head as shared_head
    from avperception_assets.storage import tables as storage
    from avperception_assets.workspace import Workspace

    workspace = Workspace(data_location=str(root))
    landing, run = workspace.landing_dir, time.strftime("%Y%m%d%H%M%S")  # batch ids of this run's own
    own, shared = Batches(), Batches()
    with tempfile.TemporaryDirectory() as home, dg.DagsterInstance.local_temp(home) as instance, \
            TreeSampler() as sampler:
        build_table(instance, root, workspace, frames, pool)
        rows = storage.connect(workspace.lancedb_uri).open_table(storage.FRAMES_TABLE).count_rows()
        print(f"   the table holds {rows} frames before this run's batches", flush=True)
        for n in range(batches):
            run_batch(instance, sampler, landing, workspace.data_location, f"new-{run}-{n}", new, pool,
                      frames + n + 1, own)
        if shared_ray:
            temp_dir = Path(tempfile.mkdtemp(prefix="avpb", dir="/tmp"))  # short: Ray's socket paths
            head = shared_head.start_head(_free_port(), client_port=_free_port(), temp_dir=temp_dir)
            try:
                for n in range(batches):
                    run_batch(instance, sampler, landing, workspace.data_location, f"shared-{run}-{n}", new, pool,
                              frames + batches + n + 1, shared, ray_address=head.address)
            finally:
                shared_head.stop_head(temp_dir)
                shutil.rmtree(temp_dir, ignore_errors=True)
    uri = Path(workspace.lancedb_uri)
    table_disk = sum(disk_bytes(p) for p in uri.iterdir() if p.name.startswith(f"{storage.FRAMES_TABLE}.lance"))
    views_disk = sum(disk_bytes(p) for p in uri.iterdir() if p.name.startswith(f"{storage.FRAMES_TABLE}_"))
    print(f"   disk: table {table_disk / 2**20:.0f} MB, views {views_disk / 2**20:.1f} MB", flush=True)
    return {"stage_s": {k: statistics.median(v) for k, v in own.stage_s.items()},
            "stage_rss": {k: max(v) for k, v in own.stage_rss.items()}, **own.medians(),
            "shared": shared.medians() if shared_ray else None, "views_fraction": views_disk / table_disk}


def build_table(instance, root: Path, workspace, frames: int, pool) -> None:
    """Land `frames` distinct frames as one batch and run its footage run (ingest, curation, views),
    untimed, unless `root` holds such a table already."""
    marker = root / BUILT
    if marker.is_file():
        print(f"\n== {frames} frames: reusing the table built before ({marker.read_text().strip()})", flush=True)
        return
    print(f"\n== {frames} frames: building the table", flush=True)
    started = time.perf_counter()
    land_batch(workspace.landing_dir, "base", frames, pool, seed=frames)
    footage_run(instance, "base", workspace.data_location)
    marker.write_text(json.dumps({"frames": frames, "seconds": round(time.perf_counter() - started),
                                  "built": time.strftime("%Y-%m-%d %H:%M")}))
    print(f"   built and curated in {time.perf_counter() - started:.0f} s", flush=True)


def build_tables(root: Path, sizes: list[int], pool) -> None:
    import dagster as dg

    from avperception_assets.workspace import Workspace

    for size in sizes:  # an instance each: both tables' runs are tagged batch=base
        with tempfile.TemporaryDirectory() as home, dg.DagsterInstance.local_temp(home) as instance:
            build_table(instance, root / f"{size}", Workspace(data_location=str(root / f"{size}")), size, pool)


def _free_port() -> int:
    """A localhost port nothing listens on now (the benchmark's own head, not `make ray`'s)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 20000])
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--new", type=int, default=500)
    parser.add_argument("--root", type=Path, default=None, help="where the tables are kept (default: a temp dir)")
    parser.add_argument("--shared-ray", action="store_true",
                        help="also run --batches batches attached to one long-lived Ray head (see above)")
    parser.add_argument("--build-only", action="store_true", help="build the tables under --root, measure nothing")
    args = parser.parse_args(argv)
    if args.build_only and args.root is None:
        parser.error("--build-only keeps the tables for later runs: give --root")
    root = args.root or Path(tempfile.mkdtemp(prefix="avp-bench-scale-"))
    print(f"tables under {root}; {os.cpu_count()} CPUs; frames 1280x720", flush=True)
    pool = _pool(root, 1280, 720)
    if args.build_only:
        build_tables(root, args.sizes, pool)
        return
    small, large = (measure_size(root / f"{size}", size, args.batches, args.new, pool, args.shared_ray)
                    for size in args.sizes)

    print(f"\n| stage | {args.sizes[0]} frames: median s | {args.sizes[1]}: median s | ratio | peak RSS GB | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for stage in sorted(small["stage_s"]):
        s, l = small["stage_s"][stage], large["stage_s"].get(stage, float("nan"))
        rs, rl = small["stage_rss"][stage], large["stage_rss"].get(stage, 0)
        print(f"| {stage} | {s:.1f} | {l:.1f} | {l / s:.2f} | {rs / 2**30:.2f} → {rl / 2**30:.2f} | {rl / rs:.2f} |")
    print(f"whole batch, READY to refreshed views (median): {small['whole_s']:.1f} s at {args.sizes[0]}, "
          f"{large['whole_s']:.1f} s at {args.sizes[1]}")
    if args.shared_ray:
        print(f"the same with the runs attached to a shared Ray head (median): {small['shared']['whole_s']:.1f} s at "
              f"{args.sizes[0]}, {large['shared']['whole_s']:.1f} s at {args.sizes[1]}; run start to first step "
              f"{small['shared']['start_s']:.1f} and {large['shared']['start_s']:.1f} s, last step to exit "
              f"{small['shared']['exit_s']:.1f} and {large['shared']['exit_s']:.1f} s; CPU time "
              f"{small['shared']['cpu_s']:.0f} and {large['shared']['cpu_s']:.0f} s")
    print(f"of which outside the steps (median): the run process's start to its first step {small['start_s']:.1f} "
          f"and {large['start_s']:.1f} s; its last step to its exit (Ray's stop, the process's) "
          f"{small['exit_s']:.1f} and {large['exit_s']:.1f} s")
    cpus = os.cpu_count() or 1
    print(f"CPU time of the run's process tree (median): {small['cpu_s']:.0f} s at {args.sizes[0]}, "
          f"{large['cpu_s']:.0f} s at {args.sizes[1]}: on {cpus} CPUs a batch takes at least "
          f"{large['cpu_s'] / cpus:.0f} s at {args.sizes[1]}")
    time_goal = TIME_RATIO_GOAL_100K if args.sizes[1] >= 100_000 else RATIO_GOAL
    for stage in sorted(small["stage_s"]):
        target(f"{stage}_time_ratio", large["stage_s"][stage] / small["stage_s"][stage], "<=", time_goal)
        target(f"{stage}_rss_ratio", large["stage_rss"][stage] / small["stage_rss"][stage], "<=", RATIO_GOAL)
    target("views_disk_fraction", large["views_fraction"], "<=", VIEWS_DISK_GOAL)
    target("batch_ready_to_views_s", large["whole_s"], "<=", BATCH_GOAL_S, unit=" s", digits=1)
    if args.shared_ray:
        target("batch_ready_to_views_shared_ray_s", large["shared"]["whole_s"], "<=", SHARED_RAY_BATCH_GOAL_S,
               unit=" s", digits=1)


if __name__ == "__main__":
    main()
