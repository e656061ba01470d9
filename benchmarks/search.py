"""Similarity search over image embeddings: the IVF_PQ index (`vector_index.nearest`) against
exact search, on a table of synthesised CLIP-like vectors.

The vectors are not uniform noise (on which every neighbour is equally far and an index has
nothing to find): they are draws from a mixture of `--clusters` Gaussian clusters of unequal
weight (lognormal) and spread, whose centres share a common direction as CLIP embeddings do,
normalised to the unit sphere (printed: the mean cosine of two queries, ~0.3, and of a query
and its nearest row, ~0.8). The clusters are isotropic, so a query's neighbours in its cluster
are almost equally far (the 10th and 11th differ by ~0.0004 in cosine): harder for PQ's coarse
distances than real embeddings, whose clusters are not round.

The table is written in 4,096-row fragments (as maintenance leaves the frames table, with
stable row ids) and indexed by `ensure_vector_index`; a table already in `--root` is reused.
Queries are fresh draws from the same mixture. Figures: the index build (first run), p50/p95
latency of `--queries` searches (k=10) with the index and exact (lancedb's flat search),
recall@10 of the index against exact search; then 2,000 rows are appended, `ensure_vector_index`
brings the index up to date (timed), the appended rows are searched for, and the table is
restored to its version before the append.
Targets: recall@10 >= 0.95; index p50 <= 0.5x exact p50; index p50 <= 50 ms.

First, embedding throughput: `--frames` 1280x720 JPEGs (synthetic footage, or the frames of a
table `benchmarks/scale.py` left, `--frames-from <its root>/20000/lancedb`) embedded by the
configured model (`AVP_EMBEDDING_MODEL`, default the offline `color_layout`) in one process, next
to the dhash of the same frames (decode and hash, what the `dhash` curation column does) in the
same run. No target: the figures say what an embedding costs beside the decode every frame pays.

    .venv/bin/python benchmarks/search.py [--root DIR] [--rows 200000] [--dim 512] [--frames 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lancedb  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from avperception_assets.curation import udfs as curation_udfs
from avperception_assets.discovery import embeddings
from avperception_assets.storage import tables as storage
from avperception_assets import synthetic
from avperception_assets.workspace import Workspace
from avperception_assets.curation.maintenance import FRAGMENT_ROWS
from avperception_assets.discovery.vector_index import METRIC, VECTOR_COLUMN, ensure_vector_index, nearest
from targets import target  # noqa: E402

K = 10
APPENDED = 2000


class Mixture:
    """Unit vectors drawn around `clusters` centres that share one direction (seeded)."""

    def __init__(self, dim: int, clusters: int, seed: int):
        rng = np.random.default_rng(seed)
        shared = rng.standard_normal(dim)
        self.centres = 0.8 * shared / np.linalg.norm(shared) + rng.standard_normal((clusters, dim)) / np.sqrt(dim)
        self.spread = rng.uniform(0.5, 1.0, clusters)  # two vectors of one cluster: cosine ~0.6-0.9
        weights = rng.lognormal(0.0, 1.0, clusters)
        self.weights = weights / weights.sum()

    def draw(self, rows: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        which = rng.choice(len(self.weights), rows, p=self.weights)
        noise = rng.standard_normal((rows, self.centres.shape[1])) / np.sqrt(self.centres.shape[1])
        vectors = self.centres[which] + self.spread[which, None] * noise
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def rows_table(first: int, vectors: np.ndarray) -> pa.Table:
    ids = [f"img-{i:08d}" for i in range(first, first + len(vectors))]
    return pa.table({"image_id": ids, VECTOR_COLUMN: curation_udfs.vectors_array(vectors, vectors.shape[1])})


def open_or_build(root: Path, mixture: Mixture, rows: int, dim: int):
    conn = lancedb.connect(root)
    if storage.table_exists(conn, storage.FRAMES_TABLE):
        table = conn.open_table(storage.FRAMES_TABLE)
        found = (table.count_rows(), table.schema.field(VECTOR_COLUMN).type.list_size)
        if found != (rows, dim):
            sys.exit(f"{root} holds a table of {found[0]} rows of dimension {found[1]}, not {rows} x {dim}: "
                     "use another --root")
        print(f"table: reused {rows} rows x {dim} from {root}")
    else:
        started = time.perf_counter()
        table = None
        for first in range(0, rows, FRAGMENT_ROWS):
            batch = rows_table(first, mixture.draw(min(FRAGMENT_ROWS, rows - first), seed=first + 1))
            if table is None:
                table = conn.create_table(storage.FRAMES_TABLE, batch, storage_options=storage.STABLE_ROW_IDS)
            else:
                table.add(batch)
        print(f"table: wrote {rows} rows x {dim} to {root} in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    outcome = ensure_vector_index(table)
    print(f"ensure_vector_index: {outcome} in {time.perf_counter() - started:.1f} s")
    return table


def exact(table, query: np.ndarray) -> pa.Table:
    search = table.search(query, vector_column_name=VECTOR_COLUMN).distance_type(METRIC)
    return search.bypass_vector_index().limit(K).select(["image_id", "_distance"]).to_arrow()


def timed(search, queries: np.ndarray) -> tuple[list[pa.Table], list[float]]:
    results, seconds = [], []
    for query in queries:
        started = time.perf_counter()
        results.append(search(query))
        seconds.append(time.perf_counter() - started)
    return results, seconds


def ms(seconds: list[float], q: int) -> float:
    return 1000 * float(np.percentile(seconds, q))


def recall(found: list[pa.Table], truth: list[pa.Table]) -> float:
    hits = [len(set(f["image_id"].to_pylist()) & set(t["image_id"].to_pylist())) for f, t in zip(found, truth)]
    return sum(hits) / (K * len(truth))


def update_figures(table, mixture: Mixture, rows: int) -> None:
    """Append rows, bring the index up to date, find them; then undo the append."""
    version = table.version
    vectors = mixture.draw(APPENDED, seed=rows + 1)
    table.add(rows_table(rows, vectors))
    started = time.perf_counter()
    outcome = ensure_vector_index(table)
    seconds = time.perf_counter() - started
    [index] = table.list_indices()
    stats = table.index_stats(index.name)
    found = sum(nearest(table, vectors[i], k=1, columns=["image_id"])["image_id"][0].as_py() == f"img-{rows + i:08d}"
                for i in range(0, APPENDED, APPENDED // 100))
    print(f"after appending {APPENDED} rows: ensure_vector_index {outcome} in {seconds:.1f} s "
          f"({stats.num_indexed_rows} indexed, {stats.num_unindexed_rows} unindexed); "
          f"appended rows found as their own nearest: {found}/100")
    table.restore(version)


def sample_frames(count: int, frames_from: Path | None) -> list[bytes]:
    if frames_from is not None:
        table = lancedb.connect(frames_from).open_table(storage.FRAMES_TABLE)
        return table.to_lance().head(count, columns=["image_bytes"])["image_bytes"].to_pylist()
    return [synthetic.synth_frame("bench", 0, i, 0.2, 1280, 720)[1] for i in range(count)]


def embedding_throughput(frames: list[bytes]) -> None:
    """Frames/s of the configured embedding model and of the dhash of the same frames, one process."""
    model = embeddings.resolve(Workspace.from_env().embedding_model)
    embedder = embeddings.load(model)
    embedder.embed_images(frames[:2])  # load and warm
    started = time.perf_counter()
    for first in range(0, len(frames), 16):  # the curation UDF's batch size
        embedder.embed_images(frames[first:first + 16])
    embed_fps = len(frames) / (time.perf_counter() - started)
    started = time.perf_counter()
    for frame in frames:
        curation_udfs.dhash(frame)
    dhash_fps = len(frames) / (time.perf_counter() - started)
    print(f"embedding ({model.label}, dim {model.dim}): {embed_fps:.1f} frames/s; dhash (decode + hash) of the "
          f"same {len(frames)} frames: {dhash_fps:.1f} frames/s; ratio {embed_fps / dhash_fps:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="table folder (default: a new temp dir)")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=3000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--frames", type=int, default=300, help="frames for the embedding throughput")
    parser.add_argument("--frames-from", type=Path, default=None, help="a LanceDB folder holding bdd100k")
    args = parser.parse_args(argv)
    embedding_throughput(sample_frames(args.frames, args.frames_from))
    root = args.root or Path(tempfile.mkdtemp(prefix="avp-search-"))
    mixture = Mixture(args.dim, args.clusters, seed=0)
    table = open_or_build(root, mixture, args.rows, args.dim)
    queries = mixture.draw(args.queries, seed=10**9)
    nearest(table, queries[0]), exact(table, queries[0])  # warm the index and the page cache
    found, index_s = timed(lambda q: nearest(table, q, k=K, columns=["image_id"]), queries)
    truth, exact_s = timed(lambda q: exact(table, q), queries)
    print(f"index search: p50 {ms(index_s, 50):.1f} ms, p95 {ms(index_s, 95):.1f} ms ({args.queries} queries, k={K})")
    print(f"exact search: p50 {ms(exact_s, 50):.1f} ms, p95 {ms(exact_s, 95):.1f} ms")
    print(f"recall@{K} of the index against exact search: {recall(found, truth):.3f}")
    pairs = queries[: len(queries) // 2] @ queries[len(queries) // 2:].T
    nearest_cos = [1 - t["_distance"][0].as_py() for t in truth]
    print(f"mixture: cosine of two queries {pairs.mean():.2f} (mean), of a query and its nearest row "
          f"{np.median(nearest_cos):.2f} (median)")
    update_figures(table, mixture, args.rows)
    target("recall_at_10", recall(found, truth), ">=", 0.95, digits=3)
    target("index_p50_vs_exact", statistics.median(index_s) / statistics.median(exact_s), "<=", 0.5)
    target("index_p50_ms", ms(index_s, 50), "<=", 50, unit=" ms", digits=1)


if __name__ == "__main__":
    main()
