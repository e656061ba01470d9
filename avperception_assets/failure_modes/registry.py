"""The failure-mode registry: the long-tail modes the platform targets, read from TOML.

Each FailureMode is a name, a SQL filter over the frames table (raw fields plus curation
columns), the det_20 classes its evaluation scores, and its training and evaluation settings.
The defaults ship in `default.toml` beside this module; `load_registry(config_dir)` merges a
user's `<config_dir>/failure_modes.toml` over them (a mode of the same name replaces the default
one entirely; new names are added after the defaults). Every registered mode gets its train/val
slice views, checkpoint and report; no Python changes.

Everything is checked when the registry loads, so a typo fails when the definitions load, not
halfway through a run: the file's syntax (path and line), each mode's fields (unknown, missing,
wrong type), its name and classes, and its filter, which must parse, return a boolean, and name
only known columns (with types, so `person_bbox_area_pct < 'x'` is caught too). Errors name the
file, the mode and the field.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import pyarrow as pa

from avperception_assets.discovery import embeddings, track_coverage
from avperception_assets.formats.taxonomy import CLASSES, TRACK_CLASSES
from avperception_assets.storage.tables import FRAMES_SCHEMA

# Types of the curation columns (avperception_assets.curation writes them; names must match
# curation.COLUMNS, which a test asserts) so filters are type-checked against the real table.
CURATION_FIELDS = (
    pa.field("has_person", pa.bool_()),
    pa.field("has_rider", pa.bool_()),
    pa.field("num_persons", pa.int32()),
    pa.field("scene_description", pa.string()),
    pa.field("person_bbox_area_pct", pa.float32()),
    pa.field("dhash", pa.uint64()),
    pa.field("is_duplicate", pa.bool_()),
    pa.field("embedding", pa.list_(pa.float32())),  # fixed-size in the table; its size is the model's
    pa.field("uniqueness", pa.float32()),
)
# The base detector's track coverage (`discovery.track_coverage`): its own asset, not a curation column.
TRACK_COVERAGE_COLUMNS = track_coverage.COLUMNS
FILTER_SCHEMA = pa.schema(list(FRAMES_SCHEMA) + list(CURATION_FIELDS) + list(track_coverage.FIELDS))
CURATION_COLUMNS = tuple(f.name for f in CURATION_FIELDS)

DISTANCE_SUFFIX = "_distance"  # column of a mode defined by example: `<name>_distance`
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,47}$")  # becomes part of table and asset names
# The base detector's own folders under checkpoints/ and reports/ and its `base_eval_frames`
# table: a mode of that name would write over them.
RESERVED_NAMES = frozenset({"base", "base_long"})


class FailureModeError(ValueError):
    """A registry entry that cannot be used (the message names the mode and the field, and the
    file when it comes from one)."""


@lru_cache(maxsize=1)
def _empty_frames_dataset():
    """An empty in-memory Lance dataset with the full schema: the filter's compiler."""
    import lance

    return lance.write_dataset(FILTER_SCHEMA.empty_table(), "memory://failure-mode-filters")


def _filter_error(sql: str, schema: pa.Schema | None = None) -> str | None:
    """Lance's (DataFusion's) complaint about `sql` as a filter, or None when it is valid."""
    import lance

    dataset = _empty_frames_dataset() if schema is None else lance.write_dataset(
        schema.empty_table(), "memory://failure-mode-columns")
    try:
        dataset.scanner(filter=sql, columns=[]).to_table()
    except Exception as exc:  # lance raises ValueError/OSError with the parser's message
        return str(exc).split(", /")[0].rstrip(".")  # drop the Rust source location
    return None


def filter_columns(sql: str, schema: pa.Schema = FILTER_SCHEMA) -> tuple[str, ...]:
    """The columns `sql` reads (in schema order): those it cannot compile without."""
    columns = []
    for name in schema.names:
        if _filter_error(sql, schema.remove(schema.get_field_index(name))) is not None:
            columns.append(name)
    return tuple(columns)


def _field_error(mode_name: str, field_name: str, problem: str) -> FailureModeError:
    return FailureModeError(f"failure mode {mode_name!r}, field {field_name!r}: {problem}")


def validate_filter(mode_name: str, sql: str, schema: pa.Schema = FILTER_SCHEMA) -> None:
    """Raise FailureModeError naming the mode when `sql` is not a valid boolean filter."""
    if not isinstance(sql, str) or not sql.strip():
        raise _field_error(mode_name, "filter", "must be a non-empty SQL string")
    # The parser reads only the first statement; anything after ';' or a comment would hide.
    error = "one expression only (no ';' or SQL comments)" if any(t in sql for t in (";", "--", "/*")) \
        else _filter_error(sql, None if schema is FILTER_SCHEMA else schema)
    if error is not None:
        raise _field_error(mode_name, "filter", f"invalid filter {sql!r}: {error}. Filters may use the frames "
                                                f"columns, the curation columns {', '.join(CURATION_COLUMNS)} and the "
                                                f"base detector's track coverage {', '.join(TRACK_COVERAGE_COLUMNS)}.")


