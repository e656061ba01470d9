"""Pixels: JPEG/PNG bytes to frames with the training decoder, and the threads per-frame work runs on.

Every stage that decodes a frame (curation's dhash, the decode audit, the loader) decodes it
here, so a frame that decodes for one decodes for all.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def decode(image_bytes) -> "torch.Tensor":
    """JPEG/PNG bytes (an Arrow binary scalar or bytes) to a uint8 RGB CHW tensor."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    raw = image_bytes.as_buffer() if hasattr(image_bytes, "as_buffer") else image_bytes
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)  # copy: Arrow buffers are read-only
    return decode_image(data, mode=ImageReadMode.RGB)


@functools.cache
def frame_threads() -> ThreadPoolExecutor:
    """This process's threads for per-frame work that releases the GIL (decodes, casts)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ThreadPoolExecutor(max_workers=min(8, cores), thread_name_prefix="frames")


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads: start afresh
    os.register_at_fork(after_in_child=frame_threads.cache_clear)


def on_frame_threads(func, items) -> list:
    """`func` of each item, in order, on the frame threads (a single item runs inline)."""
    if len(items) < 2:
        return [func(item) for item in items]
    return list(frame_threads().map(func, items))
