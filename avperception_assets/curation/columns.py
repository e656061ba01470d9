"""Curation columns on the frames table: which UDF defines each column, and its incremental backfill.

Each column is a Geneva UDF column added once with `add_columns` and filled with `backfill`
over the rows where it is still NULL, so the cost of a run grows with the new rows, not with
the table. The slices are SQL filters over these columns.

What a column computes per row lives in `curation_udfs` (what Ray workers run); the checks
on the columns in `curation_checks`.

- `has_person`, `has_rider`, `num_persons`, `scene_description` ("night, rainy, city street;
  2 pedestrians, 1 rider"): from the (already det_20-normalised) annotations and scene
  attributes. Crowd boxes (`ann_crowd`) are ignore regions, never objects: every column from
  the annotations skips them (recorded as `crowd_boxes: skipped` in the columns' parameters).
- `person_bbox_area_pct`: largest person box as a percentage of the frame area, from a
  torchvision detector (COCO weights from the torch hub cache, or a local state_dict) or,
  where no weights are available, from the annotations. The source is recorded in the
  column's field metadata; a run with another source refuses to extend the column unless
  the column is recomputed (`CurationConfig.recompute`).
- `dhash` (64-bit difference hash of the decoded image) and `is_duplicate`: a frame is a
  duplicate iff an earlier-ingested frame of another clip is within `dup_threshold` bits
  (Hamming; a frame without a clip is a clip of its own), so the earliest frame of each
  duplicate group stays unflagged and values of old rows never change when new rows arrive.
  Frames of one clip never flag each other: consecutive frames are alike by nature (in the
  synthetic clips their hashes differ by 0 bits at the median, 6 at most).
- `embedding`: a unit vector per frame from its pixels alone, by the configured model
  (`embeddings`; recorded in the column's metadata, changed only with a recompute), and
  `uniqueness`: cosine distance to the nearest earlier-ingested frame, so again old rows never
  change.

A Geneva job costs seconds whatever its row count, so columns computed from the same inputs
share one multi-output UDF (`UDF_GROUPS`): the annotation columns; `dhash` and `embedding` (one
read of the bytes); `is_duplicate` and `uniqueness`. A batch runs four jobs in two waves
(the area column and the annotation and pixel groups side by side, then the novelty group).
Each column keeps its own defining parameters; siblings are added, backfilled, recomputed and
dropped together, and a UDF error is recorded under the group's first column. The pixel and
novelty groups are record-batch UDFs: Geneva 0.17 unpacks `Columns[T]` from a per-row or a
record-batch UDF but not from an array one, and a record batch holds every column of its rows
(Geneva takes no column list for it), the image bytes included, so the novelty job reads about
110 MB for 500 1280x720 frames that it does not need. A per-row UDF would read only its inputs
but loses the batch: the duplicate flags vectorised over it, one table handle a batch.

A UDF error on one row does not abort a column: Geneva's `skip_on_error` isolates the row
(bisecting batches), writes NULL and records the error in the `geneva_errors` table;
`ColumnStats` and `curation_checks.check_coverage` report those rows by image id. An interrupted backfill
resumes from Geneva's per-batch checkpoints: a rerun with the same UDF version and filter
recomputes only the missing batches (checked by hand here: a job that failed after 37 of 40
rows recomputed 20 on rerun).

Backfills run on the Ray the caller opened (`cluster.ray.ray_context`; in Dagster runs the
`WorkspaceResource` owns it): nothing here starts Ray. Nothing here knows about Dagster.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from avperception_assets.discovery import embeddings
from avperception_assets.discovery.vector_index import vectors_matrix
from avperception_assets.cluster.ray import require_ray
from avperception_assets.patches import geneva as geneva_patches
from avperception_assets.storage import tables as storage
from avperception_assets.curation.udfs import ANNOTATION_COLUMNS_TYPE, CROWD_BOXES_RULE, UNIQUENESS_CAP, ExemplarDistance, NoveltyColumns, PersonAreaDetector, PixelColumns, annotation_columns, clip_keys, person_bbox_area_pct_annotations
from avperception_assets.failure_modes.registry import FailureMode
from avperception_assets.storage.quarantine import Rejection, record_quarantine

COLUMNS = ("has_person", "has_rider", "num_persons", "scene_description", "person_bbox_area_pct", "dhash",
           "is_duplicate", "embedding", "uniqueness")
# Columns a column's UDF reads (beyond raw frame fields): backfill order follows it, and
# recomputing a column recomputes those that read it.
COLUMN_DEPS = {"is_duplicate": ("dhash",), "uniqueness": ("embedding",)}
# Beside COLUMNS, each failure mode defined by example adds `<mode>_distance`, read from `embedding`.
# Columns one multi-output UDF fills in a single Geneva job (`geneva.Columns[T]`).
UDF_GROUPS = {"annotation_columns": ("has_person", "has_rider", "num_persons", "scene_description"),
              "pixel_columns": ("dhash", "embedding"),
              "novelty_columns": ("is_duplicate", "uniqueness")}
# Geneva's field metadata naming the group of an unpacked sibling column.
GENEVA_UNPACK_GROUP = b"virtual_column.unpack_group"

SOURCE_AUTO = "auto"
SOURCE_COCO = "coco"
SOURCE_ANNOTATIONS = "annotations"

# Field-metadata keys written on each curation column.
META_SOURCE = "avp.source"  # person_bbox_area_pct: which source produced the values

# Ray CPU reservations per applier actor: annotation columns are cheap, so several of their
# jobs share a core; image decoding gets more; the detector a whole core.
LIGHT_CPUS = 0.25
DECODE_CPUS = 0.5


class CurationError(ValueError):
    """A curation run that cannot proceed as configured (the message says what to change)."""


def curation_columns(modes) -> tuple[str, ...]:
    """The curation columns of a registry, in backfill order: COLUMNS, then the distance column
    of each mode defined by example."""
    return COLUMNS + tuple(m.distance_column for m in modes if m.by_example)


@dataclass(frozen=True)
class CurationConfig:
    """What defines the curation columns and how the backfill runs.

    person_area_source: 'auto' (COCO weights if in the torch hub cache, else annotations),
        'coco', 'annotations', or the path of a state_dict saved by this project.
    detector_profile: `detector.get_profile` name ('cpu' | 'gpu'); default by device.
    embedding_model: `embeddings.resolve` spec (in Dagster runs, the workspace's; default the
        offline `color_layout`).
    recompute: columns to drop and recompute from scratch (needed to change a column's
        definition, e.g. the detector source, once it holds values), with the columns that
        read them.
    modes: the failure-mode registry (`registry.load_registry`); its modes defined by example
        add distance columns, the others none (so the default, no mode, suits SQL-only registries).
    concurrency: Geneva applier actors of the jobs that decode pixels or run the detector
        (default: one per CPU of this machine); the light jobs get one (`ColumnPlan.light`).
    """

    person_area_source: str = SOURCE_AUTO
    detector_profile: str | None = None
    score_threshold: float = 0.5
    detector_batch_size: int = 8
    dup_threshold: int = 6
    embedding_model: str = embeddings.COLOR_LAYOUT
    embedding_batch_size: int = 16
    recompute: tuple[str, ...] = ()
    concurrency: int | None = None
    checkpoint_size: int = 64
    modes: tuple[FailureMode, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        """Every curation column of `modes`, in backfill order (`curation_columns`)."""
        return curation_columns(self.modes)

    @property
    def deps(self) -> dict[str, tuple[str, ...]]:
        return {**COLUMN_DEPS, **{m.distance_column: ("embedding",) for m in self.modes if m.by_example}}

    def __post_init__(self):
        unknown = set(self.recompute) - set(self.columns)
        if unknown:
            raise CurationError(f"recompute names unknown columns {sorted(unknown)}; expected some of {self.columns}")
        if not 0 <= self.dup_threshold <= 64:
            raise CurationError(f"dup_threshold must be 0..64 bits, got {self.dup_threshold}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise CurationError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        object.__setattr__(self, "recompute", self._with_readers(self.recompute))

    def _with_readers(self, columns) -> tuple[str, ...]:
        """`columns`, their UDF-group siblings, and every column that reads one of them (its
        values follow theirs)."""
        wanted = set(columns)
        while grown := ({c for c, deps in self.deps.items() if wanted & set(deps)}
                        | {s for c in wanted for s in UDF_GROUPS.get(job_of(c), ())}) - wanted:
            wanted |= grown
        return tuple(c for c in self.columns if c in wanted)


@dataclass
class ColumnStats:
    """What one column's backfill did in this run."""

    column: str
    rows_processed: int  # rows that were NULL before this run (the ones handed to the UDF)
    rows_total: int
    rows_filled: int  # non-NULL after the run
    error_rows: int  # NULL after the run with a recorded UDF error
    elapsed_s: float
    params: dict[str, Any]
    job_id: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)  # sample: image_id, error
    first_ingest_seq: int | None = None  # earliest row this run filled for the first time (None: none)

    @property
    def coverage(self) -> float:
        return self.rows_filled / self.rows_total if self.rows_total else 1.0

    @property
    def rows_per_s(self) -> float:
        return self.rows_processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_metadata(self) -> dict[str, Any]:
        meta = {
            "rows_processed": self.rows_processed,
            "rows_total": self.rows_total,
            "rows_filled": self.rows_filled,
            "coverage": round(self.coverage, 6),
            "error_rows": self.error_rows,
            "elapsed_s": round(self.elapsed_s, 3),
            "rows_per_s": round(self.rows_per_s, 2),
            "params": self.params,
        }
        if self.job_id:
            meta["geneva_job_id"] = self.job_id
        if self.first_ingest_seq is not None:
            meta["first_ingest_seq"] = self.first_ingest_seq
        if self.errors:
            meta["errors"] = self.errors
        return meta


