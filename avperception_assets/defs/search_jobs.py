"""`frame_search`: similarity, text and scene-description search from the Dagster UI. The run's
config is the query (Launchpad); the run's output metadata shows the results as a table and a
contact sheet, also written under `reports/search/<run id>.png`."""

from enum import Enum

import dagster as dg
from pydantic import Field

from avperception_assets.discovery import search
from avperception_assets.defs.resources import WorkspaceResource


class SearchKind(Enum):
    similar = "similar"  # frames like one frame (query: its image id)
    text = "text"  # a text query through CLIP's text tower
    describe = "describe"  # words of the scene description (full-text)


class Split(Enum):
    train = "train"
    val = "val"


class FrameSearchConfig(dg.Config):
    """One search (see `python -m avperception_assets.search`)."""

    kind: SearchKind = Field(default=SearchKind.similar, description="similar: frames like one frame; text: a CLIP "
                             "text query; describe: words of the scene description (full-text)")
    query: str = Field(description="an image id (similar) or the words to search for")
    k: int = Field(default=12, ge=1, le=200, description="how many frames")
    where: str | None = Field(default=None, description="SQL prefilter over frames and curation columns")
    split: Split | None = None


@dg.op(description="Run one frame search; its metadata shows the results and their contact sheet.")
def search_frames(context: dg.OpExecutionContext, config: FrameSearchConfig, workspace: WorkspaceResource) -> dict:
    from avperception_assets.evaluation import reports

    layout = workspace.layout
    try:
        results = search.run(config.kind.value, config.query, uri=layout.lancedb_uri, model=workspace.embedding_model,
                             k=config.k, where=config.where, split=config.split.value if config.split else None)
    except ValueError as exc:  # a search that cannot run as asked, or lance's complaint about `where`
        raise dg.Failure(str(exc)) from exc
    sheet = search.contact_sheet(layout.lancedb_uri, results, layout.reports_dir / "search" / f"{context.run_id}.png",
                                 title=f"{config.kind.value}: {config.query}")
    context.add_output_metadata({
        "frames": results.num_rows,
        "results": dg.MetadataValue.md(search.results_markdown(results)),
        "contact_sheet": dg.MetadataValue.md(reports.png_markdown(sheet)),
        "contact_sheet_path": dg.MetadataValue.path(workspace.push(sheet)),
    })
    return {"image_ids": results["image_id"].to_pylist(), "contact_sheet": layout.location_of(sheet)}


@dg.job(description="Find frames by example, text or scene description; the query is the run config.")
def frame_search():
    search_frames()


defs = dg.Definitions(jobs=[frame_search])
