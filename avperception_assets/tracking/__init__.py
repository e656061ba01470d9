"""Tracking: BDD100K MOT 2020 (`box_track_20`) label files (`labels`), the box_track metrics as
BDD100K's toolkit reports them (`metrics`; `python -m avperception_assets.tracking evaluate` prints
them), a tracker linking a detector's per-frame boxes into tracks (`tracker`), and per-track
coverage (`coverage`)."""