@dataclass(frozen=True)
class PersonAreaSource:
    """Where person_bbox_area_pct comes from: `label` is what metadata records."""

    kind: str  # annotations | coco | checkpoint
    label: str
    weights: str | None = None  # detector.build_detector weights argument
    profile: str | None = None


def resolve_person_area_source(config: CurationConfig) -> PersonAreaSource:
    """Turn the configured source into a concrete one, without touching the network."""
    from avperception_assets.model import detector

    requested = config.person_area_source
    if requested == SOURCE_ANNOTATIONS:
        return PersonAreaSource(SOURCE_ANNOTATIONS, SOURCE_ANNOTATIONS)
    profile = detector.get_profile(config.detector_profile)
    if requested in (SOURCE_AUTO, SOURCE_COCO):
        cached = detector.coco_weights_path(profile.architecture).is_file()
        if cached:
            return PersonAreaSource(SOURCE_COCO, f"coco:{profile.architecture}", detector.WEIGHTS_COCO, profile.name)
        if requested == SOURCE_AUTO:
            return PersonAreaSource(SOURCE_ANNOTATIONS, SOURCE_ANNOTATIONS)
        detector.check_weights_source(detector.WEIGHTS_COCO, profile.architecture)  # raises, naming the file
    path = Path(requested).expanduser()
    if not path.is_file():
        raise CurationError(
            f"person_area_source {requested!r} is neither 'auto', 'coco', 'annotations' nor an existing "
            "state_dict file")
    return PersonAreaSource("checkpoint", f"checkpoint:{path.name}@{detector.weights_digest(path)}:{profile.architecture}",
                            str(path.resolve()), profile.name)


