"""Leaks between splits: near-duplicate frame pairs with one frame in one split and the other in
another (train and val). Splits are decided by clip, so the frames of one clip, alike by nature,
never straddle them: any pair found is a scene seen in training and scored in evaluation.

Pairs are found two ways: by dhash, within the Hamming distance `is_duplicate` uses (the same
picture, re-encoded or barely changed), and by embedding, within `LEAK_COSINE_DISTANCE` (the same
scene a moment apart). The cost follows the selected rows (a run's: its new frames): only pairs
with at least one selected frame are searched, each selected frame against the other splits'
frames: their dhashes as arrays (16 bytes a frame, like `is_duplicate`'s references) and their
embeddings by a LanceDB vector search prefiltered on the split (like `uniqueness`).

Nothing here knows about Dagster.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from avperception_assets.curation.udfs import hamming, near_hashes
from avperception_assets.discovery.vector_index import nearest_each, vectors_matrix
from avperception_assets.storage.tables import CLIP_ID, and_where, sql_list

# Cosine distance within which two frames' embeddings are one scene. Measured with the default
# `color_layout` model on synthetic footage: consecutive frames of a clip lie at most 0.012 apart
# (median 0.002; 30 clips of 20 frames at 640x360, and the demo's 4 clips of 15 at 1280x720),
# frames of different clips or scenes at least 0.076 (275,000 pairs at 640x360) and 0.054
# (the demo's 1,000 detection frames: 560,000 pairs); a 1-pixel change lies 0.0001 from its
# original. The nearest different scenes come nearer as pairs grow, the consecutive frames do
# not, so the threshold sits nearer these: 1.6 times their largest distance.
LEAK_COSINE_DISTANCE = 0.02
# Neighbours searched per frame by embedding: a frame's pairs beyond them are not counted (a
# leak is found all the same), so one query a batch of frames stays bounded.
LEAK_NEIGHBOURS = 10
WORST_PAIRS = 10
_QUERY_BATCH = 256  # frames per vector query


@dataclass(frozen=True)
class Pairs:
    """Cross-split pairs as ingest seqs (`first` < `second`, each pair once) and their distances."""

    first: np.ndarray
    second: np.ndarray
    distance: np.ndarray

    @staticmethod
    def of(a, b, distance) -> Pairs:
        """The pairs (a[i], b[i]) in either order, each once, at its smallest distance."""
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        first, second, distance = np.minimum(a, b), np.maximum(a, b), np.asarray(distance, dtype=np.float64)
        order = np.lexsort((distance, second, first))
        first, second, distance = first[order], second[order], distance[order]
        keep = np.ones(len(first), dtype=bool)
        keep[1:] = (first[1:] != first[:-1]) | (second[1:] != second[:-1])
        return Pairs(first[keep], second[keep], distance[keep])

    def __len__(self) -> int:
        return len(self.first)

    def keys(self) -> set[tuple[int, int]]:
        return set(zip(self.first.tolist(), self.second.tolist()))

    def worst(self, n: int) -> Pairs:
        order = np.argsort(self.distance, kind="stable")[:n]
        return Pairs(self.first[order], self.second[order], self.distance[order])


def _concat(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Pairs:
    if not parts:
        return Pairs.of([], [], [])
    return Pairs.of(*(np.concatenate(column) for column in zip(*parts)))


def _selected(table, where: str | None, columns: list[str]) -> pa.Table:
    return table.to_lance().to_table(columns=["ingest_seq", "split", *columns],
                                     filter=and_where(" AND ".join(f"{c} IS NOT NULL" for c in columns), where))


def _other_splits(split: str) -> str:
    return f"split <> {sql_list([split])}"


def dhash_pairs(table, where: str | None, threshold: int) -> Pairs:
    """Pairs of frames in different splits, one among those `where` selects, within `threshold`
    bits of each other's dhash."""
    selected, parts = _selected(table, where, ["dhash"]), []
    for split in pc.unique(selected["split"]).to_pylist():
        mine = selected.filter(pc.equal(selected["split"], split))
        hashes, seqs = mine["dhash"].to_numpy().astype(np.uint64), mine["ingest_seq"].to_numpy()
        others = table.to_lance().to_table(columns=["dhash", "ingest_seq"],
                                           filter=and_where("dhash IS NOT NULL", _other_splits(split)))
        ref_hashes, ref_seqs = others["dhash"].to_numpy().astype(np.uint64), others["ingest_seq"].to_numpy()
        rows, cols, distances = near_hashes(hashes, ref_hashes, threshold)
        parts.append((seqs[rows], ref_seqs[cols], distances))
    return _concat(parts)


