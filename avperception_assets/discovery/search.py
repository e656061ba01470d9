"""Find frames: by example (nearest embeddings), by a text query through CLIP's text tower, or by
words of the scene description (full-text index); results as a table and a contact sheet.

    python -m avperception_assets.search similar <image_id> [-k 12] [--where SQL] [--split val] [--sheet PATH]
    python -m avperception_assets.search text "cyclist at night" [...]      (CLIP configured only)
    python -m avperception_assets.search describe "night rider" [...]     (full-text, any model)

Searches read the frames table's `embedding` and `scene_description` columns (curation fills
them; `table_maintenance` keeps their indexes): an ANN index once the table is large enough,
exact search below that (`vector_index`). A SQL `--where` prefilter (any frames or curation
column) and `--split` narrow the candidates before the k nearest are taken. Pixels for the
contact sheet come through `pixels.PixelReader`, like every other reader of pixels.

Nothing here knows about Dagster.
"""

from __future__ import annotations

import argparse
import io
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa

from avperception_assets.discovery import embeddings
from avperception_assets.storage import tables as storage
from avperception_assets.storage.pixels import IMAGE_BYTES, PixelReader
from avperception_assets.discovery.vector_index import VECTOR_COLUMN, nearest

DESCRIPTION_COLUMN = "scene_description"
RESULT_COLUMNS = ["image_id", "split", "timeofday", "weather", "scene", DESCRIPTION_COLUMN, "ingest_seq"]
THUMB_SIZE = (320, 180)


class SearchError(ValueError):
    """A search that cannot run as asked (the message says why and what to do)."""


def _scope(where: str | None, split: str | None) -> str | None:
    return storage.and_where(where, f"split = {storage.sql_list([split])}" if split else None)


def _result_columns(table) -> list[str]:
    return [c for c in RESULT_COLUMNS if c in table.schema.names]  # curation columns may be missing yet


def _require_column(table, column: str, filled_by: str) -> None:
    if column not in table.schema.names:
        raise SearchError(f"the frames table has no {column!r} column yet: materialize {filled_by} first")


def embedding_of(table, image_id: str) -> np.ndarray:
    """The stored embedding of one frame."""
    _require_column(table, VECTOR_COLUMN, "the embedding curation column")
    rows = table.to_lance().to_table(columns=[VECTOR_COLUMN], filter=f"image_id = {storage.sql_list([image_id])}")
    if not rows.num_rows:
        raise SearchError(f"no frame {image_id!r} in {storage.FRAMES_TABLE!r}")
    vector = rows[VECTOR_COLUMN][0].values
    if vector is None:
        raise SearchError(f"frame {image_id!r} has no embedding yet (its embedding backfill has not run, or failed)")
    return np.asarray(vector.to_numpy(zero_copy_only=False), dtype=np.float32)


def similar(table, image_id: str, k: int = 12, where: str | None = None, split: str | None = None) -> pa.Table:
    """The k frames nearest to `image_id` (itself excluded), among those `where` and `split` select."""
    vector = embedding_of(table, image_id)
    scope = storage.and_where(_scope(where, split), f"image_id != {storage.sql_list([image_id])}")
    return nearest(table, vector, k=k, where=scope, columns=_result_columns(table))


def text(table, query: str, k: int = 12, where: str | None = None, split: str | None = None,
         model: str = embeddings.COLOR_LAYOUT) -> pa.Table:
    """The k frames nearest to `query` embedded by CLIP's text tower (`model`, the configured
    embedding model, must be the column's: a text vector is only comparable with its own image
    tower's)."""
    _require_column(table, VECTOR_COLUMN, "the embedding curation column")
    configured = embeddings.resolve(model)
    recorded = (storage.column_params(table, VECTOR_COLUMN) or {}).get("model")
    vector = embeddings.load(configured).embed_text([query])[0]  # raises for models without a text tower
    if recorded != configured.label:
        raise SearchError(f"the embedding column was computed with {recorded}, not the configured "
                          f"{configured.label}: recompute it (curation recompute=['embedding']) before text search")
    return nearest(table, vector, k=k, where=_scope(where, split), columns=_result_columns(table))


def describe(table, query: str, k: int = 12, where: str | None = None, split: str | None = None) -> pa.Table:
    """The k frames whose scene description best matches the words of `query` (BM25), with `_score`."""
    _require_column(table, DESCRIPTION_COLUMN, "the scene_description curation column")
    if not any(DESCRIPTION_COLUMN in index.columns for index in table.list_indices()):
        raise SearchError(f"no full-text index on {DESCRIPTION_COLUMN!r} yet: materialize table_maintenance")
    search = table.search(query, query_type="fts", fts_columns=DESCRIPTION_COLUMN)
    scope = _scope(where, split)
    if scope:
        search = search.where(scope, prefilter=True)
    return search.select(_result_columns(table)).limit(k).to_arrow()


