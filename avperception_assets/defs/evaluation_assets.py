"""Evaluation as Dagster assets (group `evaluation`): `<mode>_eval_report` per mode,
`base_detector_report`, `failure_mode_summary`.

Each report evaluates the baseline (`base_detector`: COCO weights or the detector trained on
all of bdd100k) and the mode's latest fine-tuned checkpoint on the latest version of the
mode's val view, writes COCO JSON, report.json/report.md and PNG panels under
`reports/<mode>/<val view version>/`, and shows the table and panels in the asset's metadata.
`base_detector_report` scores the base detector as deployed on the val frames outside every
slice and inside each (`evaluation.base_report`), under `reports/base/<frames version>/`. The
summary gathers the latest report of every mode into one table, with the base detector's
figures. Torch is imported inside the asset bodies only.
"""

import dataclasses
from typing import Optional

import dagster as dg
from pydantic import Field

from avperception_assets.failure_modes.registry import FailureMode, Tiling, check_registry
from avperception_assets.slices.views import view_name
from avperception_assets.defs.names import BASE_DETECTOR, BASE_DETECTOR_REPORT, EVALUATION, FAILURE_MODE_SUMMARY, checkpoint_key, eval_report_key, latest_checkpoint_dir, latest_metadata, view_key
from avperception_assets.defs.resources import WorkspaceResource
from avperception_assets.defs.training_assets import base_model, deployed_base_model
from avperception_assets.workspace import BASE_REPORTS


class EvalReportConfig(dg.Config):
    batch_size: int = Field(8, description="Frames per inference batch.")
    panel_count: int = Field(3, description="Val frames drawn as GT / baseline / fine-tuned panels.")
    worst_count: int = Field(3, description="The fine-tuned model's worst val frames drawn as panels.")
    panel_score_threshold: float = Field(0.5, description="Predictions below this score are not drawn "
                                         "(all of them count in the metrics).")
    tiling: bool = Field(True, description="Also evaluate both models with tiled inference where the mode has a "
                         "tiling (or tile_size is set); the report shows the figures side by side. False: untiled only.")
    tile_size: Optional[int] = Field(None, description="Tile side in px at full resolution: overrides the mode's, "
                                     "or tiles a mode that has none.")
    tile_overlap: Optional[float] = Field(None, description="Overlap of neighbouring tiles, a fraction of a tile.")
    tile_whole_frame: Optional[bool] = Field(None, description="Also run the whole frame and merge its boxes "
                                             "with the tiles' (SAHI's standard prediction).")
    track_min_score: float = Field(0.5, description="On clips: detections below this score are not linked into tracks.")
    track_min_iou: float = Field(0.3, description="On clips: least IoU between a track's last box and a detection "
                                 "that continues it.")
    track_max_missed: int = Field(2, description="On clips: frames in a row a track may go undetected and continue.")

    def resolve_tiling(self, mode: FailureMode) -> Tiling | None:
        """The mode's tiling with this config's overrides; None when not tiling."""
        spec = mode.tiling
        if self.tile_size is not None:
            spec = dataclasses.replace(spec, tile_size=self.tile_size) if spec else Tiling(self.tile_size)
        if not self.tiling or spec is None:
            return None
        overrides = {"overlap": self.tile_overlap, "whole_frame": self.tile_whole_frame}
        return dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})


def _finetuned(context: dg.AssetExecutionContext, mode: FailureMode, workspace: WorkspaceResource):
    """The mode's latest checkpoint (best epoch) and what the report records about it (its files
    by their place in the data location)."""
    from avperception_assets.model import checkpoints

    key = checkpoint_key(mode)
    location = latest_checkpoint_dir(context.instance, mode)
    folder = workspace.pulled(location, checkpoints.BEST_FILE, checkpoints.METADATA_FILE)
    best = workspace.layout.location_of(folder / checkpoints.BEST_FILE)
    if not (folder / checkpoints.BEST_FILE).is_file():
        raise dg.Failure(f"checkpoint {best} is gone; rematerialize {key.to_user_string()}")
    metadata = checkpoints.read_metadata(folder)
    info = {"source": key.to_user_string(), "checkpoint": best, "checkpoint_dir": location, "metadata": metadata}
    return checkpoints.load_checkpoint(folder), metadata, info


