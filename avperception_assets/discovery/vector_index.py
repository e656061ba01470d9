"""Similarity search over the frames' image embeddings: the IVF_PQ index on the `embedding`
column (created once the table is big enough for exact search to be slow, kept current as
footage arrives) and the k nearest frames to a query vector, with an optional SQL prefilter.

Below `INDEX_MIN_ROWS` vectors search is exact. Above it, each pass adds the new rows to the
existing index in pylance (they are assigned to the trained partitions, a cost that follows the
new rows), and the index is retrained only once the table has outgrown its partitions by
`GROWTH_BEFORE_RETRAIN` (by default once it has doubled: all retrains together then cost at
most twice the rows, a constant amount a row).

Library behaviours this works around or relies on (lancedb 0.39.0, whose Rust core is lance 12,
with pylance 14.0.2):
- unlike btree indexes (see `maintenance`), pylance 14's `optimize_indices` leaves an IVF_PQ
  index that lancedb reads: after it lancedb's `index_stats` counts the new rows as indexed,
  its query plans use the index alone (no flat scan of the new fragments), and at 200,000 rows
  plus 5,000 new ones recall@10 stayed 0.99 and each new row was its own nearest (1.5 s, where
  training the index took 143 s). lancedb's own `optimize` would also compact the whole table.
- lancedb's `.nprobes(n)` also caps the partitions searched at n, so a narrow prefilter returns
  fewer than k rows when the n partitions nearest the query hold fewer matches. Without the cap
  (`maximum_nprobes(0)`, documented as "searched only if we have not found enough results")
  lance searches every partition on every query, filter or not (lance issue #5637; 48 of 48 in
  the benchmark's table, `partitions_searched` in `analyze_plan`). So the capped search runs
  first and only an answer short of k rows is searched again without the cap.
- PQ codes alone rank near neighbours poorly (recall@10 0.38 in the benchmark's table, every
  partition searched), so candidates are re-ranked on the stored vectors (`refine_factor`),
  which also makes `_distance` exact. lance re-ranks each query of a multi-vector search on its
  own: 1.87 s for 256 queries of k=10 against 100,000 rows (0.36 s of it the PQ search), so
  `nearest_each` re-ranks the same candidates itself from one `take_row_ids` of them all: 0.98 s,
  the same recall (0.848 against exact search, split-prefiltered; 0.961 for k=1).
- Training a PQ codebook needs 256 non-NULL vectors ("Not enough rows to train PQ"); NULL
  vectors count in `num_indexed_rows` but are never returned, by the index or by exact search.
- Geneva 0.17's Table (how the pipeline opens `bdd100k`) takes only lancedb's legacy
  `create_index(metric, ..., vector_column_name=...)`, not `config=IvfPq(...)` ("unexpected
  keyword argument 'config'"): the index is created with the legacy keywords, which lancedb's
  own tables still accept (with a DeprecationWarning).
- lancedb's `add` rejects a batch with a NULL vector ("has variable length vectors") unless
  called with `on_bad_vectors="null"`. Geneva backfills write the column without that check,
  and their in-place commit (DataReplacement) takes the fragment out of the index: a vector
  filled in after its row was indexed is found by a flat scan until the next pass indexes it.

Nothing here knows about Dagster.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

VECTOR_COLUMN = "embedding"
METRIC = "cosine"
# Exact search p50 on this 2-core machine (lance flat search, 4,096-row fragments, unit vectors,
# other jobs running, load 5; 2026-12-01): at dimension 512, 14 ms at 20,000 rows, 21 ms at
# 30,000, 33 ms at 40,000, 97 ms at 100,000; at 256, 14 ms at 30,000 and 21 ms at 40,000.
# From 30,000 rows a 512-d query would pass 20 ms, so the index starts there.
INDEX_MIN_ROWS = 30_000
# PQ with 8-bit codes trains one 256-centroid codebook per sub-vector.
PQ_MIN_ROWS = 256
# Rows a partition holds when the index is trained (half lance's default target, for finer
# probing). Its k-means samples 256 vectors a partition and compares each with every centroid,
# so training grows with the square of the partitions: 48 at 200,000 rows took 4 min here.
ROWS_PER_PARTITION = 4096
# Partitions searched (a fraction of them, at least MIN_NPROBES: every one of a small index)
# and candidates re-ranked on the stored vectors per result. Recall@10 at 200,000 clustered
# 512-d vectors, 48 partitions, re-ranking 20 (`benchmarks/search.py`): 0.83 probing 2, 0.90
# probing 4, 0.95 probing 8, 0.97 probing 12 (this fraction), 0.98 probing all; re-ranking 10
# caps it at 0.93, 40 at 0.998. Latency (17 ms p50) barely moved across these.
PROBE_FRACTION = 0.25
MIN_NPROBES = 8
REFINE_FACTOR = 20
# Retrain once index_params would give the table 1 + this times the partitions the index has
# (1.0: the table has doubled since training). Until then new rows join the trained partitions,
# which grow; doubling bounds both their size and the retrains' cost (2x the rows, in total).
GROWTH_BEFORE_RETRAIN = 1.0


def index_params(rows: int, dim: int) -> dict:
    """IvfPq parameters for `rows` vectors of dimension `dim`."""
    if dim % 8:
        raise ValueError(f"vector dimension {dim} is not a multiple of 8, which PQ sub-vectors need")
    return {
        "distance_type": METRIC,
        "num_partitions": max(1, rows // ROWS_PER_PARTITION),
        # 8 dimensions a sub-vector (lance's default is 16), 64 bytes a 512-d vector: at 200,000
        # vectors (64 partitions, 8 probed) recall@10 0.92 re-ranking 10 and 0.96 re-ranking 20,
        # where 16 dimensions give 0.83 and need 30 for 0.96; training took 144 s against 105 s.
        "num_sub_vectors": dim // 8,
        "num_bits": 8,
    }


def _vector_dim(table, column: str) -> int:
    """The dimension of `column`, a fixed-size list of floats; a clear error otherwise."""
    if column not in table.schema.names:
        raise ValueError(f"unknown column {column!r}; the table has {table.schema.names}")
    kind = table.schema.field(column).type
    if not (pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type)):
        raise ValueError(f"column {column!r} is {kind}, not a fixed_size_list of floats")
    return kind.list_size


def _vector_index(table, column: str):
    return next((index for index in table.list_indices() if index.columns == [column]), None)


def _vector_rows(table, column: str, at_least: int) -> int:
    """Rows with a non-NULL vector (0 when the table has fewer than `at_least` rows at all)."""
    if table.count_rows() < at_least:
        return 0
    return table.count_rows(f"`{column}` IS NOT NULL")


def _partitions(table, index_name: str) -> int:
    # lancedb's index_stats has no partition count; pylance's reads it (tens of ms: only here).
    return table.to_lance().stats.index_stats(index_name)["indices"][0]["num_partitions"]


def _train(table, column: str, rows: int, dim: int, replace: bool) -> None:
    params = index_params(rows, dim)
    # lancedb's legacy signature: the only one Geneva's Table (the pipeline's tables) takes.
    table.create_index(metric=params["distance_type"], num_partitions=params["num_partitions"],
                       num_sub_vectors=params["num_sub_vectors"], vector_column_name=column, replace=replace,
                       index_type="IVF_PQ", num_bits=params["num_bits"])


def ensure_vector_index(table, column: str = VECTOR_COLUMN, min_rows: int = INDEX_MIN_ROWS,
                        stale_fraction: float = GROWTH_BEFORE_RETRAIN) -> str | None:
    """Create the IVF_PQ index on `column` once it holds `min_rows` non-NULL vectors, or bring it
    up to date with the rows added since the last pass. Returns "created", "updated" (new rows
    added to the trained partitions), "rebuilt" (retrained: `index_params` would give the table
    1 + `stale_fraction` times the partitions the index has) or None (nothing to do, no commit).
    A table without `column` (no embeddings yet) is left alone, like maintenance's columns."""
    if column not in table.schema.names:
        return None
    dim = _vector_dim(table, column)
    index = _vector_index(table, column)
    if index is None:
        needed = max(min_rows, PQ_MIN_ROWS)
        rows = _vector_rows(table, column, needed)
        if rows < needed:
            return None
        _train(table, column, rows, dim, replace=False)
        return "created"
    stats = table.index_stats(index.name)
    rows = stats.num_indexed_rows + stats.num_unindexed_rows
    # Checked even with no unindexed rows left: any optimize of every index adds them too.
    if index_params(rows, dim)["num_partitions"] >= (1 + stale_fraction) * _partitions(table, index.name):
        _train(table, column, rows, dim, replace=True)
        return "rebuilt"
    if not stats.num_unindexed_rows:
        return None
    table.to_lance().optimize.optimize_indices(index_names=[index.name])
    table.checkout_latest()
    return "updated"


