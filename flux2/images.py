"""Pixels: opening user images safely, resizing to a bucket, and converting to and from [-1, 1] tensors."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch import Tensor

from flux2.user_files import UserFileError, open_regular

# Refuse decompression bombs early, with our own message (see open_rgb).
MAX_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = None  # we check the size ourselves before decoding


class ImageError(ValueError):
    """An image that cannot be used, with the reason."""


def open_rgb(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image fully: EXIF orientation applied, any mode converted to RGB (alpha composited on white).

    Raises ImageError naming the file when it cannot be read or is larger than `max_pixels`.
    """
    return _decode(path, max_pixels, to_rgb)


def open_mask(path: str | Path, alpha: bool = False, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A loss mask as 8-bit greyscale ("L", white = learn, black = ignore), EXIF orientation applied: a mask image
    (any mode, as luma), or with `alpha` the alpha channel of the image at `path`. Raises ImageError naming the
    file when it cannot be read, or (alpha) when the image has no alpha channel."""
    def convert(im: Image.Image) -> Image.Image:
        return alpha_channel(im, path) if alpha else to_rgb(im).convert("L")

    return _decode(path, max_pixels, convert)


def open_rgb_and_decoded(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, Image.Image]:
    """open_rgb's image and the decoded image it was converted from (EXIF-oriented, in its own mode), from one
    decode: for a caller that also needs the image's alpha_channel."""
    return _decode(path, max_pixels, lambda im: (to_rgb(im), im))


def alpha_channel(im: Image.Image, path: str | Path) -> Image.Image:
    """The alpha channel of the decoded image `im` (read from `path`) as "L"; ImageError when it has none."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode not in ("RGBA", "LA", "PA", "La", "RGBa"):
        raise ImageError(f"{path}: has no alpha channel (mode {im.mode}); save it with transparency, or give "
                         f"the masks in a mask_directory instead of alpha_mask")
    return im.getchannel("A")


def _decode(path: str | Path, max_pixels: int, convert) -> Image.Image:
    """`convert(image)` of the fully decoded, EXIF-oriented image; every failure is an ImageError naming the file."""
    path = Path(path)
    try:
        with open_regular(path) as f, Image.open(f) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{path}: {w}x{h} is over the {max_pixels:,}-pixel limit; downscale it first")
            im.load()
            im = ImageOps.exif_transpose(im)
            return convert(im)
    except ImageError:
        raise
    except UserFileError as e:  # a FIFO or device named like an image: never opened by PIL
        raise ImageError(str(e)) from None
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: not a readable image ({e})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparent pixels become white; 16-bit images are scaled, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale the actual range to 8 bits instead of clipping at 255.
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype("uint8"), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        return background
    return im.convert("RGB")


def resize_cover_crop(im: Image.Image, width: int, height: int) -> Image.Image:
    """Scale so the image covers width x height (aspect kept), then centre-crop to exactly that size."""
    w, h = im.size
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) != (w, h):
        resample = Image.LANCZOS if scale > 1 else Image.BOX
        im = im.resize((new_w, new_h), resample=resample)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return im.crop((left, top, left + width, top + height))


def to_tensor(im: Image.Image) -> Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(im.height, im.width, 3)
    return t.permute(2, 0, 1).float() / 127.5 - 1.0


def to_pil(x: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images (clamped, rounded)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [Image.fromarray(a.numpy(), "RGB") for a in x]
