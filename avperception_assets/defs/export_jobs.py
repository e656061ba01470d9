"""`slice_export`: a slice view at a pinned version written out as COCO JSON or a YOLO folder, from
the Launchpad (the run config names the view, its version and the format). The files go to
`exports/<view>@v<version>_<format>/`; `python -m avperception_assets.exports` does the same."""

from enum import Enum

import dagster as dg
from pydantic import Field

from avperception_assets.slices import exports
from avperception_assets.defs.resources import WorkspaceResource


class ExportFormat(Enum):
    coco = exports.COCO
    yolo = exports.YOLO


class SliceExportConfig(dg.Config):
    view: str = Field(description="the view to export: bdd100k_<failure mode>_<train|val>, e.g. bdd100k_rider_val")
    version: int | None = Field(default=None, description="the view version (default: the latest)")
    format: ExportFormat = Field(default=ExportFormat.coco, description="coco: annotations/instances_<split>.json; "
                                 "yolo: images/, labels/ and data.yaml (Ultralytics)")


@dg.op(description="Write one view version as a COCO or YOLO data set; its metadata says where and what.")
def export_slice(context: dg.OpExecutionContext, config: SliceExportConfig, workspace: WorkspaceResource) -> dict:
    try:
        layout = workspace.layout
        export = exports.export_view(layout.lancedb_uri, config.view, config.format.value, layout.exports_dir,
                                     config.version, log=context.log.info)
    except (ValueError, LookupError) as exc:  # no such view or version, or its pixels are gone
        raise dg.Failure(str(exc)) from exc
    metadata = {**export.as_metadata(), "path": workspace.push(export.path)}
    context.add_output_metadata({**{k: v for k, v in metadata.items() if k not in ("path", "splits", "classes")},
                                 "path": dg.MetadataValue.path(metadata["path"]),
                                 "splits": dg.MetadataValue.json(metadata["splits"]),
                                 "classes": dg.MetadataValue.json(metadata["classes"])})
    return metadata


@dg.job(description="Export a slice view at a pinned version as COCO JSON or a YOLO folder.")
def slice_export():
    export_slice()


defs = dg.Definitions(jobs=[slice_export])
