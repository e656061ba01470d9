"""Shared fixtures: every test runs against state under a temporary AVP_DATA_DIR."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image
from xdist.scheduler import LoadScopeScheduling

# Before any project import reads it: nothing a test does may touch the repository's data/.
os.environ["AVP_DATA_DIR"] = tempfile.mkdtemp(prefix="avp-test-data-")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TQDM_DISABLE", "1")  # Geneva's progress bars; read when Geneva is imported

from avperception_assets import patches  # noqa: E402

patches.apply_at_startup()  # as the code location does, before the stages import lancedb and geneva

from avperception_assets.cluster.ray import ray_context  # noqa: E402
from avperception_assets.curation import columns as curation
from avperception_assets.ingest import frames as ingest
from avperception_assets.ingest.landing import READY_MARKER
from avperception_assets.storage import pixels, tables as storage
from avperception_assets import synthetic
from avperception_assets.slices import views as slices
from avperception_assets.defs import evaluation_assets, training_assets  # noqa: E402
from avperception_assets.defs.resources import WorkspaceResource  # noqa: E402
from avperception_assets.failure_modes.registry import get_mode
from avperception_assets.workspace import Workspace

CURATED_SIZE = dict(width=640, height=360)
RAY_WORKER_PORTS = range(10002, 20000)  # what a local Ray's workers bind (Ray's default range)


def free_ports(count: int) -> list[int]:
    """`count` localhost ports free now that no other process takes before servers are started
    on them: outside the kernel's ephemeral range (what every bind to port 0 and every outgoing
    connection gets, such as the other xdist worker's Ray) and above Ray's worker ports. A port
    from a bind to port 0 may be handed to another process before the server binds it: the
    two-node Ray test then most likely reached another process's server on its client port, and
    every connection attempt timed out (2026-12-03)."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [p for p in range(RAY_WORKER_PORTS.stop, 65536) if not low <= p <= high]
    free = []
    for port in random.sample(ports, len(ports)):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        free.append(port)
        if len(free) == count:
            return free
    raise RuntimeError(f"fewer than {count} free localhost ports outside the ephemeral range")


def fake_distribution(root: Path, name: str, version: str) -> Path:
    """A folder that, first on sys.path, makes `importlib.metadata` report `name` at `version`
    (the import system still finds the real package): how a test fakes a library's version."""
    info = Path(root) / f"fake-{name}" / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return info.parent


def build_frames_table(root: Path, batches: list[tuple[str, int, int]], layout: str = "det_20"):
    """Land and ingest synthetic batches [(batch_id, frames, seed)] under root; returns (conn, landing)."""
    landing = Path(root) / "landing"
    for batch_id, frames, seed in batches:
        synthetic.write_batch(landing, batch_id, frames, seed=seed, layout=layout)
    conn = storage.connect(str(Path(root) / "lancedb"))
    ingest.ingest_batches(conn, landing)
    return conn, landing


# The session fixtures below cost tens of seconds to build. `make test` runs the suite on two
# pytest-xdist workers, a whole module at a time (a module fixture is built once), and the modules
# that share one of these fixtures on the same worker, which builds it once.
SHARED_SESSION_FIXTURES = {
    "curated_db": ("test_curation", "test_curation_assets", "test_loop", "test_slices"),
    "trained_rider": ("test_distributed_training", "test_evaluation_assets", "test_onnx_export",
                      "test_training_assets"),
}
GROUP_OF_MODULE = {module: fixture for fixture, modules in SHARED_SESSION_FIXTURES.items() for module in modules}


def _module(nodeid: str) -> str:
    return Path(nodeid.split("::", 1)[0]).stem


def _scope(nodeid: str) -> str:
    return GROUP_OF_MODULE.get(_module(nodeid), _module(nodeid))


# Test tiers (`make test-fast` deselects these markers; pyproject registers them). A test is
# marked by the fixtures it uses, by `pytestmark` in its module, or by its own mark.
MARKERS_OF_FIXTURE = {
    "local_ray": ("ray",),  # and so curated_db, built on it
    "trained_rider": ("dagster_run", "training"),
    "trained": ("training",),  # test_training.py's tiny run
    "base_run": ("dagster_run", "training"),  # test_base_report.py's runs
}


