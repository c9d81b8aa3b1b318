"""Pixel helpers: [-1, 1] tensors <-> uint8/PIL, exact; resize-to-cover; area fitting."""
import torch
from PIL import Image

from flux2 import images
from flux2.buckets import fit_area


def test_tensor_pil_round_trip_is_exact():
    pixels = torch.randint(0, 256, (16, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    im = Image.fromarray(pixels.numpy(), "RGB")
    x = images.to_tensor(im)
    assert x.shape == (3, 16, 24) and x.min() >= -1 and x.max() <= 1
    (back,) = images.to_pil(x[None])
    assert back.mode == "RGB" and back.size == (24, 16)
    assert torch.equal(torch.from_numpy(__import__("numpy").array(back)), pixels)
    clamped = images.to_pil(torch.tensor([-2.0, 0.0, 2.0]).view(1, 3, 1, 1))[0].getpixel((0, 0))
    assert clamped == (0, 128, 255)


def test_resize_cover_crop_and_fit_area():
    im = Image.new("RGB", (300, 100), (10, 20, 30))
    out = images.resize_cover_crop(im, 64, 64)
    assert out.size == (64, 64) and out.getpixel((32, 32)) == (10, 20, 30)
    assert fit_area(3000, 1000, 1024 * 1024) == (1760, 576)
    assert fit_area(100, 70, None) == (96, 64)
