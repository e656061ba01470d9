"""The failure-mode registry: the one place that names the long-tail modes the platform targets.

Each FailureMode is a name, a SQL filter over the frames table (raw fields plus curation
columns), and the det_20 classes its evaluation scores. Adding an entry to FAILURE_MODES
adds its train/val slice views, and every stage that iterates this registry (checkpoints,
reports) grows with it; no other file changes.

A filter is checked when its FailureMode is built, so a typo fails when the definitions load,
not halfway through a run: it must parse, return a boolean, and name only known columns
(with types, so `person_bbox_area_pct < 'x'` is caught too). Filters come only from here.

distant_person threshold: on the synthetic data (800 frames, 416 with a pedestrian; the
largest annotated pedestrian box as % of the frame), the share of person frames kept is
  < 0.1 %: 14.7 %   < 0.2 .. 0.5 %: 20.4 %   < 1 %: 24.0 %   < 2 %: 36.3 %
  < 5 %: 70.9 %     < 10 %: 100 %            < 30 % (the reference's value): 100 %
so 30 keeps every person frame. The default, 0.5 % of a 1280x720 frame (≈ 40x115 px), keeps
the fifth of person frames whose nearest pedestrian is far away (the gap in the distribution
lies between 0.2 % and 1 %). Set AVP_DISTANT_PERSON_MAX_AREA_PCT to change it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache

import pyarrow as pa

from avperception_assets.discovery import embeddings
from avperception_assets.formats.taxonomy import CLASSES
from avperception_assets.storage.tables import FRAMES_SCHEMA

DISTANT_PERSON_ENV = "AVP_DISTANT_PERSON_MAX_AREA_PCT"
DEFAULT_DISTANT_PERSON_MAX_AREA_PCT = 0.5
# Distant pedestrians of the synthetic val slice are 8-23 x 21-60 px (10th-90th percentile, median
# 13x34) in 1280x720 frames: 448 px input keeps the median at 8x21 px, within reach of the CPU
# profile's 16 px anchors; its default 192 px would leave 4x9 px.
DISTANT_PERSON_MIN_INPUT_SIZE = 448
# ... and are evaluated on full-resolution tiles of that size too: 20 % overlap (90 px) exceeds
# their 90th-percentile height (60 px), so each is whole in some tile. The fine-tune trains on
# crops of that size (pedestrians at the scale tiles show them), and a crop is a fifth of a
# 1280x720 frame, so it runs 4x the profile's 5 epochs. On the demo data (35 train frames) 5
# epochs found no distant pedestrian; 20 epochs of crops or of whole frames both did, alike on
# pedestrians (README); crops train in about 2/3 of the time.
DISTANT_PERSON_TILE_SIZE = 448
DISTANT_PERSON_FINETUNE_EPOCHS = 20

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
FILTER_SCHEMA = pa.schema(list(FRAMES_SCHEMA) + list(CURATION_FIELDS))
CURATION_COLUMNS = tuple(f.name for f in CURATION_FIELDS)

DISTANCE_SUFFIX = "_distance"  # column of a mode defined by example: `<name>_distance`
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,47}$")  # becomes part of table and asset names


class FailureModeError(ValueError):
    """A registry entry that cannot be used (the message names the mode)."""


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


def validate_filter(mode_name: str, sql: str, schema: pa.Schema = FILTER_SCHEMA) -> None:
    """Raise FailureModeError naming the mode when `sql` is not a valid boolean filter."""
    if not isinstance(sql, str) or not sql.strip():
        raise FailureModeError(f"failure mode {mode_name!r}: filter must be a non-empty SQL string")
    # The parser reads only the first statement; anything after ';' or a comment would hide.
    error = "one expression only (no ';' or SQL comments)" if any(t in sql for t in (";", "--", "/*")) \
        else _filter_error(sql, None if schema is FILTER_SCHEMA else schema)
    if error is not None:
        raise FailureModeError(
            f"failure mode {mode_name!r}: invalid filter {sql!r}: {error}. Filters may use the frames "
            f"columns and the curation columns {', '.join(CURATION_COLUMNS)}.")


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
                f"failure mode name {self.name!r} must be lower-case letters, digits and '_' "
                "(it becomes a table and asset name)")
        schema = FILTER_SCHEMA
        where = self.filter
        if self.by_example:
            self._check_example()
            schema = FILTER_SCHEMA.append(pa.field(self.distance_column, pa.float32()))
            clause = f"{self.distance_column} <= {float(self.max_distance)!r}"
            where = f"{clause} AND ({self.filter})" if self.filter.strip() else clause
        validate_filter(self.name, where, schema)
        object.__setattr__(self, "where", where)
        classes = tuple(self.classes)
        unknown = [c for c in classes if c not in CLASSES]
        if not classes or unknown:
            raise FailureModeError(
                f"failure mode {self.name!r}: classes must be det_20 names from {CLASSES}, got {classes}")
        object.__setattr__(self, "classes", classes)
        if self.min_input_size is not None and not (isinstance(self.min_input_size, int) and self.min_input_size > 0):
            raise FailureModeError(f"failure mode {self.name!r}: min_input_size must be a positive number of "
                                   f"pixels, got {self.min_input_size!r}")
        if self.finetune_epochs is not None and not (isinstance(self.finetune_epochs, int) and self.finetune_epochs > 0):
            raise FailureModeError(f"failure mode {self.name!r}: finetune_epochs must be a positive number, "
                                   f"got {self.finetune_epochs!r}")
        if self.tiling is not None and not isinstance(self.tiling, Tiling):
            raise FailureModeError(f"failure mode {self.name!r}: tiling must be a Tiling or None, got {self.tiling!r}")
        object.__setattr__(self, "columns", filter_columns(where, schema))

    def _check_example(self) -> None:
        object.__setattr__(self, "exemplars", tuple(self.exemplars))
        if bool(self.exemplars) == (self.text_query is not None):
            raise FailureModeError(f"failure mode {self.name!r}: give exemplars or a text_query, not both")
        if not all(isinstance(e, str) and e for e in self.exemplars):
            raise FailureModeError(f"failure mode {self.name!r}: exemplars must be image ids, got {self.exemplars}")
        if isinstance(self.max_distance, bool) or not isinstance(self.max_distance, (int, float)) \
                or not 0 < self.max_distance <= 2:
            raise FailureModeError(f"failure mode {self.name!r}: max_distance must be a cosine distance in "
                                   f"(0, 2], got {self.max_distance!r}")
        if self.text_query is not None:
            _require_text_tower(self.name)

    @property
    def train_crop(self) -> int | None:
        """Crop size (px) its fine-tune trains on (`Tiling.train_on_tiles`); None: whole frames."""
        return self.tiling.tile_size if self.tiling is not None and self.tiling.train_on_tiles else None

    @property
    def curation_columns(self) -> tuple[str, ...]:
        return tuple(c for c in self.columns if c in CURATION_COLUMNS or c == self.distance_column)


def _require_text_tower(mode_name: str) -> None:
    """A mode defined by a text query needs the configured embedding model to have a text tower."""
    try:
        model = embeddings.resolve()
    except embeddings.EmbeddingError as exc:
        raise FailureModeError(f"failure mode {mode_name!r} is defined by a text query: {exc}") from exc
    if not model.has_text_tower:
        raise FailureModeError(
            f"failure mode {mode_name!r} is defined by a text query, which needs CLIP; the configured embedding "
            f"model is {model.label}. Set {embeddings.MODEL_ENV}=clip:<architecture>:<weights>, or give exemplars.")


def distant_person_max_area_pct() -> float:
    raw = os.environ.get(DISTANT_PERSON_ENV)
    if raw is None:
        return DEFAULT_DISTANT_PERSON_MAX_AREA_PCT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 100.0:
        raise FailureModeError(f"{DISTANT_PERSON_ENV}={raw!r}: expected a percentage in (0, 100]")
    return value


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


def default_failure_modes() -> tuple[FailureMode, ...]:
    return check_registry([
        FailureMode(
            "rider",
            "has_rider = true",
            ("rider", "bicycle", "motorcycle"),
            "Cyclists and motorcyclists: a person on a two-wheeler.",
        ),
        FailureMode(
            "nighttime_person",
            "timeofday = 'night' AND has_person = true",
            ("pedestrian",),
            "Pedestrians in night frames.",
        ),
        FailureMode(
            "distant_person",
            f"has_person = true AND person_bbox_area_pct < {distant_person_max_area_pct()!r}",
            ("pedestrian",),
            "Frames whose largest pedestrian is small, i.e. far away.",
            min_input_size=DISTANT_PERSON_MIN_INPUT_SIZE,
            tiling=Tiling(DISTANT_PERSON_TILE_SIZE, train_on_tiles=True),
            finetune_epochs=DISTANT_PERSON_FINETUNE_EPOCHS,
        ),
    ])


FAILURE_MODES: tuple[FailureMode, ...] = default_failure_modes()


def get_mode(name: str, modes=None) -> FailureMode:
    """The registry entry called `name` (from `modes`, default FAILURE_MODES)."""
    for mode in FAILURE_MODES if modes is None else modes:
        if mode.name == name:
            return mode
    known = [m.name for m in (FAILURE_MODES if modes is None else modes)]
    raise FailureModeError(f"unknown failure mode {name!r}; registered: {known}")