@pytest.hookimpl(tryfirst=True)  # the markers must be on before `-m` deselects by them
def pytest_collection_modifyitems(items):
    """Tier markers from the fixtures a test uses. Then the Ray-cluster test first: its
    cluster's jobs run 2-4x slower while another Ray is up on the same machine (see
    test_ray_cluster.py). Then the groups that share a session fixture, the longest work, while
    the other worker takes the modules in file order. Pairing the heavy Ray jobs with light
    tests measured faster than handing out the heaviest modules first (9 min 0 s against
    9 min 45 s, one run each)."""
    for item in items:
        for fixture, markers in MARKERS_OF_FIXTURE.items():
            if fixture in item.fixturenames:
                for marker in markers:
                    item.add_marker(marker)
        for fixture, modules in SHARED_SESSION_FIXTURES.items():
            if fixture in item.fixturenames and _module(item.nodeid) not in modules:
                raise pytest.UsageError(f"{item.nodeid} uses {fixture}: add its module to SHARED_SESSION_FIXTURES")
    items.sort(key=lambda item: (_module(item.nodeid) != "test_ray_cluster", _module(item.nodeid) not in GROUP_OF_MODULE))


# The guard that keeps the tiers honest: a test that starts Ray, a Dagster run, a dagster, ray
# or torchrun process, a fresh interpreter (`python -c`), or an optimizer step over a model,
# without the marker for it, fails naming itself and the marker. It runs in every run, so
# `make test` checks the markers too. (What a Python subprocess does inside itself is not seen:
# mark such tests by hand.)
COMMAND_MARKERS = {"dagster": "dagster_run", "dagster-webserver": "dagster_run", "dagster-daemon": "dagster_run",
                   "ray": "ray", "torchrun": "training", "torch.distributed.run": "training"}
_running: list[pytest.Item] = []  # the test whose setup, call or teardown runs now
_optimizer_guard: list = []  # the optimizer hook's handle, once registered


def _require(marker: str, doing: str) -> None:
    if _running and _running[-1].get_closest_marker(marker) is None:
        pytest.fail(f"{_running[-1].nodeid} {doing} but is not marked `{marker}`, so `make test-fast` would "
                    f"run it: mark it (pytestmark, @pytest.mark.{marker}, or MARKERS_OF_FIXTURE)", pytrace=False)


def _command_marker(args) -> str | None:
    """The tier marker of a command line: its program, or the module after `-m`."""
    if isinstance(args, (str, bytes, os.PathLike)):
        args = os.fsdecode(args).split()
    argv = [os.fsdecode(a) for a in args]
    if argv[0] == sys.executable and argv[1:2] == ["-c"]:
        return "fresh_interpreter"
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else None
    return COMMAND_MARKERS.get(Path(argv[0]).name) or COMMAND_MARKERS.get(module) or \
        COMMAND_MARKERS.get((module or "").split(".")[0])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item):
    _guard_optimizer_steps()
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


def _guard_optimizer_steps() -> None:
    """Once torch is imported (by the modules that train, at collection): importing it here
    would cost every run seconds."""
    if "torch" in sys.modules and not _optimizer_guard:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _optimizer_guard.append(register_optimizer_step_pre_hook(_training_step))


def _training_step(optimizer, *_) -> None:
    """A step over a model's weights; one lone parameter (a learning-rate schedule's test) trains nothing."""
    if sum(len(group["params"]) for group in optimizer.param_groups) > 1:
        _require("training", "takes an optimizer step over a model")