def _figures(report) -> dict:
    """Headline numbers as Dagster metadata (plottable across materializations): `mode_*` over
    the mode's classes, `all_classes_*` over every class of the val view, deltas in points, and
    `ci_<model or delta>_<metric>_low/high`, the bounds of the 95% intervals over the mode's classes."""
    from avperception_assets.evaluation.comparison import BASELINE, FINETUNED
    from avperception_assets.evaluation.reports import SCOPES, delta_points, scoped

    figures = {}
    for scope in SCOPES:
        for key in ("map_50", "map", "mar_100"):
            base, tuned = (scoped(report.data["metrics"][model], scope)[key] for model in (BASELINE, FINETUNED))
            figures.update({f"{scope}_{key}_baseline": base, f"{scope}_{key}_finetuned": tuned,
                            f"{scope}_{key}_delta_points": delta_points(base, tuned)})
    for name, intervals in report.data["intervals"].items():
        for key, entry in intervals.items():
            figures.update({f"ci_{name}_{key}_low": entry["low"], f"ci_{name}_{key}_high": entry["high"]})
    return {k: dg.MetadataValue.null() if v is None else dg.MetadataValue.float(v) for k, v in figures.items()}


def _tiled_figures(report) -> dict:
    """Inference time per frame, and with tiling each model's tiled figures over the mode's classes."""
    from avperception_assets.evaluation.comparison import BASELINE, FINETUNED

    figures = {f"seconds_per_frame_{model}": report.data["seconds_per_frame"][model] for model in (BASELINE, FINETUNED)}
    tiling = report.data["tiling"]
    for model in (BASELINE, FINETUNED) if tiling else ():
        figures.update({f"tiled_mode_{key}_{model}": tiling["metrics"][model]["mode"][key]
                        for key in ("map_50", "recall_50", "mar_100")},
                       **{f"tiled_seconds_per_frame_{model}": tiling["seconds_per_frame"][model]})
    return {k: dg.MetadataValue.null() if v is None else dg.MetadataValue.float(v) for k, v in figures.items()}


def _tiling_metadata(report) -> dict:
    """The table of both models untiled and tiled, and the tiling; nothing without tiling."""
    from avperception_assets.evaluation.reports import tiling_markdown

    tiling = report.data["tiling"]
    if not tiling:
        return {}
    return {"tiling": dg.MetadataValue.md(tiling_markdown(tiling["rows"])),
            "tiling_spec": dg.MetadataValue.json(tiling["spec"])}


def _tracking_metadata(report, view: dict) -> dict:
    """Both models' MOTA and IDF1 on the view's clips and their coverage of the mode's tracks, as
    a section and as plottable figures; a line saying there are none on a view without clips."""
    from avperception_assets.evaluation import reports, tracks
    from avperception_assets.evaluation.comparison import BASELINE, FINETUNED

    tracking = report.data["tracking"]
    if not tracking:
        return {"tracking": f"no frames of clips in {view['name']}@{view['version']}: no tracking figures"}
    section = "\n\n".join([reports.tracking_description(tracking), tracks.figures_markdown(tracking, reports.MODEL_TITLES),
                            reports.coverage_description(report.data),
                            tracks.coverage_markdown(tracking, reports.MODEL_TITLES)])
    figures = {"tracking_clips": tracking["clips"], "tracks": tracking["coverage"][FINETUNED]["tracks"]}
    for model in (BASELINE, FINETUNED):
        coverage = tracking["coverage"][model]
        figures.update({f"tracking_mota_{model}": tracking["figures"][model]["MOTA"],
                        f"tracking_idf1_{model}": tracking["figures"][model]["IDF1"],
                        f"track_coverage_mean_{model}": coverage["mean_coverage"],
                        f"tracks_under_half_{model}": coverage["tracks_under_half"]})
    return {"tracking": dg.MetadataValue.md(section),
            **{k: dg.MetadataValue.null() if v is None else v for k, v in figures.items()}}


def _inference_spec(spec: Tiling) -> dict:
    """How the tiled figures were made (`train_on_tiles` is the checkpoint's profile's `train_crop`)."""
    return {"tile_size": spec.tile_size, "overlap": spec.overlap, "whole_frame": spec.whole_frame}


def _evaluate_tiled(uri: str, view: dict, models: dict, mode: FailureMode, spec: Tiling, batch_size: int):
    """The same frames again, each model on tiles. `tiling.tiled` changes the models' input size,
    so it takes them over once their untiled pass is done."""
    from avperception_assets.evaluation import comparison as evaluation
    from avperception_assets.model import tiling

    tiled = {name: tiling.tiled(model, spec.tile_size, spec.overlap, whole_frame=spec.whole_frame,
                                batch_size=batch_size) for name, model in models.items()}
    result, _ = evaluation.evaluate_view(uri, view["name"], tiled, classes=mode.classes, version=view["version"],
                                         batch_size=batch_size, panel_count=0, worst_count=0)
    return result


