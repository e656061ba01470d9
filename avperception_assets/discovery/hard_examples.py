"""Hard-example mining: how hard each train frame is for the model a fine-tune starts from, and
the weighted order that shows hard frames (and their look-alikes) more often.

Difficulty is `frame_errors`' on the mode's classes: misses, confident false positives and
weakly found objects of the starting model on the frame. Scores live in `<mode>_difficulty`,
one row per frame and model, keyed by `model_key` (the weights' content digest and the input
size), so new footage scores only its new frames and another starting model rescores the view.

A frame's weight is 1 + `boost` × its difficulty. With `neighbors`, the hardest train frames
(`query_fraction` of those with any difficulty) become similarity queries over the train
view's own embeddings: each of their `neighbors` nearest train frames gains half the query's
boost. Val frames and the train view's selection share (`loader.ViewRef.share`: the frames
held out to choose the best epoch) never feed training: they are neither scored nor queried nor
returned. The trainer takes the weights (`training.train(..., sample_weights=...)`) with
`Mining.as_dict()` as the recipe's record of them; the checkpoint folder keeps both, so
`reproduce` rebuilds each epoch's draws, and maintenance keeps the scores table at its recorded
version.

CLI, for a mined checkpoint folder written up to c618fc9 (it kept only the record):
`python -m avperception_assets.discovery.hard_examples weights <checkpoint dir>` rebuilds its
weights from the scores at the recorded version, so that `reproduce` can read them.

Nothing here knows about Dagster.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from avperception_assets.model import checkpoints, loader
from avperception_assets.model.recipe import Recipe
from avperception_assets.storage import tables as storage
from avperception_assets.model.detections import coco_category_names, mode_class_ids, predict
from avperception_assets.evaluation.frame_errors import match_frame
from avperception_assets.storage.pixels import PixelReader
from avperception_assets.storage.tables import DIFFICULTY_SUFFIX
from avperception_assets.discovery.vector_index import VECTOR_COLUMN, vectors_matrix

NEIGHBOR_SHARE = 0.5  # a look-alike of a hard frame gains this share of the hard frame's boost

SCHEMA = pa.schema([
    pa.field("image_id", pa.string()), pa.field("model", pa.string()), pa.field("difficulty", pa.int32()),
    pa.field("gt", pa.int32()), pa.field("misses", pa.int32()), pa.field("confident_fp", pa.int32()),
    pa.field("weak_tp", pa.int32())])


def table_name(mode: str) -> str:
    return f"{mode}{DIFFICULTY_SUFFIX}"


def model_key(weights_digest: str, min_size: int, max_size: int) -> str:
    """Which model produced a score: its weights' content and the input size it ran at."""
    return f"{weights_digest}@{min_size}x{max_size}"


@dataclass(frozen=True)
class ScoreStats:
    table: str
    version: int
    model: str
    scored: int  # frames scored in this call
    already_scored: int  # frames of the view that had a score under this model


def _unscored(table, view: loader.ViewRef, key: str) -> tuple[list[str], int]:
    """The view's frames without a score under `key`, and how many have one."""
    ids = loader.image_ids(view)
    done = set(table.to_lance().to_table(columns=["image_id"], filter=f"model = '{key}'")["image_id"].to_pylist())
    todo = [i for i in ids if i not in done]
    return todo, len(ids) - len(todo)


def _batches(view: loader.ViewRef, image_ids: Sequence[str], batch_size: int):
    """The frames `image_ids` of the view, decoded, in one scan (pixels taken for them only)."""
    table = loader.open_table(view.uri, view.name, view.version)
    pixels, collate = PixelReader.of(view.uri, table), loader.DecodeCollate()
    wanted = pa.array(list(image_ids), type=pa.string())
    for batch in table.to_lance().to_batches(columns=pixels.columns(loader.read_columns(table)), filter=view.where,
                                             batch_size=batch_size):
        batch = batch.filter(pc.is_in(batch["image_id"], value_set=wanted))
        if batch.num_rows:
            yield collate(pixels.attach(batch))


def score_view(conn, mode: str, view: loader.ViewRef, classes: Sequence[str], model, key: str, *,
               batch_size: int = 8, log: Callable[[str], None] | None = None) -> ScoreStats:
    """Score every frame of `view` that has no difficulty under `key` yet, with `model`, and
    append the scores to `<mode>_difficulty` in one commit."""
    table = storage.open_or_create(conn, table_name(mode), SCHEMA)
    todo, already = _unscored(table, view, key)
    if log:
        log(f"{view.name}@{view.version}: scoring {len(todo)} new frames with {key} ({already} already scored)")
    class_ids, names, rows = list(mode_class_ids(classes)), coco_category_names(), []
    for images, targets, image_ids in _batches(view, todo, batch_size) if todo else ():
        for prediction, target, image_id in zip(predict(model, images), targets, image_ids):
            frame = match_frame(prediction, target, names)
            counts = frame.total(class_ids)
            rows.append({"image_id": image_id, "model": key, "difficulty": frame.difficulty(class_ids),
                         "gt": counts.gt, "misses": counts.misses, "confident_fp": counts.confident_fp,
                         "weak_tp": counts.weak_tp})
    if rows:
        table.add(pa.Table.from_pylist(rows, schema=SCHEMA))
    return ScoreStats(table.name, table.version, key, len(rows), already)