@pytest.fixture(scope="session", autouse=True)
def tier_guard():
    """Ray's start, a Dagster run executed in this process (`materialize` and every job's
    `execute_in_process`) or launched, and the command lines of COMMAND_MARKERS, guarded."""
    import ray  # here rather than at the top: after `patches.apply_at_startup` above

    start_ray, popen_init = ray.init, subprocess.Popen.__init__
    execute_in_process, launch_run = dg.JobDefinition.execute_in_process, dg.DagsterInstance.launch_run

    def guarded_ray_init(*args, **kwargs):
        _require("ray", "starts Ray")
        return start_ray(*args, **kwargs)

    def guarded_execute_in_process(self, *args, **kwargs):
        _require("dagster_run", "executes a Dagster run")
        return execute_in_process(self, *args, **kwargs)

    def guarded_launch_run(self, *args, **kwargs):
        _require("dagster_run", "launches a Dagster run")
        return launch_run(self, *args, **kwargs)

    def guarded_popen_init(self, args, *rest, **kwargs):
        if marker := _command_marker(args):
            _require(marker, f"runs `{args}`")
        popen_init(self, args, *rest, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray, "init", guarded_ray_init)
        patch.setattr(dg.JobDefinition, "execute_in_process", guarded_execute_in_process)
        patch.setattr(dg.DagsterInstance, "launch_run", guarded_launch_run)
        patch.setattr(subprocess.Popen, "__init__", guarded_popen_init)
        yield


class _ByModuleAndSharedFixture(LoadScopeScheduling):
    """Scopes of whole modules, or of the modules that share a session fixture, handed out in
    collection order. Not `--dist loadgroup` with marks: xdist 3.8 groups by renaming
    `item._nodeid`, which pytest 9.2 no longer reads (`Item.nodeid` comes from `_id`), so every
    test became a scope of its own and the shared fixtures were built on both workers
    (pytest-xdist#1386). `_split_scope` is private: pyproject pins pytest-xdist for it."""

    def _split_scope(self, nodeid: str) -> str:
        return _scope(nodeid)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    config.option.loadscopereorder = False  # keep the order pytest_collection_modifyitems set
    return _ByModuleAndSharedFixture(config, log)


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """A fresh AVP_DATA_DIR for one test."""
    monkeypatch.setenv("AVP_DATA_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the whole session: its start costs seconds."""
    with ray_context():
        yield


S3_BUCKET = "avp-test"


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    bucket: str
    credentials: dict[str, str]  # the standard AWS variables the fixture exported

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.credentials["AWS_REGION"],
                            aws_access_key_id=self.credentials["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.credentials["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def remove(self, prefix: str) -> None:
        client, keys = self.client(), self.keys(prefix)
        for start in range(0, len(keys), 1000):  # S3's most per request
            client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[start:start + 1000]]})


def _wait_for_port(port: int, process: subprocess.Popen, seconds: float = 30.0) -> None:
    for _ in range(int(seconds / 0.1)):
        if process.poll() is not None:
            raise RuntimeError(f"moto's server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto's server did not listen on 127.0.0.1:{port} within {seconds:.0f} s")


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on 127.0.0.1, one bucket, and the standard AWS variables
    pointing at it exported for the session (Ray workers started later inherit them; Geneva
    jobs also get them as the connection's storage options, see Workspace.object_store_options)."""
    [port] = free_ports(1)
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, process)
        credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
        server = S3Server(f"http://127.0.0.1:{port}", S3_BUCKET, credentials)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in {**credentials, "AWS_ENDPOINT_URL": server.endpoint,
                                "AWS_ALLOW_HTTP": "true",
                                "AWS_EC2_METADATA_DISABLED": "true"}.items():
                patch.setenv(name, value)
            server.client().create_bucket(Bucket=S3_BUCKET)
            yield server
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def s3_location(s3_server, request) -> str:
    """`s3://<bucket>/<prefix>`, a prefix of this test's own, removed afterwards."""
    prefix = f"{request.node.name[:60]}-{uuid.uuid4().hex[:8]}"
    yield f"s3://{s3_server.bucket}/{prefix}"
    s3_server.remove(prefix + "/")


def _variant(jpeg: bytes, scale: float, quality: int) -> tuple[bytes, int, int]:
    """A re-encoded, slightly resized copy of a frame."""
    image = Image.open(io.BytesIO(jpeg))
    size = (round(image.width * scale), round(image.height * scale))
    out = io.BytesIO()
    image.resize(size, Image.Resampling.BILINEAR).save(out, "JPEG", quality=quality)
    return out.getvalue(), size[0], size[1]


