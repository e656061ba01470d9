"""Embeddings, uniqueness, scene descriptions and search over a real curated table (Geneva
backfills on the session's Ray), and failure modes defined by example."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from PIL import Image

from avperception_assets.curation import columns as curation, udfs as curation_udfs, maintenance
from avperception_assets.model import detector
from avperception_assets import search as search_command
from avperception_assets.discovery import embeddings, search
from avperception_assets.slices import views as slices
from avperception_assets.storage import tables as storage
from avperception_assets.failure_modes.registry import FailureMode, FailureModeError, check_text_queries, get_mode, load_registry
from avperception_assets_tests.conftest import append_rows, build_frames_table, near_duplicate_rows, source_ids, view_ids

FRAMES = 120
SEARCH_COLUMNS = ["scene_description", "dhash", "embedding", "uniqueness"]
CONFIG = curation.CurationConfig(person_area_source=curation.SOURCE_ANNOTATIONS, concurrency=1, modes=())


@dataclass
class SearchDB:
    conn: object
    table: object
    mode: FailureMode  # defined by example: the first night frame of the val split
    original: str  # a daytime frame of batch s1 that new footage holds a re-encoded copy of
    new_footage: dict[str, curation.ColumnStats]  # the second backfill's stats
    view_created: slices.ViewStats
    view_refreshed: slices.ViewStats


@pytest.fixture(scope="module")
def search_db(tmp_path_factory, local_ray) -> SearchDB:
    """120 small synthetic frames curated for search (descriptions, hashes, embeddings,
    uniqueness, the distance of a mode defined by example), the full-text index and the mode's
    val view; then new footage (a re-encoded copy of one frame, a copy of the exemplar) curated
    again and the view refreshed. The mode comes from a user's registry file in a config folder
    that Ray's workers are never told of: what its UDF needs travels with the UDF."""
    conn, _ = build_frames_table(tmp_path_factory.mktemp("search"), [("s1", FRAMES, 11)])
    table = conn.open_table(storage.FRAMES_TABLE)
    frames = _frames(table, ["image_id", "timeofday", "split"])
    exemplar = next(f["image_id"] for f in frames if f["timeofday"] == "night" and f["split"] == "val")
    config_dir = tmp_path_factory.mktemp("config")
    (config_dir / "failure_modes.toml").write_text(
        f'[modes.like_night]\nclasses = ["pedestrian"]\nexemplars = ["{exemplar}"]\nmax_distance = 0.35\n')
    mode = get_mode("like_night", load_registry(config_dir))
    config, columns = replace(CONFIG, modes=(mode,)), [*SEARCH_COLUMNS, mode.distance_column]
    curation.backfill_columns(table, columns, config)
    maintenance.ensure_column_indexes(table, {"scene_description": "FTS"})
    created = slices.refresh_views(conn, [(mode, "val")])["bdd100k_like_night_val"]
    original = next(f["image_id"] for f in frames if f["timeofday"] == "daytime")
    append_rows(table, near_duplicate_rows(table, [(original, 0.9, 60), (exemplar, 1.0, 80)], "new"))
    stats = curation.backfill_columns(table, columns, config)
    refreshed = slices.refresh_views(conn, [(mode, "val")])["bdd100k_like_night_val"]
    return SearchDB(conn, table, mode, original, stats, created, refreshed)


def _frames(table, columns):
    return table.to_lance().to_table(columns=[*columns, "ingest_seq"]).sort_by("ingest_seq").to_pylist()


def test_nearest_neighbours_of_night_rider_frames_are_mostly_night(search_db):
    table = search_db.table
    frames = _frames(table, ["image_id", "timeofday", "ann_categories"])
    night = {f["image_id"] for f in frames if f["timeofday"] == "night"}
    queries = [f["image_id"] for f in frames if f["image_id"] in night and "rider" in (f["ann_categories"] or [])]
    assert queries, "the synthetic batch should hold night frames with a rider"
    hits = [r["image_id"] in night for q in queries for r in search.similar(table, q, k=10).to_pylist()]
    precision, base_rate = float(np.mean(hits)), (len(night) - 1) / (len(frames) - 1)
    print(f"night+rider queries: {len(queries)}; precision@10 night {precision:.2f}, base rate {base_rate:.2f}")
    assert precision >= 0.8 and precision >= base_rate + 0.4