@dataclass
class ColumnPlan:
    """One Geneva job: the UDF that fills `columns` plus the parameters that define each one's
    values (stored on the column)."""

    name: str
    make_udf: Callable[[Any], Any]  # table -> geneva UDF (is_duplicate needs the table)
    params: dict[str, dict[str, Any]]  # by column, in the UDF's output order
    # Light per-row work (annotations, hashes, one search a batch): one applier actor. A second
    # costs a process start (about 2.5 s of CPU importing geneva here) and saves nothing: the
    # annotation job alone took 8.8 s with one applier, 11.5 s with two (500 new rows).
    light: bool = False

    def appliers(self, config: CurationConfig) -> int:
        return 1 if self.light else config.concurrency or os.cpu_count() or 1

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.params)

    def null_filter(self) -> str:
        """Rows this job fills: Geneva's default for a group is any sibling NULL."""
        return " OR ".join(f"{c} IS NULL" for c in self.columns)


def _field_metadata(params: dict[str, Any]) -> dict[str, str]:
    metadata = {storage.META_PARAMS: json.dumps(params, sort_keys=True)}
    if "source" in params:
        metadata[META_SOURCE] = params["source"]
    return metadata


def _udf(func, data_type: pa.DataType, params: dict[str, Any], name: str, **kwargs):
    """A single-column UDF; `params` define its values."""
    import geneva

    version = hashlib.sha1(json.dumps([name, params], sort_keys=True).encode()).hexdigest()[:12]
    kwargs.setdefault("num_cpus", LIGHT_CPUS)
    kwargs.setdefault("field_metadata", _field_metadata(params))
    return geneva.udf(func, data_type=data_type, version=kwargs.pop("version", version),
                      on_error=geneva.skip_on_error(), **kwargs)


