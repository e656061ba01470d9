"""Where all state lives, and every setting of a deployment: the one module that reads `AVP_*`
environment variables (`Workspace.from_env`; the table `VARIABLES` says what each one means).

A data location holds everything, in this layout (a data folder made before this module keeps
working as it is):

    <data>/landing/<batch>/        new footage lands here (READY batches are ingested)
    <data>/lancedb/                the frames table, its views and the result tables
    <data>/checkpoints/<model>/    `base` (base_detector), `base_long` (`make base`'s long base,
                                   which base_detector reuses) and one folder per failure mode
    <data>/reports/<mode>/         evaluation reports; reports/base/ (base_detector_report),
                                   reports/summary.md, reports/search/
    <data>/exports/                COCO and YOLO exports of slice views
    <data>/config/                 the user's own configuration files (failure_modes.toml)
    <data>/dagster_home/           Dagster's instance storage, where `make` points DAGSTER_HOME

The data location is a local folder by default, or an object-store URI (`s3://bucket/prefix`):
then the tables (`lancedb_uri`), the landing zone (`landing`) and what `location` names live
there, reached with `storage_options` or the standard AWS variables; `Workspace.path` refuses to
treat a URI as a folder. Checkpoints, reports and exports are written by libraries that write
local files (torch, matplotlib, onnx, the exporters): on an object store the `checkpoints_dir`,
`reports_dir` and `exports_dir` folders are a local working copy in the cache
(`<cache_dir>/<bucket>/<prefix>/...`), which `storage.artifacts` pulls from and pushes to the
bucket, the source of truth (`location_of` and `working_copy` map between the two).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_DATA_LOCATION = "data"
DEFAULT_CACHE_DIR = "~/.cache/avperception"
SENSOR_STATUSES = ("running", "stopped")
RAY_FALLBACKS = ("fail", "local")  # what a run does when the Ray head at `ray_address` does not answer
BASE_CHECKPOINTS = "base"  # base_detector's folder under checkpoints/
BASE_LONG_CHECKPOINTS = "base_long"  # the long base `make base` trains, under checkpoints/
BASE_REPORTS = "base"  # base_detector_report's folder under reports/ (and its `base_eval_frames` table)


class WorkspaceError(ValueError):
    """A setting that cannot be used as given (the message names the variable and what it expects)."""


def _is_uri(location: str) -> bool:
    return "://" in location


@dataclass(frozen=True)
class Workspace:
    """A deployment's settings and the layout of its data location (see the module docstring).

    `lancedb_uri` None means `<data_location>/lancedb`; after construction it always holds the
    URI. A local `data_location` is made absolute (relative to the working directory).
    """

    data_location: str = DEFAULT_DATA_LOCATION
    lancedb_uri: str | None = None
    storage_options: Mapping[str, str] = field(default_factory=dict)  # LanceDB's, for object stores
    ray_address: str | None = None  # a Ray head's GCS address (`host:port`); None: a local Ray per run
    ray_fallback: str = "fail"  # a run whose head does not answer: fails, or starts a local Ray
    ray_dashboard: bool = False  # the local Ray's dashboard UI
    embedding_model: str = "color_layout"  # `discovery.embeddings.resolve` spec
    dead_run_check: bool = True
    retrain_min_new_rows: int = 100
    retrain_min_growth: float = 0.25
    sensors_default_status: str = "running"
    cache_dir: str = DEFAULT_CACHE_DIR  # working copies of an object store's artifacts

    def __post_init__(self):
        if not _is_uri(self.data_location):
            object.__setattr__(self, "data_location", str(Path(self.data_location).expanduser().absolute()))
        object.__setattr__(self, "cache_dir", str(Path(self.cache_dir).expanduser().absolute()))
        if self.lancedb_uri is None:
            object.__setattr__(self, "lancedb_uri", self._under("lancedb"))
        if self.ray_address is not None:
            _ray_address(variable_for("ray_address"), self.ray_address)
        if self.ray_fallback not in RAY_FALLBACKS:
            raise WorkspaceError(f"ray_fallback must be one of {RAY_FALLBACKS}, not {self.ray_fallback!r}")
        if self.sensors_default_status not in SENSOR_STATUSES:
            raise WorkspaceError(f"sensors_default_status must be one of {SENSOR_STATUSES}, "
                                 f"not {self.sensors_default_status!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Workspace:
        """The workspace the `AVP_*` variables of `environ` describe; unset or empty ones keep their default."""
        return cls(**env_settings(environ))

    def _under(self, name: str) -> str:
        if _is_uri(self.data_location):
            return f"{self.data_location.rstrip('/')}/{name}"
        return str(Path(self.data_location) / name)

    @property
    def path(self) -> Path:
        """The data location as a local folder."""
        if _is_uri(self.data_location):
            raise WorkspaceError(f"the data location {self.data_location} is not a local folder")
        return Path(self.data_location)

    @property
    def is_object_store(self) -> bool:
        return _is_uri(self.data_location)

    def location(self, name: str) -> str:
        """`<data>/<name>` as a folder path or, for an object store, a URI: what code that reads
        and writes through `storage.locations` (either kind) takes."""
        return self._under(name)

    @property
    def landing(self) -> str:
        """The landing zone, a folder or an object-store prefix (`storage.locations`)."""
        return self._under("landing")

    @property
    def landing_dir(self) -> Path:
        return self.path / "landing"

    @property
    def working_root(self) -> Path:
        """Where checkpoints, reports and exports are written: the data folder itself, or for an
        object store its working copy in the cache, `<cache_dir>/<bucket>/<prefix>`."""
        if not self.is_object_store:
            return self.path
        return Path(self.cache_dir) / self.data_location.partition("://")[2].strip("/")

    def location_of(self, path: str | Path) -> str:
        """Where a file or folder of the working copy lives in the data location: its URI on an
        object store (what asset metadata shows), the path itself for a local folder."""
        if not self.is_object_store:
            return str(path)
        try:
            relative = Path(path).relative_to(self.working_root)
        except ValueError:
            raise WorkspaceError(f"{path} is not in the working copy {self.working_root} of {self.data_location}") from None
        return self._under(relative.as_posix()) if relative.parts else self.data_location.rstrip("/")

    def working_copy(self, location: str | Path) -> Path:
        """The local path of a file or folder of the data location (`location_of`'s inverse);
        a local path stays as it is."""
        if not _is_uri(str(location)):
            return Path(location)
        root = self.data_location.rstrip("/")
        if str(location).rstrip("/") == root:
            return self.working_root
        if not str(location).startswith(root + "/"):
            raise WorkspaceError(f"{location} is not under the data location {self.data_location}")
        return self.working_root / str(location)[len(root) + 1:]

    @property
    def checkpoints_dir(self) -> Path:
        return self.working_root / "checkpoints"

    def checkpoints_dir_for(self, model: str) -> Path:
        """One model's checkpoints, a folder per train-view version: `base` or a failure mode's name."""
        return self.checkpoints_dir / model

    @property
    def reports_dir(self) -> Path:
        return self.working_root / "reports"

    def reports_dir_for(self, mode: str) -> Path:
        """One failure mode's evaluation reports, a folder per val-view version."""
        return self.reports_dir / mode

    @property
    def exports_dir(self) -> Path:
        return self.working_root / "exports"

    @property
    def config_dir(self) -> Path:
        """Where users put configuration files of their own (`failure_modes.toml`)."""
        return self.path / "config"

    @property
    def dagster_home(self) -> Path:
        return self.path / "dagster_home"


# --- the environment ---------------------------------------------------------------------------


def _text(name: str, raw: str) -> str:
    return raw


def _flag(name: str, raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise WorkspaceError(f"{name}={raw!r}: expected on or off (1/0, true/false, yes/no)")


def _count(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise WorkspaceError(f"{name}={raw!r}: expected a whole number, 0 or more")
    return value


def _fraction(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise WorkspaceError(f"{name}={raw!r}: expected a number, 0 or more (0.25 is 25 %)")
    return value


def _ray_address(name: str, raw: str) -> str:
    """A Ray head's GCS address, which runs attach to as drivers. Not Ray Client's `ray://`: a
    Ray Client session runs no worker set-up hook (the Geneva patches) and relays every object
    through one proxy."""
    host, _, port = raw.rpartition(":")
    if "://" in raw or not host or not port.isdigit():
        raise WorkspaceError(f"{name}={raw!r}: expected a Ray head's GCS address host:port, as `ray start --head "
                             "--port` opens it (`make ray`: 127.0.0.1:6379); runs attach to it as drivers, "
                             "not through Ray Client (ray://)")
    return raw


def _ray_fallback(name: str, raw: str) -> str:
    if raw not in RAY_FALLBACKS:
        raise WorkspaceError(f"{name}={raw!r}: expected {' or '.join(RAY_FALLBACKS)}")
    return raw


def _sensor_status(name: str, raw: str) -> str:
    if raw not in SENSOR_STATUSES:
        raise WorkspaceError(f"{name}={raw!r}: expected {' or '.join(SENSOR_STATUSES)}")
    return raw


@dataclass(frozen=True)
class Variable:
    """One environment variable: the `Workspace` field it sets, its default and meaning as the
    README's configuration table shows them, and how its text is read."""

    name: str
    field: str
    default: str
    meaning: str
    parse: Callable[[str, str], Any]


VARIABLES = (
    Variable("AVP_DATA_DIR", "data_location", "`data` (in the working directory)",
             "Root of all state: landing zone, LanceDB, checkpoints, reports, exports, config; may be "
             "`s3://bucket/prefix` (see Scaling out).", _text),
    Variable("AVP_LANCEDB_URI", "lancedb_uri", "`<data>/lancedb`",
             "LanceDB location; may be an object store (`s3://`, `gs://`, `az://`).", _text),
    Variable("AVP_RAY_ADDRESS", "ray_address", "none: a local Ray per run",
             "GCS address (`host:port`) of the Ray head that runs attach to as drivers for backfills and view "
             "refreshes: `make ray` starts one at `127.0.0.1:6379`.", _ray_address),
    Variable("AVP_RAY_FALLBACK", "ray_fallback", "`fail`",
             "When no head answers at `AVP_RAY_ADDRESS`: `fail` (the run fails naming the address and `make ray`) "
             "or `local` (the run starts a local Ray of its own, with a warning).", _ray_fallback),
    Variable("AVP_RAY_DASHBOARD", "ray_dashboard", "`off`",
             "`on`: the local Ray starts its dashboard UI (about 2.5 s more per start).", _flag),
    Variable("AVP_EMBEDDING_MODEL", "embedding_model", "`color_layout`",
             "Model of the `embedding` column and of search: `color_layout`, `clip:<model folder>`, "
             "`clip:<architecture>:<weights>` or `detector:<state_dict>[:<profile>]`.", _text),
    Variable("AVP_DEAD_RUN_CHECK", "dead_run_check", "`on`",
             "Mark runs whose worker process died as failed and free their pool slots; `off` where runs "
             "execute on other machines (Kubernetes, ECS, Docker run launchers).", _flag),
    Variable("AVP_RETRAIN_MIN_NEW_ROWS", "retrain_min_new_rows", "`100`",
             "A failure mode retrains when its train view grew by this many rows since its checkpoint (0: off).",
             _count),
    Variable("AVP_RETRAIN_MIN_GROWTH", "retrain_min_growth", "`0.25`",
             "A failure mode also retrains when its train view grew by this fraction of the rows its checkpoint "
             "saw (0: off).", _fraction),
    Variable("AVP_SENSORS_DEFAULT_STATUS", "sensors_default_status", "`running`",
             "`stopped`: the sensors start stopped (the UI without the loop); the UI can start them.",
             _sensor_status),
    Variable("AVP_CACHE_DIR", "cache_dir", f"`{DEFAULT_CACHE_DIR}`",
             "With an object-store data location: the local working copies of its checkpoints, reports and "
             "exports (`<cache>/<bucket>/<prefix>/`), a cache the bucket is the source of truth of; unused for a "
             "local data folder.", _text),
)


def env_settings(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """{Workspace field: value} for each variable set (and not empty) in `environ`."""
    settings = {}
    for variable in VARIABLES:
        raw = environ.get(variable.name, "").strip()
        if raw:
            settings[variable.field] = variable.parse(variable.name, raw)
    return settings


def variable_for(field_name: str) -> str:
    """The environment variable that sets a Workspace field (for messages and help texts)."""
    return next(v.name for v in VARIABLES if v.field == field_name)


def variables_markdown() -> str:
    """The configuration table (variable, default, meaning) as markdown."""
    rows = [f"| `{v.name}` | {v.default} | {v.meaning} |" for v in VARIABLES]
    return "\n".join(["| variable | default | meaning |", "|---|---|---|", *rows])