def embedding_pairs(table, where: str | None, max_distance: float = LEAK_COSINE_DISTANCE,
                    neighbours: int = LEAK_NEIGHBOURS) -> Pairs:
    """Pairs of frames in different splits, one among those `where` selects, whose embeddings lie
    within `max_distance` (cosine); each selected frame's `neighbours` nearest in the other splits
    are searched."""
    selected, parts = _selected(table, where, ["embedding"]), []
    for split in pc.unique(selected["split"]).to_pylist():
        mine = selected.filter(pc.equal(selected["split"], split))
        vectors, seqs = vectors_matrix(mine["embedding"]), mine["ingest_seq"].to_numpy()
        for start in range(0, len(seqs), _QUERY_BATCH):
            found = nearest_each(table, vectors[start:start + _QUERY_BATCH], k=neighbours,
                                 where=_other_splits(split), columns=["ingest_seq"])
            near = found.filter(pc.less_equal(found["_distance"], max_distance))
            queries = near["query_index"].to_numpy().astype(np.int64)
            parts.append((seqs[start:start + _QUERY_BATCH][queries], near["ingest_seq"].to_numpy(),
                          near["_distance"].to_numpy()))
    return _concat(parts)


def _frames(table, seqs: set[int]) -> dict[int, dict]:
    """image id, clip id, split, dhash and embedding of the frames with these ingest seqs (a few)."""
    if not seqs:
        return {}
    columns = ["ingest_seq", "image_id", "split", "dhash", "embedding",
               *([CLIP_ID] if CLIP_ID in table.schema.names else [])]
    rows = table.to_lance().to_table(columns=columns, filter=f"ingest_seq IN ({', '.join(map(str, sorted(seqs)))})")
    return {row["ingest_seq"]: row for row in rows.to_pylist()}


def _described(first: dict, second: dict) -> dict:
    """One pair as metadata: both frames, their dhashes' Hamming distance and embeddings' cosine distance."""
    bits = int(hamming(np.uint64(first["dhash"]), np.uint64(second["dhash"])))
    vectors = (first["embedding"], second["embedding"])
    cosine = None if None in vectors else round(1.0 - float(np.dot(*vectors)), 6)
    frame = lambda row: {"image_id": row["image_id"], "clip_id": row.get(CLIP_ID), "split": row["split"]}  # noqa: E731
    return {"frames": [frame(first), frame(second)], "dhash_bits": bits, "cosine_distance": cosine}


def _nearest_first(pair: dict) -> tuple:
    cosine = pair["cosine_distance"]
    return (np.inf if cosine is None else cosine, pair["dhash_bits"], pair["frames"][0]["image_id"])


@dataclass(frozen=True)
class Leaks:
    """What a leak search found among the pairs with a selected frame."""

    rows_checked: int
    hamming_threshold: int
    by_dhash: Pairs
    by_embedding: Pairs
    worst: list[dict]  # up to WORST_PAIRS pairs, nearest first (by cosine, then dhash distance)

    @property
    def pairs(self) -> int:
        """Pairs found either way, each once."""
        return len(self.by_dhash.keys() | self.by_embedding.keys())

    def as_metadata(self) -> dict:
        return {"rows_checked": self.rows_checked, "leak_pairs": self.pairs, "pairs_by_dhash": len(self.by_dhash),
                "pairs_by_embedding": len(self.by_embedding), "hamming_threshold": self.hamming_threshold,
                "cosine_distance_threshold": LEAK_COSINE_DISTANCE, "embedding_neighbours_searched": LEAK_NEIGHBOURS,
                "worst_pairs": self.worst}


def find_leaks(table, where: str | None, hamming_threshold: int) -> Leaks:
    """Near-duplicate pairs across splits with at least one frame among those `where` selects
    (None: every frame), by dhash and by embedding, and the worst of them described."""
    by_dhash, by_embedding = dhash_pairs(table, where, hamming_threshold), embedding_pairs(table, where)
    candidates = {*by_dhash.worst(WORST_PAIRS).keys(), *by_embedding.worst(WORST_PAIRS).keys()}
    frames = _frames(table, {seq for pair in candidates for seq in pair})
    described = [_described(frames[a], frames[b]) for a, b in candidates]
    worst = sorted(described, key=_nearest_first)
    return Leaks(table.count_rows(and_where("dhash IS NOT NULL AND embedding IS NOT NULL", where)), hamming_threshold,
                 by_dhash, by_embedding, worst[:WORST_PAIRS])