def _group_udf(func, data_type: pa.StructType, params: dict[str, dict[str, Any]], name: str, **kwargs):
    """A multi-output UDF: each output column's defining parameters go on its own field."""
    fields = [data_type.field(i) for i in range(data_type.num_fields)]
    struct = pa.struct([f.with_metadata(_field_metadata(params[f.name])) for f in fields])
    return _udf(func, struct, params, name, field_metadata={}, **kwargs)


def _group_plan(name: str, make_udf: Callable[[Any], Any], params: dict[str, dict[str, Any]],
                light: bool = False) -> ColumnPlan:
    assert tuple(params) == UDF_GROUPS[name], (name, tuple(params))
    return ColumnPlan(name, make_udf, params, light)


def plan_columns(config: CurationConfig) -> dict[str, ColumnPlan]:
    """The job (UDF and defining parameters) of every curation column under `config`, by job name."""
    annotation_params = {c: {"crowd_boxes": CROWD_BOXES_RULE} for c in UDF_GROUPS["annotation_columns"]}
    plans = {"annotation_columns": _group_plan("annotation_columns", lambda t: _group_udf(
        annotation_columns, ANNOTATION_COLUMNS_TYPE, annotation_params, "annotation_columns"), annotation_params,
        light=True)}
    source = resolve_person_area_source(config)
    pct_params: dict[str, Any] = {"source": source.label}
    if source.kind == SOURCE_ANNOTATIONS:
        pct_params["crowd_boxes"] = CROWD_BOXES_RULE
        pct = lambda t: _udf(person_bbox_area_pct_annotations, pa.float32(), pct_params, "pct")  # noqa: E731
    else:
        pct_params["score_threshold"] = config.score_threshold
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
        detector_udf = PersonAreaDetector(source.weights, source.profile, config.score_threshold,
                                          config.detector_batch_size)
        pct = lambda t: _udf(detector_udf, pa.float32(), pct_params, "pct", num_gpus=gpus,  # noqa: E731
                             num_cpus=1.0)
    plans["person_bbox_area_pct"] = ColumnPlan("person_bbox_area_pct", pct, {"person_bbox_area_pct": pct_params},
                                               light=source.kind == SOURCE_ANNOTATIONS)
    plans.update(_embedding_plans(config))
    return plans


def _embedding_model(config: CurationConfig) -> embeddings.EmbeddingModel:
    try:
        return embeddings.resolve(config.embedding_model)
    except embeddings.EmbeddingError as exc:
        raise CurationError(str(exc)) from exc


def _embedding_plans(config: CurationConfig) -> dict[str, ColumnPlan]:
    """The pixel group (`dhash`, `embedding`), the novelty group (`is_duplicate`, `uniqueness`),
    and the distance column of each mode defined by example."""
    model = _embedding_model(config)
    pixel_params = {"dhash": {"hash": "dhash64"}, "embedding": {"model": model.label, "dim": model.dim}}
    pixel_type = pa.struct([("dhash", pa.uint64()), ("embedding", pa.list_(pa.float32(), model.dim))])
    pixels = PixelColumns(model, config.embedding_batch_size)
    novelty_params = {
        "is_duplicate": {"hamming_threshold": config.dup_threshold,
                         "rule": "earlier_ingest_of_another_clip_within_threshold"},
        "uniqueness": {"embedding_model": model.label, "rule": "cosine_distance_to_nearest_earlier_ingest",
                       "cap": UNIQUENESS_CAP}}
    return {
        "pixel_columns": _group_plan("pixel_columns", lambda t: _group_udf(
            pixels, pixel_type, pixel_params, "pixel_columns",
            num_cpus=1.0 if model.kind != embeddings.COLOR_LAYOUT else DECODE_CPUS), pixel_params),
        "novelty_columns": _group_plan("novelty_columns", lambda t: _novelty_udf(t, config, novelty_params),
                                       novelty_params, light=True),
        **{mode.distance_column: _distance_plan(mode, model) for mode in config.modes if mode.by_example},
    }