def _write_eval_frames(workspace: WorkspaceResource, mode: FailureMode, result, tiled, view: dict,
                       finetuned_info: dict):
    """Every frame's matches, both models (and both on tiles, with `tiled`), as
    `<mode>_eval_frames`; returns its name and version, and its rows as stored (the intervals'
    source)."""
    from avperception_assets.evaluation import comparison as evaluation, frame_errors

    conn = workspace.connect()
    rows = evaluation.frame_rows(result, tiled)
    version = frame_errors.write_table(conn, mode.name, rows, {
        "val_view": view["name"], "val_view_version": view["version"], "checkpoint": finetuned_info["checkpoint"]})
    return ({"table": frame_errors.table_name(mode.name), "version": version, "rows": rows.num_rows},
            frame_errors.read_table(conn, mode.name, version))


def build_eval_report_asset(mode: FailureMode) -> dg.AssetsDefinition:
    val_name = view_name(mode, "val")

    @dg.asset(
        key=eval_report_key(mode),
        group_name=EVALUATION,
        deps=[checkpoint_key(mode), view_key(mode, "val"), BASE_DETECTOR],
        kinds={"pytorch"},
        metadata={"failure_mode": mode.name, "val_view": val_name, "classes": list(mode.classes)},
        description=f"Baseline vs fine-tuned on {val_name}: COCO mAP@0.5, mAP@[.5:.95] and mAR@100 over "
                    f"{', '.join(mode.classes)} (the headline; all-class figures secondary) with 95% bootstrap "
                    f"intervals, the paired difference in points and a verdict, by object size, "
                    f"precision-recall curves, the confusion between classes and the worst frames, with "
                    f"COCO JSON and panels under `reports/{mode.name}/{{val view version}}/`; every frame's "
                    f"matches in the `{mode.name}_eval_frames` table. On the view's frames of clips, both models' "
                    "detections linked into tracks with BDD100K's MOTA and IDF1, and each track's coverage."
                    + (f" Both models also on {mode.tiling.tile_size} px full-resolution tiles, side by side with "
                       "the untiled figures (run config `tiling`, `tile_size`, `tile_overlap`)." if mode.tiling else ""),
    )
    def _report(context: dg.AssetExecutionContext, config: EvalReportConfig,
                workspace: WorkspaceResource) -> dg.MaterializeResult:
        from avperception_assets.evaluation import comparison as evaluation, reports
        from avperception_assets.tracking.tracker import TrackerSettings

        spec = config.resolve_tiling(mode)
        finetuned, finetuned_metadata, finetuned_info = _finetuned(context, mode, workspace)
        baseline, baseline_info = base_model(context, finetuned_metadata["profile"], workspace)
        models = {evaluation.BASELINE: baseline, evaluation.FINETUNED: finetuned}
        uri = workspace.layout.lancedb_uri
        try:
            result, view = evaluation.evaluate_view(
                uri, val_name, models, classes=mode.classes, batch_size=config.batch_size,
                panel_count=config.panel_count, worst_count=config.worst_count)
        except ValueError as exc:  # missing or empty val view
            raise dg.Failure(f"{mode.name}: {exc}") from exc
        tiled = _evaluate_tiled(uri, view, models, mode, spec, config.batch_size) if spec else None
        eval_frames, stored = _write_eval_frames(workspace, mode, result, tiled, view, finetuned_info)
        report = reports.write_report(
            workspace.layout.reports_dir_for(mode.name) / str(view["version"]), result, mode=mode.name, val_view=view,
            baseline=baseline_info, finetuned=finetuned_info, score_threshold=config.panel_score_threshold,
            eval_frames=eval_frames, tiled=tiled, tiling=_inference_spec(spec) if spec else None, frames=stored,
            tracker=TrackerSettings(config.track_min_iou, config.track_min_score, config.track_max_missed))
        report_dir = workspace.push(report.out_dir)
        table = reports.rows_markdown(report.rows)
        intervals = reports.intervals_markdown(report.data["intervals"])
        context.log.info(f"{mode.name} on {val_name}@{view['version']}: {report.data['verdict']}\n{intervals}\n\n{table}")
        tiling_metadata, tracking_metadata = _tiling_metadata(report), _tracking_metadata(report, view)
        context.log.info(f"{mode.name}, tracks on clips: {reports.tracks_markdown({mode.name: report.data}) or 'no clips'}")
        if tiling_metadata:
            context.log.info(f"{mode.name}, untiled and tiled ({reports.tiling_description(report.data['tiling']['spec'])})"
                             f":\n{tiling_metadata['tiling'].value}")
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(table),
                "verdict": report.data["verdict"],
                "intervals": dg.MetadataValue.md(f"**Verdict: {report.data['verdict']}**\n\n{intervals}\n\n"
                                                 + reports.intervals_description(report.data["intervals"])),
                "intervals_plot": dg.MetadataValue.md(reports.png_markdown(report.out_dir / reports.INTERVALS_FILE)),
                "panels": dg.MetadataValue.md(reports.panels_markdown(report.panels)),
                "by_object_size": dg.MetadataValue.md(reports.rows_markdown(report.data["size_rows"])),
                "worst_frames": dg.MetadataValue.md(reports.worst_frames_markdown(report.data) + "\n\n"
                                                    + reports.panels_markdown(report.worst_panels)),
                "pr_curves": dg.MetadataValue.md(reports.png_markdown(report.out_dir / reports.PR_CURVES_FILE)),
                "eval_frames_table": eval_frames["table"],
                "eval_frames_version": eval_frames["version"],
                **_figures(report),
                **_tiled_figures(report),
                **tiling_metadata,
                **tracking_metadata,
                "val_view": view["name"],
                "val_view_version": view["version"],
                "source_table_version": view["source_table_version"],
                "dagster/row_count": report.data["num_images"],
                "num_objects": report.data["num_objects"],
                "checkpoint": dg.MetadataValue.path(finetuned_info["checkpoint"]),
                "train_view_version": finetuned_metadata["train_view_version"],
                "baseline_weights": baseline_info["weights"],
                "report_dir": dg.MetadataValue.path(report_dir),
                "report_json": dg.MetadataValue.path(workspace.layout.location_of(report.out_dir / reports.REPORT_JSON)),
            },
            data_version=dg.DataVersion(f"{view['name']}@{view['version']}:{finetuned_info['checkpoint']}"),
        )

    return _report


