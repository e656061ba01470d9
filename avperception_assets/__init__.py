"""AV Perception Assets: a Dagster asset graph from dashcam JPEG bytes to fine-tuned detectors.

The plain-Python stages (ingest, curation, slices, loader, training, evaluation, sensors)
know nothing of Dagster; `avperception_assets.defs` wires them into assets. Importing the
package changes no other library: entry points apply `patches` explicitly.
"""