def _distance_plan(mode: FailureMode, model: embeddings.EmbeddingModel) -> ColumnPlan:
    example = {"exemplars": list(mode.exemplars)} if mode.exemplars else {"text_query": mode.text_query}
    params = {"embedding_model": model.label, **example}
    return ColumnPlan(mode.distance_column, lambda t: _udf(
        ExemplarDistance(exemplar_vectors(t, mode, model)), pa.float32(), params, mode.distance_column),
        {mode.distance_column: params}, light=True)


def exemplar_vectors(table, mode: FailureMode, model: embeddings.EmbeddingModel) -> np.ndarray:
    """The unit vectors a mode defined by example is measured from: its exemplars' stored
    embeddings, or its text query through CLIP's text tower."""
    if mode.text_query is not None:
        return embeddings.load(model).embed_text([mode.text_query])
    found = table.to_lance().to_table(
        columns=["image_id", "embedding"],
        filter=f"image_id IN ({storage.sql_list(mode.exemplars)}) AND embedding IS NOT NULL")
    missing = sorted(set(mode.exemplars) - set(found["image_id"].to_pylist()))
    if missing:
        raise CurationError(f"failure mode {mode.name!r}: exemplars {missing} are not in {storage.FRAMES_TABLE!r} "
                            "or have no embedding yet")
    return vectors_matrix(found["embedding"])


def _novelty_udf(table, config: CurationConfig, params: dict[str, dict[str, Any]]):
    hashes, seqs, clips = reference_hashes(table)
    # The version names the reference set, so checkpoints are reused only for the same one.
    digest = hashlib.sha1(hashes.tobytes() + seqs.tobytes() + clips.tobytes()).hexdigest()[:12]
    version = hashlib.sha1(json.dumps([params, digest], sort_keys=True).encode()).hexdigest()[:12]
    novelty = NoveltyColumns(hashes, seqs, clips, config.dup_threshold, table.uri.rsplit("/", 1)[0], table.name,
                             storage.storage_options_of(table))
    return _group_udf(novelty, pa.struct([("is_duplicate", pa.bool_()), ("uniqueness", pa.float32())]), params,
                      "novelty_columns", version=version)


def reference_hashes(table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dhash, ingest_seq, clip key: `clip_keys`) of every frame that has a dhash."""
    if "dhash" not in table.schema.names:
        raise CurationError("is_duplicate reads dhash, which does not exist yet: backfill dhash first")
    has_clips = storage.CLIP_ID in table.schema.names  # a table from before clips has none
    data = table.to_lance().to_table(columns=["dhash", "ingest_seq", *([storage.CLIP_ID] if has_clips else [])],
                                     filter="dhash IS NOT NULL")
    seqs = data["ingest_seq"].to_numpy().astype(np.int64)
    return (data["dhash"].to_numpy().astype(np.uint64), seqs,
            clip_keys(data[storage.CLIP_ID] if has_clips else None, seqs))




def job_of(column: str) -> str:
    """The job (a UDF group or the column itself) that fills `column`."""
    return next((group for group, members in UDF_GROUPS.items() if column in members), column)


def error_column(column: str) -> str:
    """The column Geneva records `column`'s UDF errors under: its group's first."""
    return UDF_GROUPS.get(job_of(column), (column,))[0]


def ordered(columns, all_columns: tuple[str, ...] = COLUMNS) -> list[str]:
    """Columns in backfill order (a column after the columns it reads), unknown ones rejected."""
    wanted = set(all_columns if columns is None else columns)
    unknown = wanted - set(all_columns)
    if unknown:
        raise CurationError(f"unknown curation columns {sorted(unknown)}; expected some of {all_columns}")
    return [c for c in all_columns if c in wanted]


def _is_whole_group(table, plan: ColumnPlan) -> bool:
    """Every sibling exists and all belong to one Geneva group (not, say, columns single-column
    UDFs added before the group existed)."""
    schema = table.schema
    if not all(c in schema.names for c in plan.columns):
        return False
    groups = {(schema.field(c).metadata or {}).get(GENEVA_UNPACK_GROUP) for c in plan.columns}
    return len(groups) == 1 and None not in groups


def _ensure_column(table, plan: ColumnPlan, recompute: bool) -> None:
    """Add the job's columns on first use; refuse to extend them under different parameters."""
    present = [c for c in plan.columns if c in table.schema.names]
    if present and (recompute or (len(plan.columns) > 1 and not _is_whole_group(table, plan))):
        table.drop_columns(present)  # a partial or legacy group is rebuilt whole
    recorded = {c: storage.column_params(table, c) for c in plan.columns}
    if all(params is None for params in recorded.values()):
        _add_column(table, plan)
        return
    changed = [c for c in plan.columns if recorded[c] != plan.params[c]]
    if changed and table.count_rows(f"NOT ({plan.null_filter()})"):
        column = changed[0]
        raise CurationError(
            f"column {column!r} holds values computed with {recorded[column]}, but this run is configured for "
            f"{plan.params[column]}; one column never mixes sources. Configure the recorded source again, or "
            f"recompute the column (recompute=['{column}']).")
    if changed:  # empty columns: just record the new definition
        table.drop_columns(list(plan.columns))
        _add_column(table, plan)