class BaseReportConfig(dg.Config):
    batch_size: int = Field(8, description="Frames per inference batch.")


def build_base_report_asset(modes) -> dg.AssetsDefinition:
    val_views = {mode.name: view_name(mode, "val") for mode in modes}

    @dg.asset(
        key=BASE_DETECTOR_REPORT,
        group_name=EVALUATION,
        deps=[BASE_DETECTOR, *(view_key(m, "val") for m in modes)],
        kinds={"pytorch"},
        description="The base detector as deployed (its own input size) on the val frames of bdd100k outside "
                    "every slice and inside each mode's val view: all-class AP@0.5 outside with 95% bootstrap "
                    "intervals and the objects per class, and per mode the interval of AP off the slices − AP "
                    "on the slice over its classes (all classes off the slices where its classes occur only in "
                    "the slice) with the verdict whether the slice is measurably worse; report.json/report.md "
                    f"under `reports/{BASE_REPORTS}/{{frames version}}/`, every frame's matches in "
                    f"`{BASE_REPORTS}_eval_frames`.",
    )
    def _base_report(context: dg.AssetExecutionContext, config: BaseReportConfig,
                     workspace: WorkspaceResource) -> dg.MaterializeResult:
        from avperception_assets.evaluation import base_report, comparison, frame_errors

        model, info = deployed_base_model(context, workspace)
        uri, conn = workspace.layout.lancedb_uri, workspace.connect()
        try:
            sets = base_report.frame_sets(uri, val_views)
            result = base_report.evaluate(uri, sets, model, batch_size=config.batch_size)
            version = frame_errors.write_table(conn, BASE_REPORTS, comparison.frame_rows(result), {
                "frames_table_version": sets.frames_version, "weights": info["weights"]})
            stored = frame_errors.read_table(conn, BASE_REPORTS, version)
            figures = base_report.measure(stored, sets, {mode.name: mode.classes for mode in modes})
        except ValueError as exc:  # missing views, views out of step, no frame outside the slices
            raise dg.Failure(f"base_detector_report: {exc}") from exc
        eval_frames = {"table": frame_errors.table_name(BASE_REPORTS), "version": version}
        out_dir = workspace.layout.reports_dir_for(BASE_REPORTS) / str(sets.frames_version)
        data = base_report.write_report(out_dir, figures, sets=sets, model=info, eval_frames=eval_frames,
                                        num_images=len(result.image_ids))
        report_dir = workspace.push(out_dir)
        outside, modes_table = base_report.outside_markdown(data), base_report.modes_markdown(data)
        context.log.info(f"base detector outside every slice:\n{outside}\n\n{modes_table}")
        figures_metadata = {k: dg.MetadataValue.null() if v is None else v
                            for k, v in base_report.metadata_figures(data).items()}
        return dg.MaterializeResult(
            metadata={
                "outside": dg.MetadataValue.md(outside),
                "modes": dg.MetadataValue.md(modes_table),
                "objects_per_class": dg.MetadataValue.json(data["outside"]["objects_per_class"]),
                "verdicts": dg.MetadataValue.json({m: f["verdict"] for m, f in data["modes"].items()}),
                **figures_metadata,
                "frames_table_version": sets.frames_version,
                "eval_frames_table": eval_frames["table"],
                "eval_frames_version": version,
                "dagster/row_count": data["num_images"],
                "weights": info["weights"],
                "reused_long_base": info["reused_long_base"],
                "report_dir": dg.MetadataValue.path(report_dir),
                "report_json": dg.MetadataValue.path(workspace.layout.location_of(out_dir / base_report.REPORT_JSON)),
            },
            data_version=dg.DataVersion(f"bdd100k@{sets.frames_version}:{info['weights']}"),
        )

    return _base_report


