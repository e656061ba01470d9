"""Similarity search on real LanceDB tables: exact search against numpy, the prefilter, NULL
vectors, and the IVF_PQ index created at min_rows and kept current (still used by lancedb's
queries) as rows arrive."""

from __future__ import annotations

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pytest

from avperception_assets.storage import tables as storage
from avperception_assets.discovery import vector_index
from avperception_assets.curation.udfs import UNIQUENESS_CAP, uniqueness
from avperception_assets.discovery.vector_index import ensure_vector_index, nearest, nearest_each

DIM = 32
MIN_ROWS = 300  # above the 256 vectors PQ training needs


def _unit(rng, rows: int) -> np.ndarray:
    vectors = rng.standard_normal((rows, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _rows(first: int, vectors: np.ndarray, null_every: int = 0) -> pa.Table:
    ids = np.arange(first, first + len(vectors))
    null = (ids % null_every == 0) if null_every else np.zeros(len(vectors), bool)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM, mask=pa.array(null))
    return pa.table({"id": ids, "embedding": embedding})


def _table(tmp_path, vectors: np.ndarray, null_every: int = 0):
    # Stable row ids, as the frames table has; lancedb refuses NULL vectors without on_bad_vectors.
    return lancedb.connect(tmp_path).create_table("t", _rows(0, vectors, null_every), on_bad_vectors="null",
                                                  storage_options=storage.STABLE_ROW_IDS)


def _true_nearest(vectors: np.ndarray, query: np.ndarray, k: int, keep=None) -> list[int]:
    distances = 1 - vectors @ query
    if keep is not None:
        distances[~keep] = np.inf
    return [int(i) for i in np.argsort(distances)[:k]]


def test_exact_search_returns_the_true_nearest_neighbours(tmp_path):
    rng = np.random.default_rng(0)
    vectors = _unit(rng, 500)
    table = _table(tmp_path, vectors)
    assert table.list_indices() == []  # no index: the exact path
    for query in _unit(rng, 5):
        got = nearest(table, query, k=10)
        expected = _true_nearest(vectors, query, 10)
        assert got["id"].to_pylist() == expected
        assert np.allclose(got["_distance"].to_numpy(), 1 - vectors[expected] @ query, atol=1e-5)


@pytest.mark.parametrize("indexed", [False, True])
def test_the_prefilter_is_respected(tmp_path, monkeypatch, indexed):
    rng = np.random.default_rng(1)
    vectors = _unit(rng, 600)
    table = _table(tmp_path, vectors)
    if indexed:  # 24 partitions, 1 probed: the matching rows lie in partitions not probed
        monkeypatch.setattr(vector_index, "ROWS_PER_PARTITION", 25)
        monkeypatch.setattr(vector_index, "MIN_NPROBES", 1)
        monkeypatch.setattr(vector_index, "PROBE_FRACTION", 0.01)
        assert ensure_vector_index(table, min_rows=MIN_ROWS) == "created"
    query = _unit(rng, 1)[0]
    # 12 matching rows spread over the table: a post-filter of the 10 nearest would keep ~0.
    got = nearest(table, query, k=10, where="id % 50 = 7", columns=["id"])
    assert got.column_names == ["id", "_distance"]
    assert got["id"].to_pylist() == _true_nearest(vectors, query, 10, keep=np.arange(600) % 50 == 7)


@pytest.mark.parametrize("indexed", [False, True])
def test_rows_with_a_null_vector_are_never_returned(tmp_path, indexed):
    rng = np.random.default_rng(2)
    vectors = _unit(rng, 600)
    table = _table(tmp_path, vectors, null_every=3)
    if indexed:  # 400 non-NULL vectors: the NULL ones do not break training
        assert ensure_vector_index(table, min_rows=MIN_ROWS) == "created"
    got = nearest(table, vectors[0], k=600, columns=["id"])  # row 0's vector is NULL in the table
    assert got.num_rows == 400
    assert not any(i % 3 == 0 for i in got["id"].to_pylist())
    assert np.all(np.diff(got["_distance"].to_numpy()) >= 0)



@pytest.mark.parametrize("indexed", [False, True])
def test_nearest_each_answers_every_query_as_nearest_does(tmp_path, indexed):
    rng = np.random.default_rng(7)
    table = _table(tmp_path, _unit(rng, 600), null_every=5)
    if indexed:
        assert ensure_vector_index(table, min_rows=MIN_ROWS) == "created"
    queries = _unit(rng, 6)
    got = nearest_each(table, queries, k=3, where="id >= 100", columns=["id"])
    assert got.column_names == ["query_index", "id", "_distance"]
    for i, query in enumerate(queries):
        mine = got.filter(pa.compute.equal(got["query_index"], i))
        assert mine["id"].to_pylist() == nearest(table, query, k=3, where="id >= 100", columns=["id"])["id"].to_pylist()
    [single] = nearest_each(table, queries[:1], k=1, columns=["id"]).to_pylist()  # lancedb's single query
    assert (single["query_index"], single["id"]) == (0, nearest(table, queries[0], k=1)["id"][0].as_py())
    assert nearest_each(table, queries, k=1, where="id < 0").num_rows == 0  # nothing matches: no rows


def test_nearest_each_reranks_on_the_stored_vectors_and_searches_every_partition_when_short(tmp_path, monkeypatch):
    rng = np.random.default_rng(8)
    vectors = _unit(rng, 600)
    table = _table(tmp_path, vectors)
    monkeypatch.setattr(vector_index, "ROWS_PER_PARTITION", 25)  # 24 partitions, 1 probed
    monkeypatch.setattr(vector_index, "MIN_NPROBES", 1)
    monkeypatch.setattr(vector_index, "PROBE_FRACTION", 0.01)
    assert ensure_vector_index(table, min_rows=MIN_ROWS) == "created"
    queries, keep = _unit(rng, 4), np.arange(600) % 50 == 7
    got = nearest_each(table, queries, k=5, where="id % 50 = 7", columns=["id"])
    for i, query in enumerate(queries):
        mine = got.filter(pa.compute.equal(got["query_index"], i))
        expected = _true_nearest(vectors, query, 5, keep=keep)
        assert mine["id"].to_pylist() == expected
        assert np.allclose(mine["_distance"].to_numpy(), 1 - vectors[expected] @ query, atol=1e-5)  # exact, not PQ


def test_uniqueness_is_the_distance_to_the_nearest_frame_ingested_earlier(tmp_path):
    """A batch's rows against brute force: earlier batches by one query, the rows it spans (its
    own, and another batch's between them) by a matrix; NULL vectors never count."""
    rng = np.random.default_rng(8)
    vectors = _unit(rng, 300)
    vectors[150] = vectors[40]  # a copy of an earlier frame: distance 0
    vectors[161] = vectors[155]  # a copy inside the span, ingested later
    vectors[2] = (vectors[1] + vectors[2]) / np.linalg.norm(vectors[1] + vectors[2])  # near frame 1
    table = _table(tmp_path, vectors, null_every=7)
    table.alter_columns({"path": "id", "rename": "ingest_seq"})
    batch = np.array([150, 155, 158, 161, 170])  # 156, 157, 159 ... belong to another batch
    got = uniqueness(table, vectors[batch], batch)
    present = np.arange(300) % 7 != 0
    expected = [min(UNIQUENESS_CAP, (1 - vectors[(np.arange(300) < s) & present] @ vectors[s]).min()) for s in batch]
    np.testing.assert_allclose(got, np.clip(expected, 0, None), atol=1e-5)
    assert got[0] == pytest.approx(0, abs=1e-5) and got[3] == pytest.approx(0, abs=1e-5)
    first = uniqueness(table, vectors[[1, 2]], np.array([1, 2]))  # the first frame ever: nothing earlier
    assert first[0] == UNIQUENESS_CAP and first[1] == pytest.approx(1 - vectors[1] @ vectors[2], abs=1e-5)

def test_the_index_is_created_once_min_rows_vectors_exist(tmp_path):
    rng = np.random.default_rng(3)
    table = _table(tmp_path, _unit(rng, 420), null_every=3)  # 420 rows, 280 vectors
    assert ensure_vector_index(table, min_rows=MIN_ROWS) is None  # NULL vectors do not count
    assert table.list_indices() == []
    table.add(_rows(420, _unit(rng, 20)))
    assert ensure_vector_index(table, min_rows=MIN_ROWS) == "created"
    [index] = table.list_indices()
    assert index.columns == ["embedding"] and table.index_stats(index.name).distance_type == "cosine"
    assert ensure_vector_index(table, min_rows=MIN_ROWS) is None  # nothing new: no commit
    assert len(table.list_indices()) == 1


def _uses_index_alone(table, query) -> bool:
    """lancedb searches the index and scans no unindexed fragment."""
    plan = table.search(query, vector_column_name="embedding").distance_type("cosine").limit(1).explain_plan(True)
    return "ANNSubIndex" in plan and "LanceScan" not in plan


def test_appended_rows_join_the_index_and_are_found(tmp_path):
    rng = np.random.default_rng(4)
    table = _table(tmp_path, _unit(rng, 400))
    assert ensure_vector_index(table, min_rows=MIN_ROWS) == "created"
    version = table.version
    new = _unit(rng, 50)
    table.add(_rows(400, new))
    [index] = table.list_indices()
    assert table.index_stats(index.name).num_unindexed_rows == 50
    assert not _uses_index_alone(table, new[0])
    assert ensure_vector_index(table, min_rows=MIN_ROWS) == "updated"
    stats = table.index_stats(index.name)
    assert (stats.num_indexed_rows, stats.num_unindexed_rows) == (450, 0)
    assert _uses_index_alone(table, new[0])  # pylance's update is an index lancedb reads
    for i in (0, 17, 49):
        got = nearest(table, new[i], k=3)
        assert got["id"][0].as_py() == 400 + i and got["_distance"][0].as_py() == pytest.approx(0, abs=1e-5)
    assert table.version == version + 2  # one commit for the rows, one for the update


def test_the_index_is_retrained_once_the_table_outgrows_its_partitions(tmp_path, monkeypatch):
    monkeypatch.setattr(vector_index, "ROWS_PER_PARTITION", 100)
    rng = np.random.default_rng(5)
    table = _table(tmp_path, _unit(rng, 300))
    assert ensure_vector_index(table, min_rows=MIN_ROWS) == "created"  # 3 partitions
    table.add(_rows(300, _unit(rng, 250)))  # 5 partitions' worth: below twice 3
    assert ensure_vector_index(table, min_rows=MIN_ROWS) == "updated"
    new = _unit(rng, 50)
    table.add(_rows(550, new))  # 600 rows: 6 partitions' worth, twice what the index has
    table.to_lance().optimize.optimize_indices()  # someone else's optimize takes the new rows first
    table.checkout_latest()
    assert ensure_vector_index(table, min_rows=MIN_ROWS) == "rebuilt"
    [index] = table.list_indices()
    assert table.to_lance().stats.index_stats(index.name)["indices"][0]["num_partitions"] == 6
    assert table.index_stats(index.name).num_unindexed_rows == 0
    assert nearest(table, new[7], k=1)["id"][0].as_py() == 557


@pytest.mark.parametrize("call, message", [
    (lambda table: nearest(table, np.ones(DIM + 1)), rf"shape \({DIM + 1},\); column 'embedding' expects dimension {DIM}"),
    (lambda table: nearest(table, np.ones((1, DIM))), rf"shape \(1, {DIM}\); column 'embedding' expects dimension {DIM}"),
    (lambda table: nearest(table, np.zeros(DIM)), "non-zero"),
    (lambda table: nearest(table, np.ones(DIM), k=0), "k must be a positive integer, got 0"),
    (lambda table: nearest(table, np.ones(DIM), column="clip"), "unknown column 'clip'"),
    (lambda table: nearest(table, np.ones(DIM), columns=["id", "weather"]), r"unknown columns \['weather'\]"),
    (lambda table: nearest(table, np.ones(DIM), column="id"), "column 'id' is int64, not a fixed_size_list"),
])
def test_bad_queries_get_a_clear_error(tmp_path, call, message):
    table = _table(tmp_path, _unit(np.random.default_rng(6), 20))
    with pytest.raises(ValueError, match=message):
        call(table)
