"""Aspect-ratio buckets: the training size of each image, on a 16-pixel grid, at its source's target area.

The rule is musubi-tuner's (so an existing dataset config gives the same buckets): for a target of W x H
pixels, widths run from floor16(isqrt(W*H) / 2) up to the first multiple of 16 at or above isqrt(W*H), each
with height floor16(W*H // width); both orientations; an image goes to the bucket whose aspect ratio is
nearest to its own (the first such bucket in sorted order on a tie).
"""
from __future__ import annotations

import math

STEP = 16  # FLUX.2: 8x autoencoder downsampling, then 2x2 patches


def floor_to(value: int, step: int = STEP) -> int:
    """`value` rounded down to a multiple of `step`."""
    return value // step * step


def target_size(resolution: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    """A source's `resolution` (one side, or [width, height]) as (width, height)."""
    if isinstance(resolution, int):
        return resolution, resolution
    if len(resolution) == 1:
        return resolution[0], resolution[0]
    width, height = resolution
    return int(width), int(height)


def bucket_resolutions(width: int, height: int, step: int = STEP) -> list[tuple[int, int]]:
    """All buckets (w, h) for a target of width x height pixels, sorted."""
    area = width * height
    side = math.isqrt(area)
    buckets = set()
    for w in range(floor_to(side // 2, step), side + step, step):
        h = floor_to(area // w, step)
        buckets.add((w, h))
        buckets.add((h, w))
    return sorted(buckets)


def nearest_bucket(image_width: int, image_height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's; the first in `buckets` on a tie."""
    aspect = image_width / image_height
    return min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))


def select_bucket(image_width: int, image_height: int, resolution: int | list[int] | tuple[int, int],
                  enable_bucket: bool = True, no_upscale: bool = False, step: int = STEP) -> tuple[int, int]:
    """The (width, height) an image of image_width x image_height is trained at.

    - enable_bucket false: exactly the source resolution (the image is resized to cover it, then centre-cropped);
    - no_upscale and the image is no larger than the target area: its own size, each side floored to `step`;
    - otherwise: the nearest-aspect bucket of `bucket_resolutions`.
    """
    width, height = target_size(resolution)
    if not enable_bucket:
        if width % step or height % step:
            raise ValueError(f"resolution {width}x{height}: with enable_bucket false each side must be a multiple "
                             f"of {step}; use {floor_to(width, step) or step}x{floor_to(height, step) or step}")
        return width, height
    if no_upscale and image_width * image_height <= width * height:
        return fit_area(image_width, image_height, None, step)
    return nearest_bucket(image_width, image_height, bucket_resolutions(width, height, step))


def fit_area(width: int, height: int, max_area: int | None, multiple: int = STEP) -> tuple[int, int]:
    """The size (w, h) an image of width x height is brought to: scaled down (aspect kept) to at most max_area
    pixels when it is larger, then each side floored to a multiple of `multiple`."""
    if max_area is not None and width * height > max_area:
        s = math.sqrt(max_area / (width * height))
        width, height = width * s, height * s
    return max(multiple, int(width) // multiple * multiple), max(multiple, int(height) // multiple * multiple)


def control_bucket(control_width: int, control_height: int, item_bucket: tuple[int, int],
                   no_resize: bool = False, control_resolution: int | list[int] | tuple[int, int] | None = None,
                   step: int = STEP) -> tuple[int, int]:
    """The (width, height) a reference (control) image of control_width x control_height is trained at, by
    musubi-tuner's rules for FLUX.2 edit datasets:

    - neither option: the bucket of the item it belongs to;
    - no_resize: its own size, each side floored to `step`;
    - control_resolution: the nearest-aspect bucket of that target area (its own aspect kept);
    - both: its own size (floored) while its area is within control_resolution's, else scaled down to that area.
    """
    if control_resolution is None:
        return fit_area(control_width, control_height, None, step) if no_resize else tuple(item_bucket)
    width, height = target_size(control_resolution)
    if no_resize:
        return fit_area(control_width, control_height, width * height, step)
    return nearest_bucket(control_width, control_height, bucket_resolutions(width, height, step))
