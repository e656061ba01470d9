"""Tiled (sliced) inference: a detector run over overlapping full-resolution tiles of each frame,
its boxes mapped back to the frame and merged across tiles.

Plain Python (no Dagster). A detector's own resize shrinks a frame to its input size, and with
it a distant pedestrian (13x34 px in a 1280x720 frame is 8x21 px at 448 px input) towards its
smallest anchors; in a tile the network sees it at full resolution. The whole frame may run too
(SAHI's "standard prediction"), so objects larger than a tile are still seen whole.

Merging: the tiles overlap by at least `overlap` of a tile, so an object smaller than that is
whole in some tile even when an interior tile edge cuts it in another. A box touching an
interior edge of its tile is dropped when it lies mostly inside (intersection over its own area)
a box of the same class that touches none: it is a piece of that object. Class-wise NMS then
removes the copies of objects seen whole by several tiles.

Training to match (`ObjectCrop`, a loader transform): tile-size crops around objects at full
resolution, so a fine-tune sees objects at the scale tiled inference will show them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import batched_nms, box_area
from torchvision.transforms import v2

from avperception_assets.model.detector import set_input_size

EDGE_MARGIN = 4  # px: a box this close to an interior tile edge counts as cut by it
CONTAINMENT = 0.5  # a cut box this much inside a whole box of its class is a piece of it
COCO_MAX_DETECTIONS = 100  # COCO scores the 100 best boxes of a frame


def tile_starts(length: int, size: int, overlap: float) -> list[int]:
    """Offsets of tiles along one side: a stride of size x (1 - overlap), the last tile shifted
    inward to end at the edge (so every tile is whole); one tile when the side fits in one."""
    if length <= size:
        return [0]
    stride = max(1, int(size * (1 - overlap)))
    return [*range(0, length - size, stride), length - size]


def tile_grid(height: int, width: int, size: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """(x1, y1, x2, y2) of every tile of a frame, row by row; tiles are size x size px, cut to the
    frame only on a side shorter than a tile."""
    return [(x, y, x + min(size, width), y + min(size, height))
            for y in tile_starts(height, size, overlap) for x in tile_starts(width, size, overlap)]


def cut_by_tile_edge(boxes: Tensor, window: Sequence[int], height: int, width: int,
                     margin: float = EDGE_MARGIN) -> Tensor:
    """Which boxes (frame coordinates) touch an edge of their tile `window` that is not a frame edge."""
    x1, y1, x2, y2 = window
    return (((boxes[:, 0] <= x1 + margin) & (x1 > 0)) | ((boxes[:, 1] <= y1 + margin) & (y1 > 0))
            | ((boxes[:, 2] >= x2 - margin) & (x2 < width)) | ((boxes[:, 3] >= y2 - margin) & (y2 < height)))


def _pieces(boxes: Tensor, labels: Tensor, cut: Tensor, containment: float) -> Tensor:
    """Cut boxes that lie mostly inside an uncut box of the same class."""
    whole = boxes[~cut]
    top_left = torch.max(boxes[:, None, :2], whole[None, :, :2])
    bottom_right = torch.min(boxes[:, None, 2:], whole[None, :, 2:])
    inside = (bottom_right - top_left).clamp(min=0).prod(-1) / box_area(boxes).clamp(min=1e-6)[:, None]
    same_class = labels[:, None] == labels[~cut][None, :]
    return cut & ((inside >= containment) & same_class).any(1)


def merge(boxes: Tensor, scores: Tensor, labels: Tensor, cut: Tensor, *, iou_threshold: float = 0.5,
          containment: float = CONTAINMENT, max_detections: int = COCO_MAX_DETECTIONS) -> Tensor:
    """Indices of the boxes kept, best score first: pieces of objects seen whole elsewhere
    dropped, then class-wise NMS."""
    candidates = (~_pieces(boxes, labels, cut, containment)).nonzero().flatten()
    kept = batched_nms(boxes[candidates], scores[candidates], labels[candidates], iou_threshold)
    return candidates[kept[:max_detections]]


class TiledDetector(torch.nn.Module):
    """A torchvision-style detector (forward(images) -> [{boxes, labels, scores}]) that runs
    `model` over `size` x `size` tiles overlapping by `overlap` (a fraction of a tile), plus the
    whole frame when `whole_frame`, and merges the boxes in frame coordinates. Eval mode only.

    Tiles reach the network as they are only if the model does not resize them: build it with
    `tiled`, which sets the model's input size for this."""

    def __init__(self, model: torch.nn.Module, size: int, overlap: float, *, whole_frame: bool = True,
                 batch_size: int = 8, iou_threshold: float = 0.5):
        super().__init__()
        if size <= 0 or not 0 <= overlap < 1:
            raise ValueError(f"tiles need a positive size and an overlap in [0, 1), got {size}, {overlap}")
        self.model, self.size, self.overlap, self.whole_frame = model, size, overlap, whole_frame
        self.batch_size, self.iou_threshold = batch_size, iou_threshold

    def _run(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        outputs = []
        for start in range(0, len(images), self.batch_size):
            outputs += self.model(images[start:start + self.batch_size])
        return outputs

    def forward(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        windows = [tile_grid(*image.shape[-2:], self.size, self.overlap) for image in images]
        crops = [image[:, y1:y2, x1:x2] for image, grid in zip(images, windows) for x1, y1, x2, y2 in grid]
        outputs = iter(self._run(crops))
        whole = iter(self._run(list(images)) if self.whole_frame else [])
        merged = []
        for image, grid in zip(images, windows):
            height, width = image.shape[-2:]
            parts = []
            for window in grid:
                out = next(outputs)
                boxes = out["boxes"] + out["boxes"].new_tensor(window[:2] * 2)
                parts.append({**out, "boxes": boxes, "cut": cut_by_tile_edge(boxes, window, height, width)})
            if self.whole_frame:
                out = next(whole)
                parts.append({**out, "cut": torch.zeros_like(out["labels"], dtype=torch.bool)})
            found = {key: torch.cat([part[key] for part in parts]) for key in ("boxes", "scores", "labels", "cut")}
            keep = merge(found["boxes"], found["scores"], found["labels"], found["cut"],
                         iou_threshold=self.iou_threshold)
            merged.append({key: found[key][keep] for key in ("boxes", "scores", "labels")})
        return merged


def tiled(model: torch.nn.Module, size: int, overlap: float, **options) -> TiledDetector:
    """`model` (a torchvision detector) as a TiledDetector. Sets the model's input size for
    tiles, so it changes `model`: give it one that is not used untiled afterwards.

    The shorter side becomes the tile size, so a whole tile goes in unscaled (a frame narrower
    than a tile is not cut to a square, and is scaled up to it); the longer side keeps the
    model's own limit, so the whole frame, when it runs too, fits the tile on its shorter side
    and that limit on its longer one (for distant_person's 448 px tiles, exactly its untiled
    448x796 input)."""
    set_input_size(model, size, max(size, model.transform.max_size))
    return TiledDetector(model, size, overlap, **options)


def _window_start(low: float, high: float, window: int, length: int) -> int:
    """A random start of a `window` within [0, length) holding [low, high) when it fits (else
    lying within it)."""
    first, last = (min(max(int(v), 0), length - window) for v in (high - window, low))
    first, last = min(first, last), max(first, last)
    return int(torch.randint(first, last + 1, ()))


class ObjectCrop(v2.Transform):
    """A `size` x `size` crop at full resolution around one object picked at random (anywhere
    in a frame without objects): training on it shows the network objects at the scale tiled
    inference shows them. Boxes cut by the crop are kept, clipped, as a tile would see them."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def make_params(self, flat_inputs: list) -> dict:
        boxes = next(x for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes))
        height, width = boxes.canvas_size
        crop_h, crop_w = min(self.size, height), min(self.size, width)
        if len(boxes):
            x1, y1, x2, y2 = boxes[int(torch.randint(len(boxes), ()))].tolist()
        else:
            x1, y1, x2, y2 = 0, 0, width, height
        return {"top": _window_start(y1, y2, crop_h, height), "left": _window_start(x1, x2, crop_w, width),
                "height": crop_h, "width": crop_w}

    def transform(self, inpt, params: dict):
        return v2.functional.crop(inpt, **params)