@dataclass(frozen=True)
class Mining:
    """What a weighted fine-tune sampled by: the scores (table, version, model) and the weighting."""

    table: str
    version: int
    model: str
    boost: float = 1.0
    neighbors: int = 0
    query_fraction: float = 0.1

    def as_dict(self) -> dict:
        return asdict(self)


def difficulties(uri: str, mining: Mining) -> dict[str, int]:
    table = loader.open_table(uri, mining.table, mining.version)
    scores = table.to_lance().to_table(columns=["image_id", "difficulty"], filter=f"model = '{mining.model}'")
    return dict(zip(scores["image_id"].to_pylist(), scores["difficulty"].to_pylist()))


def _neighbors(view: loader.ViewRef, image_ids: list[str], queries: list[int], k: int) -> np.ndarray:
    """For each query position, the positions of its `k` nearest frames among `image_ids`
    (cosine on unit embeddings, the frame itself excluded), embeddings from the frames table."""
    table = loader.open_table(view.uri, view.name, view.version)
    pixels = PixelReader.of(view.uri, table)
    columns = pixels.columns(["image_id", VECTOR_COLUMN], VECTOR_COLUMN)
    rows = table.to_lance().to_table(columns=columns, filter=view.where)
    rows = pixels.attach(rows.combine_chunks().to_batches()[0], VECTOR_COLUMN)
    by_id = dict(zip(rows["image_id"].to_pylist(), range(rows.num_rows)))
    vectors = vectors_matrix(rows[VECTOR_COLUMN])[[by_id[i] for i in image_ids]]
    similarity = vectors[queries] @ vectors.T
    similarity[np.arange(len(queries)), queries] = -np.inf
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def frame_weights(view: loader.ViewRef, mining: Mining) -> dict[str, float]:
    """The sampling weight of every frame of `view`, by image id."""
    image_ids, scores = loader.image_ids(view), difficulties(view.uri, mining)
    missing = [i for i in image_ids if i not in scores]
    if missing:
        raise ValueError(f"{len(missing)} frames of {view.name}@{view.version} have no difficulty under "
                         f"{mining.model} in {mining.table}@{mining.version} (e.g. {missing[:3]}); score the view first")
    difficulty = np.array([scores[i] for i in image_ids], dtype=np.float64)
    weights = 1.0 + mining.boost * difficulty
    hard = np.flatnonzero(difficulty > 0)
    if mining.neighbors and len(hard) and len(image_ids) > 1:
        count = max(1, int(np.ceil(mining.query_fraction * len(hard))))
        queries = hard[np.argsort(-difficulty[hard], kind="stable")[:count]]
        nearest = _neighbors(view, image_ids, queries.tolist(), min(mining.neighbors, len(image_ids) - 1))
        for query, found in zip(queries, nearest):
            weights[found] += NEIGHBOR_SHARE * mining.boost * difficulty[query]
    return dict(zip(image_ids, weights.tolist()))


def hard_share(order: Sequence[str], uri: str, mining: Mining) -> float:
    """The share of an epoch's draws that are frames with any difficulty."""
    scores = difficulties(uri, mining)
    return round(sum(scores.get(i, 0) > 0 for i in order) / max(1, len(order)), 4)


def rebuild_weights(checkpoint_dir: Path, uri: str | None = None) -> dict[str, float]:
    """Write into a mined checkpoint folder the sampling weights its recorded mining gives (the
    train view and scores at their recorded versions, read from `uri` when given); returns them."""
    recipe = Recipe.from_dict(checkpoints.read_metadata(checkpoint_dir), uri=uri)
    if not recipe.mining:
        raise ValueError(f"{checkpoint_dir} records no hard-example mining: its frames were drawn alike")
    weights = frame_weights(recipe.train, Mining(**recipe.mining))
    checkpoints.write_sample_weights(Path(checkpoint_dir), weights)
    return weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m avperception_assets.discovery.hard_examples")
    commands = parser.add_subparsers(dest="command", required=True)
    weights = commands.add_parser("weights", help="rebuild a mined checkpoint's sampling weights from its record")
    weights.add_argument("checkpoint_dir", type=Path)
    weights.add_argument("--uri", default=None, help="LanceDB location (default: the recorded one)")
    args = parser.parse_args(argv)
    rebuilt = rebuild_weights(args.checkpoint_dir, args.uri)
    print(f"{args.checkpoint_dir / checkpoints.SAMPLE_WEIGHTS_FILE}: {len(rebuilt)} frames")


if __name__ == "__main__":
    main()
