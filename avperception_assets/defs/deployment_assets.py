"""Deployment as Dagster assets (group `deployment`): `<mode>_onnx_model` per mode.

Each exports the mode's latest checkpoint (best epoch) to `model.onnx` in its checkpoint folder
(`onnx_export`: the whole detector, post-processing included, with the data version and class
map in the file's metadata) and checks onnxruntime against PyTorch on the first frames of the
checkpoint's train view at its pinned version. A model that misses parity is not put in place and
the run fails with the figures. Torch, onnx and onnxruntime are imported inside the asset bodies only.
"""

import dagster as dg
from pydantic import Field

from avperception_assets.failure_modes.registry import FailureMode, check_registry
from avperception_assets.defs.names import DEPLOYMENT, checkpoint_key, latest_checkpoint_dir, onnx_model_key
from avperception_assets.defs.resources import WorkspaceResource


class OnnxExportConfig(dg.Config):
    frames: int = Field(8, ge=1, description="Frames (the checkpoint's train view's first) on which "
                       "onnxruntime must match PyTorch.")


def build_onnx_model_asset(mode: FailureMode) -> dg.AssetsDefinition:
    @dg.asset(
        key=onnx_model_key(mode),
        group_name=DEPLOYMENT,
        deps=[checkpoint_key(mode)],
        kinds={"pytorch", "onnx"},
        metadata={"failure_mode": mode.name},
        description=f"{checkpoint_key(mode).to_user_string()}'s best model as ONNX (whole detector, "
                    f"post-processing included) in its checkpoint folder, with the data version and class map "
                    f"in its metadata; onnxruntime matches PyTorch on its train frames (same labels, boxes within "
                    f"1 px, scores within 0.001 above 0.05) or the run fails.",
    )
    def _onnx_model(context: dg.AssetExecutionContext, config: OnnxExportConfig,
                    workspace: WorkspaceResource) -> dg.MaterializeResult:
        from avperception_assets.deployment import onnx as onnx_export
        from avperception_assets.model import checkpoints

        folder = workspace.pulled(latest_checkpoint_dir(context.instance, mode), checkpoints.BEST_FILE,
                                  checkpoints.METADATA_FILE)
        try:
            result = onnx_export.export_checked(folder, frames=config.frames, uri=workspace.layout.lancedb_uri)
        except (FileNotFoundError, ValueError) as exc:
            raise dg.Failure(f"{mode.name}: {exc}", allow_retries=False) from exc
        figures = onnx_export.parity_figures(result.parity)
        context.log.info(result.parity.summary())
        if not result.parity.passed:
            raise dg.Failure(f"{mode.name}: {result.parity.summary()}; {onnx_export.ONNX_FILE} not written. "
                             + "; ".join(result.parity.mismatches[:5]),
                             metadata={"parity": dg.MetadataValue.json(figures)}, allow_retries=False)
        data, source = result.metadata["data_version"], result.metadata["source_checkpoint"]
        return dg.MaterializeResult(
            metadata={
                "onnx_model": dg.MetadataValue.path(workspace.push(result.path)),
                "exported_part": result.metadata["exported_part"],
                "export_seconds": result.export_seconds,
                "frames_checked": result.parity.frames,
                "detections_compared": result.parity.detections,
                "max_box_diff_px": result.parity.max_box_diff_px,
                "max_score_diff": result.parity.max_score_diff,
                "parity": dg.MetadataValue.json(figures),
                "train_view": data["train_view"],
                "train_view_version": data["train_view_version"],
                "source_table_version": data["source_table_version"],
                "selection_pct": data["selection_pct"],
                "checkpoint": dg.MetadataValue.path(workspace.layout.location_of(source["weights"])),
                "input_size": dg.MetadataValue.json(result.metadata["input_size"]),
                "class_map": dg.MetadataValue.json(result.metadata["class_map"]),
            },
            data_version=dg.DataVersion(f"{data['train_view']}@{data['train_view_version']}:{source['digest']}"),
        )

    return _onnx_model


def build_deployment_defs(modes) -> dg.Definitions:
    """One ONNX model asset per failure mode of the registry `modes`."""
    modes = check_registry(modes)
    return dg.Definitions(assets=[build_onnx_model_asset(m) for m in modes])
