"""Patches of geneva 0.17.0. Upstream: none filed upstream for any of them (Geneva publishes no
public issue tracker; its code cites LanceDB's internal one).

`geneva.view_checkpoints` (with pylance 14.0.3; applied in Ray's workers, where refreshes run):
  a view refresh over a source with stable row ids re-copies every fragment of the view.
  `runners.ray.pipeline._extract_fragment_ids_from_row_ids` returns no source fragments for such
  a view ("TODO: Query Lance to map stable row IDs to current fragment IDs"), so each view
  fragment's checkpoint is keyed on the data files of the whole source, which any new batch
  changes. Symptom: every refresh logs "Destination fragment N has no valid checkpoint" for every
  view fragment, and its work follows the view's size. Mended by looking up which source
  fragments now hold a view fragment's `__source_row_id`s (one scan of the source's row ids and
  addresses, no column data; a Lance row address holds its fragment id in its upper 32 bits), so
  a view fragment is copied again only when those fragments' data files changed (a compaction or
  backfill that rewrote them). Geneva still searches every source fragment for rows the view
  lacks, as before: a compaction can move a new row into a fragment the view already draws from.
  It rebinds private functions, whose meaning another version may change: it refuses there.

`geneva.error_table`: every backfill's driver opens Geneva's `geneva_errors` table and creates it
  when missing, and two creators at once on a fresh database collide ("Object
  '__system$geneva_errors' was concurrently created by another operation", or
  TableAlreadyExistsError): one backfill job fails (seen in CI). Mended by creating it before a
  wave of jobs starts (`create_error_table`, through Geneva's private `ErrorStore`).

`geneva.job_tracker`: every backfill or view refresh leaves its JobTracker actor alive (0.1 CPU,
  about 0.5 GB each), so a long-lived Ray (a Dagster run, a test session) has no CPU left for new
  jobs after about ten. Mended by killing it once the job is done (`release_job_tracker`).

`geneva.ray_cluster`: Geneva's public Ray contexts (`conn.local_ray_context()`,
  `conn.context(cluster=...)`) take no `runtime_env`, which carries this project's worker set-up
  hook, so the private `runners.ray._mgr.ray_cluster` is used. On a cluster address it would zip
  the local code for an uploader that only namespace connections have ("Geneva was not
  initialized"), pip-install geneva into a fresh virtualenv on every node (GBs, and without
  lancedb) and upload its own package as a `py_modules` zip on every attach; the cluster's
  nodes run this project's environment instead, so an empty manifest skips the first and
  clearing `pip` and `py_modules` the others.

`geneva.where_advisory` (the code is correct without it): a backfill with an explicit `where`
  always logs "Column X has an explicit where filter provided. Rows already computed with a
  previous UDF version or changed input data will not be reprocessed", once per job in every
  curation run's log. Curation passes its NULL filter on purpose and refuses or recomputes a
  column whose definition changed (`curation.columns._ensure_column`), so the advice does not
  apply and is dropped.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from contextvars import ContextVar
from typing import Any, Callable

from avperception_assets.patches.imports import patch_on_import
from avperception_assets.patches.versions import Patch

GENEVA = {"geneva": "0.17.0"}

VIEW_CHECKPOINTS = Patch(
    "geneva.view_checkpoints", {**GENEVA, "pylance": "14.0.3"}, correctness=True,
    without="its private refresh functions may mean something else and a view could be refreshed wrong")
ERROR_TABLE = Patch(
    "geneva.error_table", GENEVA, correctness=True,
    without="backfills started together on a fresh database can fail creating Geneva's error table")
JOB_TRACKER = Patch(
    "geneva.job_tracker", GENEVA, correctness=True,
    without="each Geneva job leaves its JobTracker actor alive and a long-lived Ray runs out of CPU")
RAY_CLUSTER = Patch(
    "geneva.ray_cluster", GENEVA, correctness=True,
    without="Geneva's jobs may run without the Ray workers' set-up hook, or not reach a cluster")
WHERE_ADVISORY = Patch(
    "geneva.where_advisory", GENEVA, correctness=False,
    without="each backfill logs Geneva's advice to force a reprocess, which does not apply to curation")

PATCHES = (VIEW_CHECKPOINTS, ERROR_TABLE, JOB_TRACKER, RAY_CLUSTER, WHERE_ADVISORY)

# --- geneva.view_checkpoints ------------------------------------------------------------

PIPELINE = "geneva.runners.ray.pipeline"
STABLE_ROW_ID_VIEW = 2  # Geneva's materialized-view version for a source with stable row ids

# The running refresh's lookup from a stable row id to the source fragment holding it.
_source_fragments: ContextVar[Callable[[list[int]], set[int]] | None] = ContextVar(
    "source_fragments", default=None)


def keep_view_checkpoints_on_import() -> None:
    """Patch Geneva's refresh pipeline once it is imported (a Ray worker that never runs Geneva
    code, such as Ray's queue actors, does not import it for this)."""
    if VIEW_CHECKPOINTS.applies():
        patch_on_import(PIPELINE, keep_view_checkpoints)


