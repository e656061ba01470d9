"""Which frames of a footage clip a run trains on: all of them, every K-th, or the novel ones.

Consecutive frames of a clip (5 Hz footage) are near copies, so training on every one spends
steps on the same scene. A run's `clip_draw` (`recipe.Recipe`) is one of:

- `all` (the default): every frame;
- `stride:K`: the clip frames whose `clip_frame_index` is a multiple of K (frames 0, K, 2K, …
  as the footage numbers them). A frame's fate depends on its own index only, so it never
  changes when a view gains rows; a view that holds only off-stride frames of a clip draws none;
- `novelty:T`: in each clip, in frame order, its first frame, then every frame whose embedding
  (curation's `embedding` column, unit vectors) is at cosine distance >= T from the last frame
  drawn of that clip. A slow pan keeps a frame every time the scene has moved on by T; a car
  waiting at a light keeps one frame. T is in (0, 2].

Frames without a clip, and a clip's frames without a position in it (the detection image of
the clip's video), are always drawn. The loader draws from the frames a run trains on
(`loader.ViewRef.draw`), after its selection share is set aside and before each epoch's order,
so held-out and val frames are never drawn. A run records how many frames it drew of how many
and a digest of their ids (`digest`), which `training.reproduce_order` checks its rebuild against.

Plain logic over arrays: the loader reads the columns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ALL = "all"
STRIDE = "stride"
NOVELTY = "novelty"
EMBEDDING = "embedding"  # curation's column (discovery.vector_index.VECTOR_COLUMN): unit vectors
FRAME_INDEX = "clip_frame_index"
MAX_COSINE_DISTANCE = 2.0
FORMS = "'all', 'stride:K' (an integer K >= 1) or 'novelty:T' (a cosine distance 0 < T <= 2)"


@dataclass(frozen=True)
class ClipDraw:
    """A draw other than `all`: every `step`-th frame (`stride`), or frames at cosine distance
    >= `threshold` from the last drawn of their clip (`novelty`)."""

    kind: str
    step: int = 1
    threshold: float = 0.0

    def __str__(self) -> str:
        return f"{STRIDE}:{self.step}" if self.kind == STRIDE else f"{NOVELTY}:{self.threshold!r}"

    @property
    def needs_embeddings(self) -> bool:
        return self.kind == NOVELTY

    def keeps(self, clip_ids: Sequence[str], frame_indices: Sequence[int],
              embeddings: np.ndarray | None = None) -> np.ndarray:
        """Which of these clip frames (each with its clip and index; for novelty, its embedding
        row) are drawn. The rows may come in any order."""
        indices = np.asarray(frame_indices, dtype=np.int64)
        if self.kind == STRIDE:
            return indices % self.step == 0
        if embeddings is None or len(embeddings) != len(indices):
            raise ValueError(f"a {self} draw needs one embedding per clip frame")
        return novel_frames(clip_ids, indices, embeddings, self.threshold)


def parse(text: str) -> ClipDraw | None:
    """The draw `text` names; None for `all`. Raises ValueError on anything else."""
    kind, _, value = str(text).strip().partition(":")
    if kind == ALL and not value:
        return None
    try:
        if kind == STRIDE:
            step = int(value)
            if step >= 1:
                return ClipDraw(STRIDE, step=step)
        elif kind == NOVELTY:
            threshold = float(value)
            if 0 < threshold <= MAX_COSINE_DISTANCE:
                return ClipDraw(NOVELTY, threshold=threshold)
    except ValueError:
        pass
    raise ValueError(f"clip_draw {text!r} is none of {FORMS}")


def canonical(text: str) -> str:
    """`text` in the one spelling a recipe records (e.g. 'stride:04' -> 'stride:4')."""
    return str(parse(text) or ALL)


def novel_frames(clip_ids: Sequence[str], frame_indices: np.ndarray, embeddings: np.ndarray,
                 threshold: float) -> np.ndarray:
    """For each frame, whether it is its clip's first, or at cosine distance >= `threshold` from
    the last frame drawn of its clip, taking each clip's frames in index order."""
    vectors = np.asarray(embeddings, dtype=np.float64)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    clips = np.asarray(clip_ids, dtype=object)
    keep = np.zeros(len(clips), dtype=bool)
    last: dict[str, np.ndarray] = {}
    for row in np.lexsort((frame_indices, clips.astype(str))):
        drawn = last.get(clips[row])
        if drawn is None or 1.0 - float(vectors[row] @ drawn) >= threshold:
            keep[row] = True
            last[clips[row]] = vectors[row]
    return keep


def digest(image_ids: Sequence[str]) -> str:
    """sha256 of the drawn frames' ids, sorted: the same frames give the same digest in any order."""
    return hashlib.sha256("\n".join(sorted(image_ids)).encode("utf-8")).hexdigest()