def damaged_inside(jpeg: bytes) -> bytes:
    """A JPEG whose container is intact but whose scan names Huffman tables never defined:
    it passes ingestion's structural check and fails any decoder."""
    damaged = bytearray(jpeg)
    damaged[jpeg.index(b"\xff\xda") + 6] = 0x33  # first scan component: DC/AC tables 3/3
    return bytes(damaged)


def one_pixel_changed(jpeg: bytes) -> bytes:
    """The frame with one pixel inverted, encoded again."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    image.putpixel((0, 0), tuple(255 - v for v in image.getpixel((0, 0))))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def write_leak_batch(landing: Path, batch_id: str, video: str, split: str, images: list[bytes]) -> list[str]:
    """A READY MOT landing batch of one clip, `video` in `split`, whose frames are `images` (copies
    of frames already ingested in the other split: a planted leak); returns its image ids."""
    batch = Path(landing) / batch_id
    names = [f"{video}-{k:07d}" for k in range(1, len(images) + 1)]
    for name, image in zip(names, images):
        path = batch / "images" / "track" / split / video / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image)
    car = {"id": "1", "category": "car", "attributes": {"occluded": False, "truncated": False, "crowd": False},
           "box2d": {"x1": 10.0, "y1": 10.0, "x2": 60.0, "y2": 40.0}}
    labels = [{"name": f"{name}.jpg", "videoName": video, "frameIndex": k, "labels": [car]}
              for k, name in enumerate(names)]
    label_file = batch / "labels" / "box_track_20" / split / f"{video}.json"
    label_file.parent.mkdir(parents=True, exist_ok=True)
    label_file.write_text(json.dumps(labels))
    (batch / READY_MARKER).write_text("")
    return names


def append_rows(table, rows: list[dict]) -> None:
    table.add(pa.Table.from_pylist(rows, schema=storage.FRAMES_SCHEMA))


def near_duplicate_rows(table, sources: list[tuple[str, float, int]], batch_id: str) -> list[dict]:
    """Near-duplicate copies [(image_id, scale, jpeg quality)] appended after every existing frame."""
    frames = table.to_lance().to_table(columns=[f.name for f in storage.FRAMES_SCHEMA]).to_pylist()
    by_id = {f["image_id"]: f for f in frames}
    seq = max(f["ingest_seq"] for f in frames) + 1
    rows = []
    for n, (image_id, scale, quality) in enumerate(sources):
        row = dict(by_id[image_id])
        row["image_bytes"], row["width"], row["height"] = _variant(row["image_bytes"], scale, quality)
        row["ann_bboxes"] = [[v * scale for v in box] for box in row["ann_bboxes"]]
        copy_id = f"copy-{batch_id}-{n}-{image_id}"
        # Landed as a detection image of its own: the clip of its stem, as ingestion gives it.
        row.update(image_id=copy_id, clip_id=copy_id, batch_id=batch_id, ingest_seq=seq + n)
        rows.append(row)
    return rows


@dataclass
class CuratedDB:
    root: Path
    first_ids: list[str]  # batch b1's image ids in ingestion order
    run1: dict[str, curation.ColumnStats]


@pytest.fixture(scope="session")
def curated_db(tmp_path_factory, local_ray) -> CuratedDB:
    """Batch b1 with two near-duplicate copies of its first frame, every curation column
    backfilled: built once per session (each Geneva job costs seconds). Tests that write take a
    copy (`copy_curated_db`); it holds no view, since a view records its source table's path."""
    root = tmp_path_factory.mktemp("curated")
    synthetic.write_batch(root / "landing", "b1", 14, seed=11, **CURATED_SIZE)
    conn = storage.connect(str(root / "lancedb"))
    ingest.ingest_batches(conn, root / "landing")
    table = conn.open_table(storage.FRAMES_TABLE)
    first_ids = table.to_lance().to_table(columns=["image_id", "ingest_seq"]).sort_by("ingest_seq")["image_id"].to_pylist()
    # A group inside the first batch: frame 0 and two copies.
    append_rows(table, near_duplicate_rows(table, [(first_ids[0], 0.95, 75), (first_ids[0], 1.05, 60)], "b1dups"))
    run1 = curation.backfill_columns(table, config=curation.CurationConfig(
        person_area_source=curation.SOURCE_ANNOTATIONS, concurrency=1))
    return CuratedDB(root, first_ids, run1)


