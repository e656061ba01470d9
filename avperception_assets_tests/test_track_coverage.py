"""Per-track coverage (tracking.coverage) on constructed clips computed by hand."""

from __future__ import annotations

import pytest

from avperception_assets.tracking.coverage import TrackCoverage, track_coverage


def test_coverage_and_longest_gap_of_each_track_of_a_clip():
    # Frame by frame: "a" found, missed, missed, found, missed; "b" appears in frame 1, leaves in
    # frame 3 (no box there) and comes back missed; "c" is in one frame, never found.
    frames = [
        (["a"], [True]),
        (["a", "b"], [False, True]),
        (["b", "a"], [False, False]),
        (["a", "c"], [True, False]),
        (["a", "b"], [False, False]),
    ]
    assert track_coverage(frames) == {
        "a": TrackCoverage(frames=5, found=2, longest_gap=2),
        "b": TrackCoverage(frames=3, found=1, longest_gap=2),  # frame 3 without "b" does not break its gap
        "c": TrackCoverage(frames=1, found=0, longest_gap=1),
    }


def test_coverage_is_the_share_of_frames_found():
    coverage = track_coverage([(["p"], [True]), (["p"], [False]), (["p"], [True]), (["p"], [True])])["p"]
    assert coverage.coverage == pytest.approx(0.75)
    assert coverage.longest_gap == 1


def test_a_track_found_in_every_frame_has_no_gap_and_an_empty_clip_no_tracks():
    assert track_coverage([(["x"], [True])] * 3) == {"x": TrackCoverage(3, 3, 0)}
    assert track_coverage([([], [])]) == {} == track_coverage([])


def test_a_frame_whose_ids_and_flags_disagree_is_refused():
    with pytest.raises(ValueError, match="2 track ids but 1 found flags"):
        track_coverage([(["a", "b"], [True])])
