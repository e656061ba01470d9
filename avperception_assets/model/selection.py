"""The selection share: frames of a train view held out from training to choose a run's best
epoch (and any early stop), so that the frames a report scores (another split) never select
a checkpoint, and the frames that select it were never trained on.

A frame's side is a pure function of its id: sha1 of its clip id (a clip's frames are near
copies of one another, so a clip goes to one side whole) or, for a frame without one, of its
image id, read as a number mod 100; below the share's percentage it is held out. Appending
footage, refreshing a view or reading it at another version never moves a frame to the other
side, and every reader splits the same rows alike without a view of its own: the loader splits
a pinned view's rows as it reads their ids (`loader.ViewRef.share`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RULE = "sha1(clip_id, else image_id) mod 100 < selection_pct"
# A tenth, the usual 90/10 hold-out: on BDD100K about 7,000 of the 70,000 train frames choose the
# base detector's epoch, while each slice gives up only a tenth of its frames to it.
DEFAULT_PCT = 10
CLIP_ID = "clip_id"  # a frame's footage clip, where it has one
KEY_COLUMNS = ("image_id", CLIP_ID)  # what a frame's side is decided by


def bucket(image_id: str, clip_id: str | None = None) -> int:
    """A frame's place in 0..99: sha1 of its clip id, or of its image id without one."""
    key = clip_id or image_id
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest(), "big") % 100


def held_out(image_ids: Sequence[str], clip_ids: Sequence[str | None] | None, pct: int) -> np.ndarray:
    """For each frame, whether it is in the selection share of `pct` percent."""
    clips = clip_ids if clip_ids is not None else [None] * len(image_ids)
    return np.array([bucket(image, clip) < pct for image, clip in zip(image_ids, clips, strict=True)], dtype=bool)


def check_pct(pct: int | None) -> None:
    if pct is not None and not 0 <= pct < 100:
        raise ValueError(f"selection_pct must be 0..99 (a share of the train frames), not {pct}")


@dataclass(frozen=True)
class Share:
    """One side of a view's rows split by the selection rule at `pct` percent: the held-out
    frames that choose the best epoch (`held_out`), or the frames trained on."""

    pct: int
    held_out: bool

    def __post_init__(self):
        check_pct(self.pct)

    def keeps(self, image_ids: Sequence[str], clip_ids: Sequence[str | None] | None) -> np.ndarray:
        """Which of these frames are on this side."""
        return held_out(image_ids, clip_ids, self.pct) == self.held_out