def copy_curated_db(curated_db: CuratedDB, root: Path):
    """A private copy of the curated database (with its landing zone) under `root`; returns (conn, landing)."""
    shutil.copytree(curated_db.root, root, dirs_exist_ok=True)
    return storage.connect(str(Path(root) / "lancedb")), Path(root) / "landing"


RIDER = get_mode("rider")
TINY_TRAINING = {"profile": "cpu", "weights": "none", "epochs": 1, "max_steps_per_epoch": 2,
                 "batch_size": 2, "min_size": 96, "max_size": 160}
# The fine-tune runs at a larger input than the base, as distant_person does by default.
TINY_FINETUNE = {**TINY_TRAINING, "min_size": 128, "max_size": 228}
# Rider has no tiling of its own: the report tiles its 320x180 frames, in two overlapping tiles
# (each pass costs about as much as a whole frame's).
TINY_TILING = {"tile_size": 180, "tile_overlap": 0.25, "tile_whole_frame": False}


@dataclass
class TrainedRider:
    root: Path  # its data location
    instance: dg.DagsterInstance
    result: dg.ExecuteInJobResult
    val_version: int

    def metadata(self, asset: str) -> dict:
        [event] = self.result.asset_materializations_for_node(asset)
        return {k: v.value for k, v in event.metadata.items()}


@pytest.fixture(scope="session")
def trained_rider(tmp_path_factory):
    """base_detector, rider_checkpoint, rider_eval_report and the summary materialized once, in one
    run on a tiny table, and shared by the training- and evaluation-asset tests.

    The rider views are stand-ins: plain Lance tables holding each split's frames as a view does,
    without image bytes and with the frames' stable row ids as `__source_row_id` (readers take
    pixels by them); the real Geneva views run in the end-to-end loop test.
    """
    root = tmp_path_factory.mktemp("trained-rider")
    assets = [*training_assets.build_training_defs([RIDER]).assets, *evaluation_assets.build_evaluation_defs([RIDER]).assets]
    run_config = {"ops": {"base_detector": {"config": TINY_TRAINING}, "rider_checkpoint": {"config": TINY_FINETUNE},
                          "rider_eval_report": {"config": {"batch_size": 4, "panel_count": 2, **TINY_TILING}}}}
    workspace = Workspace(data_location=str(root))
    with dg.instance_for_test() as instance:
        synthetic.write_batch(workspace.landing_dir, "b1", 16, seed=0, width=320, height=180, val_fraction=0.5)
        conn = storage.connect(workspace.lancedb_uri)
        ingest.ingest_batches(conn, workspace.landing_dir)
        frames = conn.open_table(storage.FRAMES_TABLE).to_lance().to_table(with_row_id=True)
        frames = frames.drop_columns(["image_bytes"])
        frames = frames.rename_columns([pixels.SOURCE_ROW_ID if n == "_rowid" else n for n in frames.column_names])
        for split in ("train", "val"):
            conn.create_table(slices.view_name(RIDER, split), frames.filter(pc.equal(frames["split"], split)),
                              storage_options=storage.STABLE_ROW_IDS)
        result = dg.materialize(assets, instance=instance, run_config=run_config,
                                resources={"workspace": WorkspaceResource(data_location=str(root))})
        yield TrainedRider(root, instance, result, conn.open_table(slices.view_name(RIDER, "val")).version)


def source_ids(conn, sql: str, version: int | None = None) -> list[str]:
    """Image ids of the frames table matching `sql` (at `version` when given), sorted."""
    table = conn.open_table(storage.FRAMES_TABLE)
    if version is not None:
        table.checkout(version)
    return sorted(table.to_lance().to_table(columns=["image_id"], filter=sql)["image_id"].to_pylist())


def view_ids(view) -> list[str]:
    return sorted(view.to_lance().to_table(columns=["image_id"])["image_id"].to_pylist())
