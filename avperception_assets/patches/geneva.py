"""Workarounds for Geneva 0.17, most of them inside Ray's workers, where Geneva's jobs run.

`setup_ray_worker` is the `worker_process_setup_hook` of every Ray that `storage.ray_context`
starts or joins. A patch applies when the Geneva module it mends is imported, so a worker that
never runs Geneva code (Ray's queue actors) does not import Geneva for it.

- geneva 0.17, `runners.ray.pipeline`: a view refresh over a source with stable row ids re-copies
  every fragment of the view. `_extract_fragment_ids_from_row_ids` returns no source fragments
  for such a view ("TODO: Query Lance to map stable row IDs to current fragment IDs"), so each
  view fragment's checkpoint is keyed on the data files of the whole source, which any new batch
  changes. Symptom: every refresh logs "Destination fragment N has no valid checkpoint" for every
  view fragment, and its work follows the view's size. Mended by looking up which source
  fragments now hold a view fragment's `__source_row_id`s (one scan of the source's row ids and
  addresses, no column data), so a view fragment is copied again only when those fragments' data
  files changed (a compaction or backfill that rewrote them). Geneva still searches every source
  fragment for rows the view lacks, as before: a compaction can move a new row into a fragment
  the view already draws from.

In the process that launches backfills (`drop_explicit_where_advisory`):

- geneva 0.17, `table.Table.backfill`: a backfill with an explicit `where` always logs the
  warning "Column X has an explicit where filter provided. Rows already computed with a previous
  UDF version or changed input data will not be reprocessed", once per job in every curation
  run's log. Curation passes its NULL filter on purpose and refuses or recomputes a column whose
  definition changed (`curation._ensure_column`), so the advice does not apply and is dropped.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import inspect
import logging
import sys
from contextvars import ContextVar
from typing import Callable

from avperception_assets.patches.imports import defer_unused_imports

_PIPELINE = "geneva.runners.ray.pipeline"
_STABLE_ROW_ID_VIEW = 2  # Geneva's materialized-view version for a source with stable row ids

# The running refresh's lookup from a stable row id to the source fragment holding it.
_source_fragments: ContextVar[Callable[[list[int]], set[int]] | None] = ContextVar(
    "source_fragments", default=None)


def setup_ray_worker() -> None:
    """Ray's `worker_process_setup_hook`: the import deferrals and the patches above."""
    defer_unused_imports()
    patch_on_import(_PIPELINE, keep_view_checkpoints)


_EXPLICIT_WHERE_ADVISORY = "Column %s has an explicit where filter provided."


class _ExplicitWhereAdvisory(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_EXPLICIT_WHERE_ADVISORY)


def drop_explicit_where_advisory() -> None:
    """Drop Geneva's advisory on backfills with an explicit filter (the docstring's last item)."""
    logger = logging.getLogger("geneva.table")
    if not any(isinstance(f, _ExplicitWhereAdvisory) for f in logger.filters):
        logger.addFilter(_ExplicitWhereAdvisory())


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
    """Patch Geneva's refresh pipeline module (first item of this module's docstring)."""
    copy_table, build_mapping = pipeline.run_ray_copy_table, pipeline._build_dst_to_src_mapping
    extract = pipeline._extract_fragment_ids_from_row_ids
    mapping_signature = inspect.signature(build_mapping)

    def run_ray_copy_table(*args, **kwargs):
        token = _source_fragments.set(None)  # a pooled worker runs one refresh after another
        try:
            return copy_table(*args, **kwargs)
        finally:
            _source_fragments.reset(token)

    def build_dst_to_src_mapping(*args, **kwargs):
        bound = mapping_signature.bind(*args, **kwargs).arguments
        source = bound.get("src_dataset")
        if source is None or pipeline._get_matview_version(bound["dst_dataset"].schema) != _STABLE_ROW_ID_VIEW:
            return build_mapping(*args, **kwargs)
        _source_fragments.set(source_fragments_of(source))  # also for the fragments this refresh appends
        result = build_mapping(*args, **kwargs)
        # No source fragment counts as already drawn from, so all are searched for new rows.
        return result._replace(dst_to_src_map={fragment: set() for fragment in result.dst_to_src_map})

    def extract_fragment_ids_from_row_ids(row_ids, mv_version):
        lookup = _source_fragments.get()
        if lookup is None or mv_version != _STABLE_ROW_ID_VIEW:
            return extract(row_ids, mv_version)
        return lookup(row_ids)

    pipeline.run_ray_copy_table = run_ray_copy_table
    pipeline._build_dst_to_src_mapping = build_dst_to_src_mapping
    pipeline._extract_fragment_ids_from_row_ids = extract_fragment_ids_from_row_ids


def patch_on_import(name: str, patch: Callable) -> None:
    """Run `patch(module)` once module `name` is imported: now if it is, else right after its
    first import."""
    if name in sys.modules:
        patch(sys.modules[name])
    elif not any(isinstance(finder, _PatchOnImport) and finder.name == name for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(name, patch))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, patch: Callable):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, self.patch)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    """The module's own loader, then the patch."""

    def __init__(self, loader, patch: Callable):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)

    def __getattr__(self, attribute):  # get_source, get_filename, ... for inspect and tracebacks
        return getattr(self.loader, attribute)
