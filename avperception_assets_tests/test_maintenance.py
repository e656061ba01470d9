"""Maintenance of one table: compaction of the small fragments only, indexes kept current and
in use by lancedb's queries, no commit when there is nothing to do. (Cleanup and pins run in
the end-to-end loop: test_loop.py.)"""

from __future__ import annotations

from datetime import timedelta

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from avperception_assets.curation import maintenance
from avperception_assets.storage import tables as storage
from avperception_assets.discovery import vector_index

INDEXES = {"image_id": "BTREE", "split": "BITMAP", "ann_categories": "LABEL_LIST"}
BIG = 40  # rows a compacted fragment holds in these tests


def _rows(first: int, count: int) -> pa.Table:
    ids = range(first, first + count)
    return pa.table({"image_id": [f"f{i:04d}" for i in ids], "split": ["val" if i % 4 == 0 else "train" for i in ids],
                     "ann_categories": [["rider"] if i % 5 == 0 else ["car"] for i in ids]})


def _maintain(table):
    return maintenance.maintain(table, "t", [], older_than=timedelta(hours=1), indexes=INDEXES, fragment_rows=BIG)


def _row_ids(table) -> dict[str, int]:
    got = table.to_lance().to_table(columns=["image_id"], with_row_id=True)
    return dict(zip(got["image_id"].to_pylist(), got["_rowid"].to_pylist()))


def _uses_index(table, where: str) -> bool:
    return "ScalarIndexQuery" in table.search().where(where).explain_plan(True)


@pytest.fixture
def table(tmp_path):
    """Three full fragments, indexed, then three small ones (three batches) on top."""
    table = lancedb.connect(tmp_path).create_table("t", _rows(0, BIG), storage_options=storage.STABLE_ROW_IDS)
    for batch in (1, 2):
        table.add(_rows(batch * BIG, BIG))
    _maintain(table)
    for batch in range(3):
        table.add(_rows(3 * BIG + batch * 5, 5))
    return table


def test_compaction_merges_only_the_small_fragments(table):
    big_files = [f.data_files()[0].path for f in table.to_lance().get_fragments()[:3]]
    row_ids = _row_ids(table)
    stats = _maintain(table)
    fragments = table.to_lance().get_fragments()
    assert (stats.fragments_before, stats.fragments_after, stats.fragments_merged) == (6, 4, 3)
    assert [f.data_files()[0].path for f in fragments[:3]] == big_files  # never rewritten
    assert [f.count_rows() for f in fragments] == [BIG, BIG, BIG, 15]
    assert _row_ids(table) == row_ids  # stable: views and pixel readers still find their rows


def test_indexes_take_the_new_rows_and_stay_in_use(table):
    stats = _maintain(table)
    assert stats.indexes_updated == ["ann_categories", "image_id", "split"]  # 15 new rows >= 10% of 120
    for index in table.list_indices():
        assert table.index_stats(index.name).num_unindexed_rows == 0, index.name
    for where, expected in (("image_id = 'f0132'", 1), ("split = 'val'", 34),
                            ("array_has_any(ann_categories, ['rider'])", 27)):
        assert _uses_index(table, where) and table.count_rows(where) == expected, where


def test_a_btree_waits_for_enough_new_rows_and_nothing_to_do_commits_nothing(table):
    _maintain(table)
    table.add(_rows(200, 2))  # 2 rows < 10% of the 135 the btree holds
    stats = _maintain(table)
    assert stats.indexes_updated == ["ann_categories", "split"]
    assert table.index_stats("image_id_idx").num_unindexed_rows == 2
    assert _uses_index(table, "image_id = 'f0201'") and table.count_rows("image_id = 'f0201'") == 1
    again = _maintain(table)
    assert again.version_after == again.version_before and again.indexes_updated == [] and again.fragments_merged == 0


def _search_rows(first: int, count: int, rng) -> pa.Table:
    vectors = rng.normal(size=(count, 16)).astype("float32")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = range(first, first + count)
    return pa.table({"image_id": [f"f{i:04d}" for i in ids],
                     "scene_description": ["night; 1 rider" if i % 7 == 0 else "daytime; 2 cars" for i in ids],
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 16)})


def test_full_text_and_vector_indexes_are_created_and_kept_current_on_a_geneva_table(tmp_path):
    rng = np.random.default_rng(0)
    table = storage.connect(str(tmp_path)).create_table("t", _search_rows(0, 300, rng), storage_options=storage.STABLE_ROW_IDS)

    def maintain():
        return maintenance.maintain(table, "t", [], older_than=timedelta(hours=1), indexes=maintenance.COLUMN_INDEXES,
                                    fragment_rows=BIG, vector_index_min_rows=256)

    assert set(maintain().indexes_created) == {"image_id", "scene_description", "embedding"}
    table.add(_search_rows(300, 20, rng))
    stats = maintain()
    assert {"scene_description", "embedding"} <= set(stats.indexes_updated)
    for index in table.list_indices():
        if index.columns != ["image_id"]:  # a btree waits for 10% new rows
            assert table.index_stats(index.name).num_unindexed_rows == 0, index.name
    new = table.to_lance().to_table(columns=["embedding"], filter="image_id = 'f0310'")["embedding"][0].values
    assert vector_index.nearest(table, new.to_numpy(), k=1)["image_id"].to_pylist() == ["f0310"]
    riders = table.search("rider", query_type="fts").limit(100).to_arrow()
    assert riders.num_rows == len([i for i in range(320) if i % 7 == 0])