def _add_column(table, plan: ColumnPlan) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Could not validate type")
        udf = plan.make_udf(table)
        table.add_columns(udf if len(plan.columns) > 1 else {plan.name: udf})


def _errored_rows(table, column: str, job_id: str | None = None, columns: tuple[str, ...] = ("image_id",),
                  where: str | None = None) -> list[tuple[dict, str]]:
    """NULL rows of `column` (among those `where` selects) that have a recorded UDF error:
    (row's `columns`, error text)."""
    errors = table.get_errors(column_name=error_column(column), job_id=job_id)
    by_address = {e.row_address: e for e in errors if e.row_address is not None}
    if not by_address:
        return []
    nulls = table.to_lance().to_table(columns=list(columns), filter=storage.and_where(f"{column} IS NULL", where),
                                      with_row_address=True)
    hits = [(row, by_address.get(row["_rowaddr"])) for row in nulls.to_pylist()]
    return [(row, f"{error.error_type}: {error.error_message}") for row, error in hits if error is not None]


def error_rows(table, column: str, job_id: str | None = None, limit: int = 20,
               where: str | None = None) -> tuple[int, list[dict]]:
    """NULL rows of `column` (among those `where` selects) that have a recorded UDF error: (count, sample)."""
    hits = _errored_rows(table, column, job_id, where=where)
    sample = [{"image_id": row["image_id"], "error": error[:300]} for row, error in hits[:limit]]
    return len(hits), sample


def quarantine_undecodable(conn, table, where: str | None = None) -> int:
    """Record a `corrupt_image` quarantine entry for every frame the dhash UDF could not decode.

    Such frames passed ingestion's structural check; they stay in the frames table (nothing
    is lost) but never reach a slice. Idempotent, like all quarantine writes. Looks at the rows
    `where` selects (a run: its own rows). Returns their count.
    """
    by_batch: dict[str, list] = {}
    hits = _errored_rows(table, "dhash", columns=("image_id", "batch_id", "source_file"), where=where)
    for row, error in hits:
        by_batch.setdefault(row["batch_id"], []).append(
            Rejection(row["source_file"], "corrupt_image", f"does not decode (found by curation): {error}"[:500]))
    for batch_id, rejections in by_batch.items():
        record_quarantine(conn, batch_id, rejections)
    return len(hits)


@dataclass
class _Launch:
    plan: ColumnPlan
    started: float
    pending: int
    first_ingest_seq: int | None
    job: Any = None  # geneva Job, None when there was nothing to fill