def test_new_footage_is_embedded_alone_and_a_reencoded_copy_finds_its_original(search_db):
    table, stats = search_db.table, search_db.new_footage
    assert stats["embedding"].rows_processed == stats["uniqueness"].rows_processed == 2  # only the new rows
    copy = f"copy-new-0-{search_db.original}"
    assert search.similar(table, copy, k=3)["image_id"][0].as_py() == search_db.original
    [row] = table.to_lance().to_table(columns=["uniqueness"], filter=f"image_id = '{copy}'").to_pylist()
    assert row["uniqueness"] < 0.01


def test_uniqueness_is_the_distance_to_the_nearest_earlier_frame(search_db):
    table = search_db.table
    frames = _frames(table, ["embedding", "uniqueness"])[:FRAMES]  # the first batch, in ingestion order
    vectors = np.array([f["embedding"] for f in frames], dtype=np.float32)
    expected = [curation_udfs.UNIQUENESS_CAP] + [
        min(curation_udfs.UNIQUENESS_CAP, float(1 - (vectors[:i] @ vectors[i]).max())) for i in range(1, len(frames))]
    np.testing.assert_allclose([f["uniqueness"] for f in frames], expected, atol=1e-4)


def test_a_sql_prefilter_and_split_are_respected(search_db):
    table = search_db.table
    query = _frames(table, ["image_id"])[0]["image_id"]
    results = search.similar(table, query, k=50, where="timeofday = 'daytime'", split="train")
    expected = source_ids(search_db.conn, "timeofday = 'daytime' AND split = 'train'")
    assert 0 < results.num_rows <= len(expected)
    assert set(results["image_id"].to_pylist()) <= set(expected) - {query}
    assert results.num_rows == min(50, len(set(expected) - {query}))
    distances = results["_distance"].to_pylist()
    assert distances == sorted(distances)


def test_full_text_finds_frames_by_description(search_db):
    conn, table = search_db.conn, search_db.table
    riders = source_ids(conn, "array_has(ann_categories, 'rider')")
    results = search.describe(table, "rider", k=500)
    assert sorted(results["image_id"].to_pylist()) == riders  # stemmed: 'rider' finds '1 rider' and '2 riders'
    night_riders = search.describe(table, "rider", k=500, where="timeofday = 'night'")
    assert sorted(night_riders["image_id"].to_pylist()) == source_ids(
        conn, "array_has(ann_categories, 'rider') AND timeofday = 'night'")


def test_text_search_needs_clip(search_db):
    table = search_db.table
    with pytest.raises(embeddings.EmbeddingError, match="text tower"):
        search.text(table, "a cyclist at night")


def test_cli_prints_results_and_writes_a_contact_sheet(search_db, monkeypatch, capsys, tmp_path):
    table = search_db.table
    monkeypatch.setenv("AVP_LANCEDB_URI", table.uri.rsplit("/", 1)[0])
    query = _frames(table, ["image_id"])[3]["image_id"]
    sheet = tmp_path / "sheet.png"
    assert search_command.main(["similar", query, "-k", "6", "--split", "val", "--sheet", str(sheet)]) == 0
    out = capsys.readouterr().out
    assert out.count("| val |") == 6 and query not in out.split("\n", 2)[2].split("contact sheet")[0]
    with Image.open(sheet) as image:
        assert image.size == (4 * search.THUMB_SIZE[0], 2 * (search.THUMB_SIZE[1] + 18) + 18)
    assert search_command.main(["similar", "no-such-frame"]) == 2
    assert "no frame 'no-such-frame'" in capsys.readouterr().err