@dataclass(frozen=True)
class Tiling:
    """A mode's tiled evaluation (`tiling.TiledDetector`): square tiles of `tile_size` px at full
    resolution overlapping by `overlap` (a fraction of a tile), plus the whole frame at the
    model's input size when `whole_frame`. With `train_on_tiles` its fine-tune trains on crops
    of that size around objects (profile `train_crop`), seen unscaled when `tile_size` is the
    fine-tune's input size (the mode's `min_input_size`), as tiles are."""

    tile_size: int
    overlap: float = 0.2
    whole_frame: bool = True
    train_on_tiles: bool = False

    def __post_init__(self):
        if isinstance(self.tile_size, bool) or not isinstance(self.tile_size, int) or self.tile_size <= 0:
            raise ValueError(f"tile_size must be a positive number of pixels, got {self.tile_size!r}")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, (int, float)) or not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be a fraction of a tile in [0, 1), got {self.overlap!r}")


@dataclass(frozen=True)
class FailureMode:
    """One long-tail failure mode: its slice filter and the classes that matter for it.

    A mode may be defined by example instead of (or besides) a SQL filter: `exemplars` (image
    ids of frames that show it) or, with CLIP configured, a `text_query`, and `max_distance`,
    the cosine distance from the nearest exemplar within which a frame belongs. Curation then
    fills a column `<name>_distance` from each frame's embedding, and the slice filters on it,
    so its views refresh incrementally like any other.

    A mode may be defined by track behaviour: with `track_coverage_below`, it keeps the frames
    showing an object of its classes whose track the BASE detector (`base_detector`, the
    checkpoint its latest materialization records) finds in under that share of the track's
    frames, e.g. 0.5 for pedestrians found in under half of their frames. The coverage is
    computed on the frames of each footage batch's new clips (`track_coverage` asset) and over
    every clip by the `track_coverage_refresh` job after the base changed; frames that are not
    a position in a clip have none and never qualify.
    """

    name: str
    filter: str  # SQL over frames and curation columns; "" for a mode defined by example alone
    classes: tuple[str, ...]
    description: str = ""
    # Shorter image side (px) this mode's fine-tune and evaluation need at least: small
    # objects need pixels. Raises a profile's smaller input size; None keeps the profile's.
    min_input_size: int | None = None
    # Also evaluate on full-resolution tiles (the report shows both); None: whole frames only.
    tiling: Tiling | None = None
    finetune_epochs: int | None = None  # its fine-tune's epochs; None: the profile's
    exemplars: tuple[str, ...] = ()
    text_query: str | None = None
    max_distance: float | None = None
    track_coverage_below: float | None = None
    where: str = field(init=False)  # the slice's SQL: the filter and, by example, the distance (derived)
    columns: tuple[str, ...] = field(init=False)  # what `where` reads (derived)

    @property
    def by_example(self) -> bool:
        return bool(self.exemplars) or self.text_query is not None

    @property
    def distance_column(self) -> str | None:
        """The curation column of a mode defined by example (None for a SQL-only mode)."""
        return f"{self.name}{DISTANCE_SUFFIX}" if self.by_example else None

    def __post_init__(self):
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise FailureModeError(
                f"failure mode {self.name!r}: the name must be lower-case letters, digits and '_', at most 48, "
                "starting with a letter (it becomes a table and asset name)")
        if self.name in RESERVED_NAMES:
            raise FailureModeError(f"failure mode {self.name!r}: the name is the base detector's own "
                                   f"(reserved: {', '.join(sorted(RESERVED_NAMES))})")
        self._check_settings()
        schema, clauses = FILTER_SCHEMA, []
        if self.by_example:
            self._check_example()
            schema = FILTER_SCHEMA.append(pa.field(self.distance_column, pa.float32()))
            clauses.append(f"{self.distance_column} <= {float(self.max_distance)!r}")
        if self.track_coverage_below is not None:
            clauses.append(self._track_clause())
        if not clauses and not (isinstance(self.filter, str) and self.filter.strip()):
            validate_filter(self.name, self.filter, schema)  # names the missing filter
        # A filter alone stays as written: a view whose filter text changes is recreated.
        where = " AND ".join(clauses + [f"({self.filter})"]) if clauses and self.filter.strip() \
            else " AND ".join(clauses) or self.filter
        validate_filter(self.name, where, schema)
        object.__setattr__(self, "where", where)
        object.__setattr__(self, "columns", filter_columns(where, schema))

    def _check_settings(self) -> None:
        classes = tuple(self.classes)
        unknown = [c for c in classes if c not in CLASSES]
        if not classes or unknown:
            raise _field_error(self.name, "classes", f"must be det_20 names from {CLASSES}, got {list(classes)}"
                               + (f" (unknown: {unknown})" if unknown else ""))
        object.__setattr__(self, "classes", classes)
        for name in ("min_input_size", "finetune_epochs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise _field_error(self.name, name, f"must be a positive integer, got {value!r}")
        if self.tiling is not None and not isinstance(self.tiling, Tiling):
            raise _field_error(self.name, "tiling", f"must be a Tiling or None, got {self.tiling!r}")

    def _check_example(self) -> None:
        object.__setattr__(self, "exemplars", tuple(self.exemplars))
        if bool(self.exemplars) == (self.text_query is not None):
            raise _field_error(self.name, "exemplars", "give exemplars or a text_query, not both")
        if not all(isinstance(e, str) and e for e in self.exemplars):
            raise _field_error(self.name, "exemplars", f"must be image ids, got {list(self.exemplars)}")
        if isinstance(self.max_distance, bool) or not isinstance(self.max_distance, (int, float)) \
                or not 0 < self.max_distance <= 2:
            raise _field_error(self.name, "max_distance", f"must be a cosine distance in (0, 2], got {self.max_distance!r}")

    def _track_clause(self) -> str:
        """The frames showing a track of the mode's classes found in under `track_coverage_below`
        of its frames."""
        value = self.track_coverage_below
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise _field_error(self.name, "track_coverage_below",
                               f"must be a share of a track's frames in (0, 1], got {value!r}")
        untracked = [c for c in self.classes if c not in TRACK_CLASSES]
        if untracked:
            raise _field_error(self.name, "track_coverage_below",
                               f"needs classes that BDD100K MOT tracks ({', '.join(TRACK_CLASSES)}); "
                               f"{untracked} have no tracks")
        column = track_coverage.MIN_TRACK_COVERAGE
        return "(" + " OR ".join(f"{column}.{c} < {float(value)!r}" for c in self.classes) + ")"

    @property
    def track_columns(self) -> tuple[str, ...]:
        """The base detector's track-coverage columns its slice reads (what its views wait for)."""
        return tuple(c for c in self.columns if c in TRACK_COVERAGE_COLUMNS)

    @property
    def train_crop(self) -> int | None:
        """Crop size (px) its fine-tune trains on (`Tiling.train_on_tiles`); None: whole frames."""
        return self.tiling.tile_size if self.tiling is not None and self.tiling.train_on_tiles else None

    @property
    def curation_columns(self) -> tuple[str, ...]:
        return tuple(c for c in self.columns if c in CURATION_COLUMNS or c == self.distance_column)


def check_text_queries(modes, embedding_model: str) -> None:
    """Modes defined by a text query need an embedding model with a text tower (CLIP): checked
    against the workspace's model when the registry loads, not when a mode is built."""
    for mode in modes:
        if mode.text_query is None:
            continue
        try:
            model = embeddings.resolve(embedding_model)
        except embeddings.EmbeddingError as exc:
            raise _field_error(mode.name, "text_query", str(exc)) from exc
        if not model.has_text_tower:
            raise _field_error(
                mode.name, "text_query", f"a text query needs CLIP; the configured embedding model is {model.label}. "
                "Configure clip:<architecture>:<weights> as the embedding model, or give exemplars.")


def check_registry(modes) -> tuple[FailureMode, ...]:
    """The registry as a tuple; rejects anything but FailureModes and repeated names."""
    modes = tuple(modes)
    for mode in modes:
        if not isinstance(mode, FailureMode):
            raise FailureModeError(f"registry entries must be FailureMode, got {mode!r}")
    names = [m.name for m in modes]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise FailureModeError(f"failure mode names must be unique; repeated: {repeated}")
    return modes


# --- the registry file ------------------------------------------------------------------------

REGISTRY_FILE = "failure_modes.toml"  # a user's modes, in the data location's config folder
DEFAULTS_FILE = "default.toml"  # the shipped modes, package data beside this module


def _of(*types):
    """A TOML value's type check (TOML's booleans are not numbers)."""
    return lambda value: isinstance(value, types) and (bool in types or not isinstance(value, bool))


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# The fields of a mode's TOML table (FailureMode's, less the name, which is the table's key):
# field -> (type check, what its value must be).
MODE_FIELDS = {
    "filter": (_of(str), "a string of SQL"),
    "classes": (_strings, "a list of det_20 class names"),
    "description": (_of(str), "a string"),
    "min_input_size": (_of(int), "an integer (pixels)"),
    "finetune_epochs": (_of(int), "an integer"),
    "tiling": (_of(dict), "a table ([modes.<name>.tiling])"),
    "exemplars": (_strings, "a list of image ids"),
    "text_query": (_of(str), "a string"),
    "max_distance": (_of(int, float), "a number"),
    "track_coverage_below": (_of(int, float), "a number (a share of a track's frames)"),
}
TILING_FIELDS = {
    "tile_size": (_of(int), "an integer (pixels)"),
    "overlap": (_of(int, float), "a number (a fraction of a tile)"),
    "whole_frame": (_of(bool), "true or false"),
    "train_on_tiles": (_of(bool), "true or false"),
}


def _check_fields(mode: str, table: dict, fields: dict, required: tuple[str, ...], prefix: str = "") -> None:
    """Unknown, missing and mistyped fields of one TOML table, named `<prefix><field>`."""
    for key, value in table.items():
        if key not in fields:
            raise _field_error(mode, prefix + key, f"unknown field; known fields: {', '.join(fields)}")
        check, expected = fields[key]
        if not check(value):
            raise _field_error(mode, prefix + key, f"must be {expected}, got {value!r}")
    for key in required:
        if key not in table:
            raise _field_error(mode, prefix + key, "missing required field")


def _mode_from_toml(name: str, table: dict) -> FailureMode:
    """A FailureMode from its TOML table, every field checked."""
    by_example = "exemplars" in table or "text_query" in table
    required = ("classes", "max_distance") if by_example else \
        ("classes",) if "track_coverage_below" in table else ("filter", "classes")
    _check_fields(name, table, MODE_FIELDS, required)
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in table.items()}
    if "tiling" in values:
        _check_fields(name, values["tiling"], TILING_FIELDS, ("tile_size",), prefix="tiling.")
        try:
            values["tiling"] = Tiling(**values["tiling"])
        except ValueError as exc:
            raise _field_error(name, "tiling", str(exc)) from None
    return FailureMode(name, values.pop("filter", ""), values.pop("classes"), **values)