def source_fragments_of(dataset) -> Callable[[list[int]], set[int]]:
    """A lookup from stable row ids to the ids of the fragments of `dataset` (a Lance dataset)
    that hold them now; ids no longer in `dataset` (deleted rows) are left out."""
    import numpy as np  # here, not at the top: the setup hook runs in workers that never need it

    rows = dataset.scanner(columns=[], with_row_id=True, with_row_address=True).to_table()
    row_ids = rows["_rowid"].to_numpy()
    order = np.argsort(row_ids)
    row_ids, fragments = row_ids[order], (rows["_rowaddr"].to_numpy() >> np.uint64(32))[order]

    def lookup(wanted: list[int]) -> set[int]:
        if not len(row_ids):
            return set()
        wanted = np.asarray(wanted, dtype=np.uint64)
        at = np.searchsorted(row_ids, wanted).clip(max=len(row_ids) - 1)
        return set(fragments[at[row_ids[at] == wanted]].tolist())

    return lookup


def keep_view_checkpoints(pipeline) -> None:
    """Patch Geneva's refresh pipeline module (`geneva.view_checkpoints` above). Each function
    it replaces stays reachable as `__wrapped__`."""
    copy_table, build_mapping = pipeline.run_ray_copy_table, pipeline._build_dst_to_src_mapping
    extract = pipeline._extract_fragment_ids_from_row_ids
    mapping_signature = inspect.signature(build_mapping)

    @functools.wraps(copy_table)
    def run_ray_copy_table(*args, **kwargs):
        token = _source_fragments.set(None)  # a pooled worker runs one refresh after another
        try:
            return copy_table(*args, **kwargs)
        finally:
            _source_fragments.reset(token)

    @functools.wraps(build_mapping)
    def build_dst_to_src_mapping(*args, **kwargs):
        bound = mapping_signature.bind(*args, **kwargs).arguments
        source = bound.get("src_dataset")
        if source is None or pipeline._get_matview_version(bound["dst_dataset"].schema) != STABLE_ROW_ID_VIEW:
            return build_mapping(*args, **kwargs)
        _source_fragments.set(source_fragments_of(source))  # also for the fragments this refresh appends
        result = build_mapping(*args, **kwargs)
        # No source fragment counts as already drawn from, so all are searched for new rows.
        return result._replace(dst_to_src_map={fragment: set() for fragment in result.dst_to_src_map})

    @functools.wraps(extract)
    def extract_fragment_ids_from_row_ids(row_ids, mv_version):
        lookup = _source_fragments.get()
        if lookup is None or mv_version != STABLE_ROW_ID_VIEW:
            return extract(row_ids, mv_version)
        return lookup(row_ids)

    pipeline.run_ray_copy_table = run_ray_copy_table
    pipeline._build_dst_to_src_mapping = build_dst_to_src_mapping
    pipeline._extract_fragment_ids_from_row_ids = extract_fragment_ids_from_row_ids


# --- geneva.error_table, geneva.job_tracker ---------------------------------------------


def create_error_table(table) -> None:
    """Create Geneva's `geneva_errors` table for the database of `table` if it is missing:
    before a wave of backfill jobs, which would each create it."""
    ERROR_TABLE.applies()
    from geneva.debug.error_store import ErrorStore

    ErrorStore(table._conn)  # Geneva's Table has no public accessor for its connection


def release_job_tracker(job_id: str) -> None:
    """Kill a finished Geneva job's JobTracker actor (on the Ray this process is connected to)."""
    JOB_TRACKER.applies()
    import ray
    from geneva.runners.ray.naming import job_tracker_name

    with contextlib.suppress(ValueError):  # already gone
        ray.kill(ray.get_actor(job_tracker_name(job_id)))


# --- geneva.ray_cluster -----------------------------------------------------------------


def local_ray(runtime_env: dict[str, Any], **ray_init_kwargs):
    """Context manager: a local Ray for Geneva's jobs, its workers started with `runtime_env`."""
    RAY_CLUSTER.applies()
    from geneva.runners.ray._mgr import ray_cluster

    return ray_cluster(local=True, log_to_driver=False,
                       ray_init_kwargs={**ray_init_kwargs, "runtime_env": runtime_env})


def remote_ray(address: str, runtime_env: dict[str, Any]):
    """Context manager: this process attached as a driver to the Ray head at `address` (its GCS,
    `host:port`) for Geneva's jobs, the nodes running this project's environment, its workers
    started with `runtime_env`. Leaving it disconnects; the head runs on."""
    RAY_CLUSTER.applies()
    from geneva.manifest.mgr import GenevaManifest
    from geneva.runners.ray._mgr import ray_cluster

    return ray_cluster(addr=address, use_portforwarding=False,
                       manifest=GenevaManifest(name="avperception_assets", zips=[]),
                       ray_init_kwargs={"runtime_env": {**runtime_env, "pip": None, "py_modules": None}})


# --- geneva.where_advisory --------------------------------------------------------------

EXPLICIT_WHERE_ADVISORY = "Column %s has an explicit where filter provided."


class _ExplicitWhereAdvisory(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(EXPLICIT_WHERE_ADVISORY)


def drop_explicit_where_advisory() -> None:
    """Drop Geneva's advisory on backfills with an explicit filter, in the process that
    launches them (skipped on other versions)."""
    logger = logging.getLogger("geneva.table")
    if WHERE_ADVISORY.applies() and not any(isinstance(f, _ExplicitWhereAdvisory) for f in logger.filters):
        logger.addFilter(_ExplicitWhereAdvisory())
