"""Geneva 0.17 mended inside Ray's workers: a view refresh over a source with stable row ids
copies only what is new or moved, not the whole view, and still finds every new row."""

import sys

import lance
import pyarrow as pa

from avperception_assets.patches import geneva as geneva_workarounds
from avperception_assets.storage import tables as storage

FILTER = "split = 'train' AND x >= 10"


def frames(start: int, n: int) -> pa.Table:
    ids = range(start, start + n)
    return pa.table({"frame_id": [f"f{i}" for i in ids], "split": ["train" if i % 2 else "val" for i in ids],
                     "x": pa.array([float(i) for i in ids], pa.float32())})


def expected(n: int) -> dict[str, float]:
    return {f"f{i}": float(i) for i in range(n) if i % 2 and i >= 10}


def view_rows(view) -> dict[str, float]:
    view.checkout_latest()
    rows = view.to_arrow()
    return dict(zip(rows["frame_id"].to_pylist(), rows["x"].to_pylist()))


def data_files(view) -> dict[int, tuple[str, ...]]:
    view.checkout_latest()
    return {f.fragment_id: tuple(d.path for d in f.data_files()) for f in view.to_lance().get_fragments()}


def refresh(view, source) -> None:
    storage.release_job_tracker(view.refresh(src_version=source.version, concurrency=1).job_id)


def test_source_fragments_of_follows_rows_through_compaction(tmp_path):
    dataset = lance.write_dataset(frames(0, 6), tmp_path / "t.lance", max_rows_per_file=2, enable_stable_row_ids=True)
    lookup = geneva_workarounds.source_fragments_of(dataset)
    assert lookup([0, 1]) == {0} and lookup([1, 4]) == {0, 2} and lookup([]) == set()
    dataset.delete("frame_id = 'f5'")
    dataset.optimize.compact_files(target_rows_per_fragment=100)
    lookup = geneva_workarounds.source_fragments_of(lance.dataset(tmp_path / "t.lance"))
    (fragment,) = lookup([0, 4])
    assert fragment > 2 and lookup([5, 99]) == set()  # deleted and unknown ids hold no fragment


def test_a_refresh_copies_only_new_rows_and_rows_a_compaction_moved(tmp_path, local_ray):
    conn = storage.connect(str(tmp_path))
    source = conn.create_table("frames", frames(0, 200), storage_options=storage.STABLE_ROW_IDS)
    view = conn.create_materialized_view(
        "train_view", source.search().select({"frame_id": "frame_id", "x": "coalesce(x)"}).where(FILTER))
    refresh(view, source)
    source.add(frames(200, 50))
    first = data_files(view)
    refresh(view, source)
    second = data_files(view)
    assert {f: second[f] for f in first} == first  # unmended, Geneva 0.17 rewrote fragment 0 here
    assert len(second) == len(first) + 1 and view_rows(view) == expected(250)

    # Compaction, as maintenance runs it before the views refresh: the small fragments (the last
    # batch and a new one) merge, so new rows land in a fragment the view draws from, while the
    # big first fragment stays as it was. The new rows are found; only the moved ones are copied.
    source.add(frames(250, 50))
    lance.dataset(source.to_lance().uri).optimize.compact_files(target_rows_per_fragment=150)
    source.checkout_latest()
    assert [f.count_rows() for f in source.to_lance().get_fragments()] == [200, 100]
    refresh(view, source)
    third = data_files(view)
    assert third[0] == first[0] and all(third[f] != second[f] for f in second if f not in first)
    assert view_rows(view) == expected(300)


def test_a_patch_waits_for_its_module_and_applies_once(tmp_path, monkeypatch):
    (tmp_path / "late_module.py").write_text("value = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    geneva_workarounds.patch_on_import("late_module", seen.append)
    geneva_workarounds.patch_on_import("late_module", seen.append)  # a second setup of one worker
    assert not seen
    import late_module

    assert seen == [late_module] and late_module.__loader__.get_source("late_module") == "value = 1\n"
    geneva_workarounds.patch_on_import("late_module", lambda module: seen.append("now"))
    assert seen == [late_module, "now"]
    del sys.modules["late_module"]