def _read_toml(source) -> dict:
    """The document at `source` (a Path or package resource); a syntax error names the file and line."""
    try:
        return tomllib.loads(source.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise FailureModeError(f"{source}: TOML syntax error: {exc}") from None


def _mode_tables(source) -> dict[str, dict]:
    """Mode name -> its table, from the `[modes.<name>]` tables of the file at `source`."""
    document = _read_toml(source)
    unknown = [key for key in document if key != "modes"]
    if unknown:
        raise FailureModeError(f"{source}: unknown top-level key {unknown[0]!r}; "
                               "failure modes are tables named [modes.<name>]")
    modes = document.get("modes", {})
    if not isinstance(modes, dict):
        raise FailureModeError(f"{source}: 'modes' must be tables named [modes.<name>], got {modes!r}")
    for name, table in modes.items():
        if not isinstance(table, dict):
            raise FailureModeError(f"{source}: failure mode {name!r} must be a table ([modes.{name}]), got {table!r}")
    return modes


def _build(source, name: str, table: dict) -> FailureMode:
    try:
        return _mode_from_toml(name, table)
    except FailureModeError as exc:
        raise FailureModeError(f"{source}: {exc}") from None


def load_registry(config_dir: Path | None, embedding_model: str = embeddings.COLOR_LAYOUT) -> tuple[FailureMode, ...]:
    """The shipped modes, with `<config_dir>/failure_modes.toml` (when there is one) merged over
    them: its modes replace the defaults of the same name, in their place, and add the others
    after them. Every mode is checked (see the module's docstring), text queries against
    `embedding_model`."""
    defaults = resources.files(__package__).joinpath(DEFAULTS_FILE)
    sources = {name: (defaults, table) for name, table in _mode_tables(defaults).items()}
    user_file = None if config_dir is None else Path(config_dir) / REGISTRY_FILE
    if user_file is not None and user_file.is_file():
        sources.update({name: (user_file, table) for name, table in _mode_tables(user_file).items()})
    modes = check_registry(_build(source, name, table) for name, (source, table) in sources.items())
    check_text_queries(modes, embedding_model)
    return modes


@lru_cache(maxsize=1)
def default_failure_modes() -> tuple[FailureMode, ...]:
    """The shipped modes alone (the package's file does not change while it runs)."""
    return load_registry(None)


def get_mode(name: str, modes=None) -> FailureMode:
    """The registry entry called `name` (from `modes`, default the shipped modes)."""
    modes = default_failure_modes() if modes is None else modes
    for mode in modes:
        if mode.name == name:
            return mode
    raise FailureModeError(f"unknown failure mode {name!r}; registered: {[m.name for m in modes]}")