def test_detector_embeddings_and_a_changed_model_refused_unless_recomputed(tmp_path, local_ray):
    conn, _ = build_frames_table(tmp_path, [("d1", 5, 4)])
    table = conn.open_table(storage.FRAMES_TABLE)
    curation.backfill_columns(table, ["embedding"], CONFIG)
    weights = tmp_path / "base.pt"
    torch.manual_seed(0)
    torch.save(detector.build_detector(detector.get_profile("cpu")).state_dict(), weights)
    other = replace(CONFIG, embedding_model=f"detector:{weights}")
    append_rows(table, near_duplicate_rows(table, [(_frames(table, ["image_id"])[0]["image_id"], 1.0, 70)], "more"))
    with pytest.raises(curation.CurationError, match=r"recompute=\['embedding'\]"):
        curation.backfill_columns(table, ["embedding"], other)
    recompute = replace(other, recompute=("embedding",))
    # dhash shares the embedding's job; is_duplicate and uniqueness read them.
    assert recompute.recompute == ("dhash", "is_duplicate", "embedding", "uniqueness")
    stats = curation.backfill_columns(table, ["embedding"], recompute)
    assert stats["embedding"].rows_processed == 6 and stats["embedding"].coverage == 1.0
    assert stats["embedding"].params["model"].startswith("detector:base.pt@")
    vectors = np.array(table.to_lance().to_table(columns=["embedding"])["embedding"].to_pylist())
    assert vectors.shape == (6, embeddings.FPN_CHANNELS)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_a_mode_defined_by_example_refreshes_its_views_incrementally(search_db):
    conn, mode = search_db.conn, search_db.mode
    assert search_db.view_created.created and search_db.view_created.row_count > 0
    assert search_db.new_footage[mode.distance_column].rows_processed == 2
    new_in_view = source_ids(conn, f"batch_id = 'new' AND {slices.view_filter(mode, 'val')}")
    again = search_db.view_refreshed
    assert len(new_in_view) == 1  # the exemplar's copy (the other copy is of a daytime frame)
    assert not again.created and again.rows_added == 1 and again.rows_removed == 0
    view = slices.open_view(conn, "bdd100k_like_night_val")
    assert view_ids(view) == source_ids(conn, slices.view_filter(mode, "val"))
    assert "embedding" not in view.schema.names  # views keep no vectors (nor pixels)


def test_a_mode_by_example_needs_known_exemplars(search_db):
    table = search_db.table
    mode = FailureMode("ghosts", "timeofday = 'night'", ("pedestrian",), exemplars=("no-such-frame",), max_distance=0.2)
    with pytest.raises(curation.CurationError, match="ghosts.*no-such-frame"):
        curation.backfill_columns(table, ["ghosts_distance"], replace(CONFIG, modes=(mode,)))


# --- no table ----------------------------------------------------------------------------------


def test_modes_by_example_are_checked_when_defined():
    mode = FailureMode("looks_like", "weather = 'rainy'", ("rider",), exemplars=("a", "b"), max_distance=0.3)
    assert mode.distance_column == "looks_like_distance" and mode.curation_columns == ("looks_like_distance",)
    assert mode.where == "looks_like_distance <= 0.3 AND (weather = 'rainy')"
    needs_clip = FailureMode("needs_clip", "", ("rider",), text_query="a cyclist at dusk", max_distance=0.3)
    with pytest.raises(FailureModeError, match="'needs_clip'.*CLIP"):
        check_text_queries([needs_clip], "color_layout")
    with pytest.raises(FailureModeError, match="'far'.*max_distance"):
        FailureMode("far", "", ("rider",), exemplars=("a",), max_distance=3)
    with pytest.raises(FailureModeError, match="'both'"):
        FailureMode("both", "", ("rider",), exemplars=("a",), text_query="x", max_distance=0.2)


def test_scene_description():
    text = curation_udfs.scene_description("night", "rainy", "city street",
                                           ["car", "pedestrian", "rider", "car", "pedestrian", "car"])
    assert text == "night, rainy, city street; 2 pedestrians, 1 rider, 3 cars"
    assert curation_udfs.scene_description("undefined", None, "highway", []) == "highway; no objects"