def _latest_report(context: dg.AssetExecutionContext, key: dg.AssetKey, workspace: WorkspaceResource) -> dict | None:
    """The report.json the latest materialization of `key` wrote (pulled from the data location);
    None when there is none."""
    from avperception_assets.evaluation import reports

    recorded = latest_metadata(context.instance, key)
    path = workspace.pulled(recorded["report_json"]) if recorded and "report_json" in recorded else None
    return reports.read_report(path) if path is not None and path.is_file() else None


def build_summary_asset(modes) -> dg.AssetsDefinition:
    @dg.asset(
        key=FAILURE_MODE_SUMMARY,
        group_name=EVALUATION,
        deps=[*(eval_report_key(m) for m in modes), BASE_DETECTOR_REPORT],
        description="Every failure mode's verdict with its 95% intervals, then one table over every mode: "
                    "metric, baseline, fine-tuned, Δ in points, then the base detector outside and inside "
                    "the slices (also reports/summary.md and summary.json).",
    )
    def _summary(context: dg.AssetExecutionContext, workspace: WorkspaceResource) -> dg.MaterializeResult:
        from avperception_assets.evaluation import reports

        written, missing = {}, []
        for mode in modes:
            data = _latest_report(context, eval_report_key(mode), workspace)
            if data is None:
                missing.append(mode.name)
            else:
                written[mode.name] = data
        base = _latest_report(context, BASE_DETECTOR_REPORT, workspace)
        if not written and base is None:
            raise dg.Failure(f"no evaluation report yet for any failure mode ({', '.join(missing)}) nor for the "
                             "base detector; materialize the <mode>_eval_report assets or base_detector_report first")
        md_path, json_path, table = reports.write_summary(workspace.layout.reports_dir, written, base)
        context.log.info(f"Failure modes: baseline vs fine-tuned\n{table}")
        return dg.MaterializeResult(metadata={
            "summary": dg.MetadataValue.md(table),
            "verdicts": dg.MetadataValue.json({mode: data["verdict"] for mode, data in written.items()}),
            "modes": dg.MetadataValue.json(sorted(written)),
            "modes_without_report": dg.MetadataValue.json(missing),
            "base_detector_report": base is not None,
            "summary_md": dg.MetadataValue.path(workspace.push(md_path)),
            "summary_json": dg.MetadataValue.path(workspace.push(json_path)),
        })

    return _summary


def build_evaluation_defs(modes) -> dg.Definitions:
    """One eval report per failure mode of the registry `modes`, plus the summary."""
    modes = check_registry(modes)
    return dg.Definitions(assets=[*(build_eval_report_asset(m) for m in modes), build_summary_asset(modes)])


def build_base_report_defs(modes) -> dg.Definitions:
    """base_detector_report over the val views of the registry `modes`."""
    return dg.Definitions(assets=[build_base_report_asset(check_registry(modes))])