def _frame_bytes(uri: str, ids: list[str]) -> dict[str, bytes]:
    frames = storage.connect(uri).open_table(storage.FRAMES_TABLE)
    reader = PixelReader.of(uri, frames)
    data = frames.to_lance().to_table(columns=reader.columns(["image_id", IMAGE_BYTES]),
                                      filter=f"image_id IN ({storage.sql_list(ids)})")
    found = {}
    for batch in data.to_batches():
        batch = reader.attach(batch)
        found.update(zip(batch.column("image_id").to_pylist(), batch.column(IMAGE_BYTES).to_pylist()))
    return found


def _score_column(results: pa.Table) -> str | None:
    """`_distance` (similar, text) or `_score` (describe)."""
    return next((c for c in ("_distance", "_score") if c in results.column_names), None)


def contact_sheet(uri: str, results: pa.Table, path: Path, columns: int = 4, title: str = "") -> Path:
    """A PNG grid of the results' frames, each captioned with its rank, image id and distance or score."""
    from PIL import Image, ImageDraw

    ids = results["image_id"].to_pylist()
    by_id = _frame_bytes(uri, ids) if ids else {}
    score = _score_column(results)
    scores = results[score].to_pylist() if score else [None] * len(ids)
    width, height, caption = THUMB_SIZE[0], THUMB_SIZE[1], 18
    rows = max(1, -(-len(ids) // columns))
    sheet = Image.new("RGB", (width * columns, (height + caption) * rows + caption), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), title or f"{len(ids)} frames", fill="black")
    for rank, (image_id, score) in enumerate(zip(ids, scores)):
        x, y = (rank % columns) * width, caption + (rank // columns) * (height + caption)
        with Image.open(io.BytesIO(by_id[image_id])) as image:
            sheet.paste(image.convert("RGB").resize(THUMB_SIZE), (x, y))
        label = f"{rank + 1}. {image_id[:28]}" + (f"  {score:.3f}" if score is not None else "")
        draw.text((x + 4, y + height + 2), label, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def results_markdown(results: pa.Table) -> str:
    """The results as a markdown table (rank, image id, distance or score, description)."""
    score = _score_column(results)
    lines = [f"| rank | image_id | split | {score or 'score'} | scene_description |", "|---:|---|---|---:|---|"]
    for rank, row in enumerate(results.to_pylist(), 1):
        value = f"{row[score]:.4f}" if score else ""
        lines.append(f"| {rank} | {row['image_id']} | {row['split']} | {value} | {row.get(DESCRIPTION_COLUMN) or ''} |")
    return "\n".join(lines)


def run(kind: str, query: str, *, uri: str, model: str = embeddings.COLOR_LAYOUT, k: int = 12,
        where: str | None = None, split: str | None = None) -> pa.Table:
    """One search of `kind` (similar | text | describe) on the frames table at `uri`; `model` is
    the configured embedding model (text search embeds the query with it)."""
    conn = storage.connect(uri)
    if not storage.table_exists(conn, storage.FRAMES_TABLE):
        raise SearchError(f"no {storage.FRAMES_TABLE!r} table yet: materialize raw_frames and the curation columns")
    if k < 1:
        raise SearchError(f"k must be at least 1, got {k}")
    table = conn.open_table(storage.FRAMES_TABLE)
    search = {"similar": similar, "text": partial(text, model=model), "describe": describe}[kind]
    return search(table, query, k=k, where=where, split=split)


def main(argv: list[str] | None, *, uri: str, model: str = embeddings.COLOR_LAYOUT) -> int:
    """The command line, searching the frames table at `uri` (text queries embedded by `model`)."""
    parser = argparse.ArgumentParser(prog="python -m avperception_assets.search", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind, help_text, arg in (("similar", "frames that look like one frame", "image_id"),
                                 ("text", "frames that match a text query (CLIP)", "query"),
                                 ("describe", "frames whose scene description matches words", "query")):
        command = sub.add_parser(kind, help=help_text)
        command.add_argument(arg)
        command.add_argument("-k", type=int, default=12, help="how many frames (default 12)")
        command.add_argument("--where", help="SQL prefilter over frames and curation columns")
        command.add_argument("--split", choices=("train", "val"))
        command.add_argument("--sheet", type=Path, help="also write a contact-sheet PNG here")
    args = parser.parse_args(argv)
    query = getattr(args, "image_id", None) or args.query
    try:
        results = run(args.kind, query, uri=uri, model=model, k=args.k, where=args.where, split=args.split)
    except ValueError as exc:  # ours, and lance's for a bad --where
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(results_markdown(results))
    if args.sheet:
        print(f"contact sheet: {contact_sheet(uri, results, args.sheet, title=f'{args.kind}: {query}')}")
    return 0
