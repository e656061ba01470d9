"""Per-track coverage: in how many of a ground-truth track's frames a detector found it, and the
longest run of consecutive frames in which it did not.

Plain logic over one clip's frames in clip order, so that reports and failure-mode definitions
compute it the same way from whatever matching they already hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TrackCoverage:
    frames: int  # frames of the clip in which the track has a box
    found: int  # of those, frames in which its box was found
    longest_gap: int  # longest run of consecutive such frames in which it was not found

    @property
    def coverage(self) -> float:
        return self.found / self.frames


def track_coverage(frames: Sequence[tuple[Sequence[str], Sequence[bool]]]) -> dict[str, TrackCoverage]:
    """Coverage of each track of one clip, from its frames in clip order.

    Each element of `frames` is one frame: the track ids of its boxes and whether each box was found.
    A gap counts the track's own frames only: a frame where the track has no box (it left the view
    or was not labelled) neither breaks nor extends a gap."""
    counts: dict[str, list[int]] = {}  # track -> [frames, found, current gap, longest gap]
    for track_ids, found in frames:
        if len(track_ids) != len(found):
            raise ValueError(f"a frame has {len(track_ids)} track ids but {len(found)} found flags")
        for track, hit in zip(track_ids, found):
            count = counts.setdefault(track, [0, 0, 0, 0])
            count[0] += 1
            if hit:
                count[1] += 1
                count[2] = 0
            else:
                count[2] += 1
                count[3] = max(count[3], count[2])
    return {track: TrackCoverage(total, hit, longest) for track, (total, hit, _, longest) in counts.items()}