def test_unknown_embedding_models_are_clear_errors(tmp_path):
    with pytest.raises(embeddings.EmbeddingError, match="expected 'color_layout'"):
        embeddings.resolve("resnet")
    with pytest.raises(embeddings.EmbeddingError, match="no state_dict file"):
        embeddings.resolve(f"detector:{tmp_path / 'missing.pt'}")
    with pytest.raises(embeddings.EmbeddingError, match="downloads nothing"):
        embeddings.resolve("clip:ViT-B-32:laion2b_s34b_b79k")


def _tiny_clip_folder(root, seed: int = 0) -> str:
    """An OpenCLIP model folder as the hub holds one (config and safetensors weights), with a
    tiny random model: the real loading path, without weights that cannot be downloaded here."""
    import json

    import open_clip
    from safetensors.torch import save_file

    folder = root / "tiny-clip"
    folder.mkdir(parents=True)
    model_cfg = {"embed_dim": 32,
                 "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return str(folder)


def test_clip_from_a_local_folder_embeds_frames_and_text_and_enables_text_modes(tmp_path, local_ray):
    spec = f"clip:{_tiny_clip_folder(tmp_path)}"
    model = embeddings.resolve(spec)
    assert model.has_text_tower and model.dim == 32 and model.label.startswith("clip:dir:tiny-clip@")
    conn, _ = build_frames_table(tmp_path, [("c1", 4, 2)])
    table = conn.open_table(storage.FRAMES_TABLE)
    stats = curation.backfill_columns(table, ["embedding"], replace(CONFIG, embedding_model=spec))
    assert stats["embedding"].coverage == 1.0 and stats["embedding"].params == {"model": model.label, "dim": 32}
    results = search.text(table, "a cyclist at night", k=3, model=spec)
    assert results.num_rows == 3 and results["_distance"].to_pylist() == sorted(results["_distance"].to_pylist())
    other = f"clip:{_tiny_clip_folder(tmp_path / 'other', seed=1)}"  # same name, other weights
    with pytest.raises(search.SearchError, match="computed with clip:dir:tiny-clip@"):
        search.text(table, "a cyclist at night", model=other)
    mode = FailureMode("dusk_cyclists", "", ("rider",), text_query="a cyclist at dusk", max_distance=0.5)
    check_text_queries([mode], spec)  # the workspace's CLIP has the text tower
    assert mode.where == "dusk_cyclists_distance <= 0.5"


@pytest.mark.dagster_run
def test_frame_search_job_shows_results_and_contact_sheet(search_db, data_dir):
    from avperception_assets.defs.resources import WorkspaceResource
    from avperception_assets.defs.search_jobs import frame_search

    table = search_db.table
    resources = {"workspace": WorkspaceResource(data_location=str(data_dir), lancedb_uri=table.uri.rsplit("/", 1)[0])}
    config = {"ops": {"search_frames": {"config": {"kind": "describe", "query": "rider", "k": 5, "split": "val"}}}}
    result = frame_search.execute_in_process(run_config=config, resources=resources)
    output = result.output_for_node("search_frames")
    [event] = [e for e in result.all_node_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = event.step_output_data.metadata
    assert metadata["frames"].value == len(output["image_ids"]) > 0
    assert "data:image/png;base64," in metadata["contact_sheet"].value
    assert all(image_id in metadata["results"].value for image_id in output["image_ids"])
    assert output["contact_sheet"] == str(data_dir / "reports" / "search" / f"{result.run_id}.png")
    bad = {"ops": {"search_frames": {"config": {"kind": "similar", "query": "no-such-frame"}}}}
    failed = frame_search.execute_in_process(run_config=bad, resources=resources, raise_on_error=False)
    assert not failed.success and "no frame 'no-such-frame'" in str(failed.failure_data_for_node("search_frames").error)
