"""Aspect-ratio buckets: musubi-tuner's 16-pixel grid, nearest aspect, no_upscale, enable_bucket false."""
import math

import pytest

from flux2.buckets import bucket_resolutions, nearest_bucket, select_bucket, target_size


def test_grid_at_1024():
    buckets = bucket_resolutions(1024, 1024)
    assert buckets == sorted(set(buckets))
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 1024 * 1024 for w, h in buckets)
    assert all((h, w) in buckets for w, h in buckets)  # both orientations
    # widths floor16(1024 / 2) .. 1024, each with h = floor16(area // w)
    assert {min(b) for b in buckets} == set(range(512, 1024 + 1, 16))
    assert (1024, 1024) in buckets and (512, 2048) in buckets and (768, 1360) in buckets
    assert len(buckets) == 2 * 33 - 1  # 33 widths, the square once


def test_grid_for_a_non_square_target_follows_musubi():
    # [960, 544] (musubi's default): isqrt(area) = 722, so widths run 352 .. 736 (the first multiple of 16 >= 722).
    buckets = bucket_resolutions(960, 544)
    area = 960 * 544
    assert min(min(b) for b in buckets) == 352
    assert (736, 704) in buckets and (704, 736) in buckets and (720, 720) in buckets
    assert all(w * h <= area for w, h in buckets)


def test_nearest_aspect():
    assert select_bucket(1920, 1080, 1024) == (1360, 768)
    assert select_bucket(1080, 1920, 1024) == (768, 1360)
    assert select_bucket(3000, 3000, 1024) == (1024, 1024)
    assert select_bucket(300, 200, 1024) == nearest_bucket(300, 200, bucket_resolutions(1024, 1024))
    for size in [(640, 480), (5000, 700), (123, 4567), (999, 1001)]:  # the chosen bucket is a nearest one
        best = min(abs(w / h - size[0] / size[1]) for w, h in bucket_resolutions(512, 512))
        w, h = select_bucket(*size, 512)
        assert math.isclose(abs(w / h - size[0] / size[1]), best)
    # a tie goes to the first bucket in sorted order
    assert nearest_bucket(2, 1, [(48, 16), (32, 32), (64, 16)]) == (48, 16)  # aspect errors 1, 1, 2


def test_no_upscale_keeps_small_images_at_their_size():
    assert select_bucket(500, 300, 1024, no_upscale=True) == (496, 288)
    assert select_bucket(1024, 1024, 1024, no_upscale=True) == (1024, 1024)
    assert select_bucket(2000, 1000, 1024, no_upscale=True) == select_bucket(2000, 1000, 1024)  # larger: bucketed
    assert select_bucket(500, 300, 1024) != (496, 288)  # without no_upscale it goes to a full-area bucket


def test_enable_bucket_false_is_exactly_the_resolution():
    for size in [(500, 300), (3000, 100), (64, 64)]:
        assert select_bucket(*size, [960, 544], enable_bucket=False) == (960, 544)
        assert select_bucket(*size, 512, enable_bucket=False, no_upscale=True) == (512, 512)
    with pytest.raises(ValueError, match="multiple of 16; use 960x544"):
        select_bucket(100, 100, [970, 550], enable_bucket=False)
    assert target_size(768) == (768, 768) and target_size([960, 544]) == (960, 544) and target_size([512]) == (512, 512)