def _query_vector(vector, dim: int, column: str) -> np.ndarray:
    query = np.asarray(vector, dtype=np.float32)
    if query.ndim != 1 or query.size != dim:
        raise ValueError(f"query vector has shape {query.shape}; column {column!r} expects dimension {dim}")
    if not np.isfinite(query).all() or not query.any():
        raise ValueError("query vector must be finite and non-zero (cosine distance is undefined otherwise)")
    return query


def _nprobes(table, index, dim: int) -> int:
    # The index has at most the partitions index_params gives its rows (fewer once new rows
    # joined without a retrain), so this probes at least PROBE_FRACTION of them.
    partitions = index_params(table.index_stats(index.name).num_indexed_rows, dim)["num_partitions"]
    return max(MIN_NPROBES, math.ceil(PROBE_FRACTION * partitions))


def _search(table, queries, k: int, where: str | None, column: str, columns: list[str] | None):
    """The query for one vector or a list of them, and the vector index it may use (None: exact)."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    query = table.search(queries, vector_column_name=column).distance_type(METRIC).limit(int(k))
    if columns is not None:
        unknown = sorted(set(columns) - set(table.schema.names))
        if unknown:
            raise ValueError(f"unknown columns {unknown}; the table has {table.schema.names}")
        query = query.select([*columns, "_distance"])
    if where:
        query = query.where(where, prefilter=True)
    return query, _vector_index(table, column)


def _run(table, query, index, dim: int, short) -> pa.Table:
    """Run `query` exactly, or on the index with the capped probe first; `short(found)` says
    whether the capped answer misses rows that match (then every partition is searched)."""
    if index is None:
        return query.bypass_vector_index().to_arrow()
    nprobes = _nprobes(table, index, dim)
    found = query.refine_factor(REFINE_FACTOR).nprobes(nprobes).to_arrow()
    if short(found):  # the probed partitions hold fewer than k rows that match: search them all
        found = query.minimum_nprobes(nprobes).maximum_nprobes(0).to_arrow()
    return found


def nearest(table, vector, k: int = 10, where: str | None = None, column: str = VECTOR_COLUMN,
            columns: list[str] | None = None) -> pa.Table:
    """The `k` rows nearest to `vector` by cosine distance (`_distance`, ascending), among the rows
    matching the SQL `where` (a prefilter: k rows whenever k match); rows with a NULL vector are
    never returned. `columns` selects the other columns (default: all). Uses the vector index
    when there is one (recall@10 >= 0.95, see the constants), exact search otherwise."""
    dim = _vector_dim(table, column)
    query, index = _search(table, _query_vector(vector, dim, column), k, where, column, columns)
    return _run(table, query, index, dim, lambda found: found.num_rows < k)


def nearest_each(table, vectors, k: int = 1, where: str | None = None, column: str = VECTOR_COLUMN,
                 columns: list[str] | None = None) -> pa.Table:
    """`nearest` for each row of `vectors` in one lance query (`query_index` names the row): 0.85 ms
    a vector in batches of 64 against 21 ms one at a time (4,000 rows, exact search; a query's
    fixed cost dominates at this size). On the index, each query's `k * REFINE_FACTOR` PQ
    candidates are re-ranked here (see the module docstring). A row with no answer has no result rows."""
    dim = _vector_dim(table, column)
    queries = [_query_vector(v, dim, column) for v in vectors]
    if not queries:
        raise ValueError("no query vectors")
    # lancedb reads a list of one vector as a single query, which has no query_index column.
    query, index = _search(table, queries if len(queries) > 1 else queries[0], k, where, column, columns)
    if index is None or len(queries) == 1:
        found = _run(table, query, index, dim, lambda found: found.num_rows < k * len(queries))
        if "query_index" not in found.column_names:
            found = found.add_column(0, "query_index", pa.array(np.zeros(found.num_rows, dtype=np.int32)))
        return found
    candidates = query.limit(k * REFINE_FACTOR).with_row_id(True)
    nprobes = _nprobes(table, index, dim)
    found = candidates.nprobes(nprobes).to_arrow()
    if (np.bincount(found["query_index"].to_numpy(), minlength=len(queries)) < k).any():
        found = candidates.minimum_nprobes(nprobes).maximum_nprobes(0).to_arrow()  # as `_run`: every partition
    return _reranked(table, found, np.stack(queries), k, column)


def _reranked(table, found: pa.Table, queries: np.ndarray, k: int, column: str) -> pa.Table:
    """The `k` nearest of each query's PQ candidates in `found`, by exact cosine distance to the
    stored vectors (taken once for all queries), ordered by query, then distance."""
    if not found.num_rows:
        return found.drop_columns(["_rowid"])
    row_ids, query_index = found["_rowid"].to_numpy(), found["query_index"].to_numpy()
    unique_ids, position = np.unique(row_ids, return_inverse=True)
    stored = vectors_matrix(table.take_row_ids(unique_ids.tolist()).select([column]).to_arrow()[column])
    cosine = unit_rows(stored) @ unit_rows(queries).T  # one row per stored candidate, one column per query
    distance = (1.0 - cosine[position, query_index]).astype(np.float32)
    order = np.lexsort((distance, query_index))
    rank = np.arange(len(order)) - np.searchsorted(query_index[order], query_index[order])
    keep = order[rank < k]
    found = found.set_column(found.schema.get_field_index("_distance"), "_distance", pa.array(distance))
    return found.take(keep).drop_columns(["_rowid"])


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (float32; an all-zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)

def vectors_matrix(column) -> np.ndarray:
    """A fixed-size list column (array or chunked, no NULLs) → (n, dim) float32."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return np.asarray(column.flatten(), dtype=np.float32).reshape(len(column), column.type.list_size)