def _launch(table, plan: ColumnPlan, config: CurationConfig, log: Callable[[str], None] | None) -> _Launch:
    """Start the column's Geneva backfill over its NULL rows (asynchronously)."""
    started = time.perf_counter()
    table.checkout_latest()
    seqs = table.to_lance().to_table(columns=["ingest_seq"], filter=plan.null_filter())["ingest_seq"].to_pylist()
    pending, job = len(seqs), None
    # Rows whose UDF failed before are retried, but they are not this run's rows: its checks
    # start at the first row never tried, so an old bad row is reported once.
    retried = {row["ingest_seq"] for row, _ in _errored_rows(table, plan.columns[0], columns=("ingest_seq",))}
    first_new = min((s for s in seqs if s not in retried), default=None)
    if pending:
        with warnings.catch_warnings():  # Geneva cannot type-check `int`/`bytes` annotations; harmless
            warnings.filterwarnings("ignore", message="Could not validate type")
            # An explicit `where`, though Geneva's default is the same filter: with none, Geneva 0.17
            # also refills every row an earlier UDF version computed (the novelty UDF's version
            # names its reference set, new each batch), a whole-table job each batch: 253 s for
            # 1,000 new rows of a 20,000-frame table. Changed parameters are refused or
            # recomputed above instead, so Geneva's advisory on explicit filters is dropped.
            job = table.backfill_async(plan.columns[0], udf=plan.make_udf(table), where=plan.null_filter(),
                                       concurrency=plan.appliers(config),
                                       checkpoint_size=config.checkpoint_size)
        if log:
            log(f"{plan.columns[0]}: backfilling {pending} rows (Geneva job {job.job_id})")
    return _Launch(plan, started, pending, first_new, job)


def _finish(table, launch: _Launch) -> list[ColumnStats]:
    """Wait for a launched backfill; the stats of each column it filled (raises the job's
    error, if it failed)."""
    job_id = None
    if launch.job is not None:
        try:
            launch.job.result()
        finally:
            geneva_patches.release_job_tracker(launch.job.job_id)
        job_id = launch.job.job_id
    table.checkout_latest()
    elapsed, rows_total, stats = time.perf_counter() - launch.started, table.count_rows(), []
    for name in launch.plan.columns:
        errors, sample = error_rows(table, name, job_id) if job_id else (0, [])
        stats.append(ColumnStats(
            column=name, rows_processed=launch.pending, rows_total=rows_total,
            rows_filled=table.count_rows(f"{name} IS NOT NULL"), error_rows=errors, elapsed_s=elapsed,
            params=launch.plan.params[name], job_id=job_id, errors=sample, first_ingest_seq=launch.first_ingest_seq))
    return stats


def waves(jobs: list[str], deps: dict[str, tuple[str, ...]] = COLUMN_DEPS) -> list[list[str]]:
    """Group jobs into waves that can run concurrently: a job after the jobs filling the columns
    it reads (`deps`: the columns each column reads)."""
    reads = {job: {job_of(d) for c in UDF_GROUPS.get(job, (job,)) for d in deps.get(c, ())} - {job} for job in jobs}
    remaining, done, result = list(jobs), set(), []
    while remaining:
        wave = [j for j in remaining if all(d in done or d not in jobs for d in reads[j])]
        result.append(wave)
        done.update(wave)
        remaining = [j for j in remaining if j not in wave]
    return result


def backfill_columns(table, columns=None, config: CurationConfig | None = None,
                     log: Callable[[str], None] | None = None) -> dict[str, ColumnStats]:
    """Backfill the curation `columns` (default: all) of the frames `table`, in dependency order,
    on the Ray the caller opened. A column of a UDF group brings its siblings along (one job
    fills them all); the stats name every column filled."""
    require_ray("curation backfills")
    geneva_patches.drop_explicit_where_advisory()
    config = config or CurationConfig()
    jobs = list(dict.fromkeys(job_of(c) for c in ordered(columns, config.columns)))
    plans = plan_columns(config)
    stats: dict[str, ColumnStats] = {}
    geneva_patches.create_error_table(table)  # before concurrent jobs would each create it
    # Each Geneva job has a fixed cost of seconds; independent jobs run concurrently.
    for wave in waves(jobs, config.deps):
        for name in wave:  # schema changes first, so they do not race the jobs' commits
            plan = plans[name]
            _ensure_column(table, plan, bool(set(plan.columns) & set(config.recompute)))
        launches = [_launch(table, plans[name], config, log) for name in wave]
        for launch in launches:
            for column_stats in _finish(table, launch):
                stats[column_stats.column] = column_stats
                if log:
                    log(f"{column_stats.column}: {column_stats.as_metadata()}")
    return {c: stats[c] for c in config.columns if c in stats}
