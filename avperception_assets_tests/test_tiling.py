"""Tiled inference: the tile grid, and merging across tiles on a constructed frame with a
deterministic stand-in detector."""

from __future__ import annotations

import pytest
import torch

from avperception_assets.model import tiling

PERSON = 1


class BrightRectangles(torch.nn.Module):
    """Stands in for a detector: each distinct non-zero brightness of channel 0 is one object,
    boxed where it is visible in the image it is given (a tile sees only its part)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # `predict` reads the device from it
        self.calls = []

    def forward(self, images):
        self.calls.append([tuple(image.shape[-2:]) for image in images])
        outputs = []
        for image in images:
            values = [v for v in image[0].unique().tolist() if v > 0]
            boxes = []
            for value in values:
                ys, xs = (image[0] == value).nonzero(as_tuple=True)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            outputs.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            "scores": torch.tensor(values, dtype=torch.float32),
                            "labels": torch.full((len(values),), PERSON, dtype=torch.int64)})
        return outputs


def frame_with(rectangles, height=192, width=320):
    """A dark frame with each (x1, y1, x2, y2) painted at its own brightness."""
    image = torch.zeros(3, height, width)
    for k, (x1, y1, x2, y2) in enumerate(rectangles):
        image[0, y1:y2, x1:x2] = 0.5 + 0.1 * k
    return image


GRIDS = [(720, 1280, 448, 0.2), (192, 320, 96, 0.5), (180, 320, 128, 0.25)]


@pytest.mark.parametrize("height,width,size,overlap", GRIDS)
def test_tiles_are_whole_overlap_and_cover_the_frame(height, width, size, overlap):
    grid = tiling.tile_grid(height, width, size, overlap)
    covered = torch.zeros(height, width, dtype=torch.int64)
    for x1, y1, x2, y2 in grid:
        assert (x2 - x1, y2 - y1) == (size, size) and 0 <= x1 and 0 <= y1 and x2 <= width and y2 <= height
        covered[y1:y2, x1:x2] += 1
    assert (covered > 0).all()
    for axis, length in ((0, width), (1, height)):
        starts = sorted({tile[axis] for tile in grid})
        assert all(b - a <= size * (1 - overlap) for a, b in zip(starts, starts[1:]))  # overlap ≥ asked
        assert starts[0] == 0 and starts[-1] + size == length


@pytest.mark.parametrize("height,width,size,overlap", GRIDS)
def test_an_object_no_larger_than_the_overlap_is_whole_in_some_tile(height, width, size, overlap):
    """What merging relies on: at every position, an object whose sides are at most the overlap
    lies whole inside some tile (tiles are a product of x and y offsets, so per side)."""
    side = int(size * overlap)
    for length, starts in ((width, tiling.tile_starts(width, size, overlap)),
                           (height, tiling.tile_starts(height, size, overlap))):
        assert all(any(start <= low and low + side <= start + size for start in starts)
                   for low in range(length - side + 1))


def test_a_frame_smaller_than_a_tile_is_one_tile():
    assert tiling.tile_grid(100, 300, 128, 0.2) == [(0, 0, 128, 100), (102, 0, 230, 100), (172, 0, 300, 100)]
    assert tiling.tile_grid(100, 120, 128, 0.2) == [(0, 0, 120, 100)]


def test_merging_reports_each_object_once_with_its_whole_box():
    rectangles = [
        (86, 20, 106, 50),  # cut by the right edge of the first tile (x 0..96), whole in the next
        (60, 60, 80, 84),  # in the overlap of four tiles
        (300, 150, 320, 192),  # at the frame's corner: frame edges cut nothing
        (140, 40, 152, 90),  # cut by horizontal tile edges only
    ]
    model = BrightRectangles()
    detector = tiling.TiledDetector(model, 96, 0.5, whole_frame=False).eval()
    [out] = detector([frame_with(rectangles)])
    assert sorted(out["boxes"].tolist()) == sorted([list(map(float, r)) for r in rectangles])
    assert out["labels"].tolist() == [PERSON] * 4
    assert out["scores"].tolist() == sorted(out["scores"].tolist(), reverse=True)
    grid = tiling.tile_grid(192, 320, 96, 0.5)
    assert [len(call) for call in model.calls] == [8, 8, 2] and len(grid) == 18  # tiles in batches of 8
    # Unmerged, the stand-in saw pieces and copies: 4 objects, 17 boxes.
    assert sum(len(o["boxes"]) for o in model([frame_with(rectangles)[:, y1:y2, x1:x2] for x1, y1, x2, y2 in grid])) == 17


def test_the_whole_frame_finds_what_no_tile_holds():
    big = (20, 10, 250, 180)  # larger than a tile: cut in every tile that sees it
    model = BrightRectangles()
    [tiles_only] = tiling.TiledDetector(model, 96, 0.5, whole_frame=False)([frame_with([big])])
    assert big not in [tuple(b) for b in tiles_only["boxes"].int().tolist()]
    [with_frame] = tiling.TiledDetector(model, 96, 0.5, whole_frame=True)([frame_with([big])])
    assert [tuple(b) for b in with_frame["boxes"].int().tolist()] == [big]
    assert model.calls[-1] == [(192, 320)]  # the whole frame, in its own batch


def test_tiled_sets_the_models_input_size_to_the_tile():
    from avperception_assets.model import detector

    model = detector.build_detector(detector.get_profile("cpu", min_size=160, max_size=284))
    wrapped = tiling.tiled(model, 128, 0.25)
    assert wrapped.model is model and model.transform.min_size == (128,) and model.transform.max_size == 284
    tile = torch.zeros(3, 128, 128)
    images, _ = model.transform([tile])
    assert tuple(images.tensors.shape[-2:]) == (128, 128)  # a tile goes in unscaled
