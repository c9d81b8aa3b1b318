"""A dataset of good and bad inputs written as real files, for the ingest tests and any stage that reads data.

`write_bad_corpus(dir)` writes

    dir/images/      a folder source: images + .txt captions (source 0, control_directory dir/controls)
    dir/controls/    controls by stem: `good_photo_0/_1` (two), `gray_0000` (numbered form), others `name.png`
    dir/manifest/    manifest.jsonl (source 1, root = dir/manifest) with a good row, an escape (../outside.png),
                     a symlink that escapes, a missing file, and a row with two columns for one control
    dir/outside.png  a good image outside the manifest's root
    dir/masked/      a folder source with loss masks in dir/masks/ (source 2): a good one, a missing one, one of
                     the wrong size

and returns {file name: expected reason code, or None for an item that must be used}. Images are 64-96 px
(dataset.min_side's default is 64); `bad_corpus_sources(dir)` gives the three sources at resolution 64.
"""
from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from flux2.params import SourceParams


def noise(width: int, height: int, seed: int) -> Image.Image:
    """A random RGB image (distinct bytes per seed)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def encoded(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (valid CRCs) with one tiny IDAT: cheap to open, huge to decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no filter, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def write_bad_corpus(root: str | Path) -> dict[str, str | None]:
    """Write the corpus under `root` (see the module docstring); {file name: reason code or None (good)}."""
    root = Path(root)
    images, controls, manifest_dir = root / "images", root / "controls", root / "manifest"
    for d in (images, controls, manifest_dir):
        d.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}

    def image(name: str, data: bytes, reason: str | None, caption: str | bytes | None = "a photo",
              control: bool = True) -> None:
        (images / name).write_bytes(data)
        if caption is not None:
            text = caption if isinstance(caption, bytes) else caption.encode("utf-8")
            (images / f"{Path(name).stem}.txt").write_bytes(text)
        if control:
            (controls / f"{Path(name).stem}.png").write_bytes(encoded(noise(32, 32, 1000 + len(expected)), "PNG"))
        expected[name] = reason

    # Good, some needing conversion.
    good = encoded(noise(96, 64, 1), "PNG")
    image("good_rgb.png", good, None, caption="  a red thing \n")
    image("good_photo.jpg", encoded(noise(64, 96, 2), "JPEG", quality=90), None, control=False)
    for i in range(2):
        (controls / f"good_photo_{i}.png").write_bytes(encoded(noise(48, 32, 900 + i), "PNG"))
    image("cmyk.jpg", encoded(noise(80, 64, 3).convert("CMYK"), "JPEG"), None)
    deep = np.random.default_rng(4).integers(0, 65536, (64, 80), dtype=np.uint16)
    image("gray16.png", encoded(Image.fromarray(deep), "PNG"), None)
    palette = noise(80, 64, 5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image("palette_alpha.png", encoded(palette, "PNG", transparency=0), None)
    image("gray.png", encoded(noise(64, 64, 6).convert("L"), "PNG"), None, control=False)
    (controls / "gray_0000.png").write_bytes(encoded(noise(32, 32, 950), "PNG"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display -> stored 96x64 becomes 64x96
    image("exif_rotated.jpg", encoded(noise(96, 64, 7), "JPEG", exif=exif), None)

    # Bad.
    image("truncated.png", encoded(noise(96, 64, 8), "PNG")[:9000], "unreadable")
    image("truncated.jpg", encoded(noise(96, 64, 9), "JPEG", quality=95)[:2500], "unreadable")
    image("zero.png", b"", "unreadable")
    image("text.png", b"this is not an image\n", "unreadable")
    image("tiny.png", encoded(noise(1, 1, 10), "PNG"), "too_small")
    image("huge_header.png", png_header_only(30000, 30000), "too_large")
    image("no_caption.png", encoded(noise(96, 64, 11), "PNG"), "caption_missing", caption=None)
    image("empty_caption.png", encoded(noise(96, 64, 12), "PNG"), "caption_empty", caption=" \n\t")
    image("latin1_caption.png", encoded(noise(96, 64, 13), "PNG"), "caption_not_utf8", caption=b"caf\xe9 au lait")
    image("no_control.png", encoded(noise(96, 64, 14), "PNG"), "control_missing", control=False)
    image("bad_control.png", encoded(noise(96, 64, 15), "PNG"), "control_unreadable", control=False)
    (controls / "bad_control.png").write_bytes(encoded(noise(64, 64, 16), "PNG")[:500])
    image("good_rgb_copy.png", good, "duplicate")  # sorts after good_rgb.png, so it is the second copy
    image("still.gif", encoded(noise(96, 64, 20), "GIF"), "unsupported_format")
    image("long_caption.png", encoded(noise(96, 64, 21), "PNG"), "caption_too_long", caption="a word " * 4000)
    latin1 = os.fsencode(images) + b"/caf\xe9.png"  # a Latin-1 file name (its control too): not UTF-8
    with open(latin1, "wb") as f:
        f.write(encoded(noise(96, 64, 22), "PNG"))
    with open(latin1[:-4] + b".txt", "wb") as f:
        f.write(b"a cafe")
    with open(os.fsencode(controls) + b"/caf\xe9.png", "wb") as f:
        f.write(encoded(noise(32, 32, 23), "PNG"))
    expected["caf\\xe9.png"] = "bad_file_name"  # the report shows the byte as \xe9

    # A manifest whose root is its own folder.
    noise(64, 64, 17).save(manifest_dir / "m_good.png")
    noise(32, 32, 18).save(manifest_dir / "m_good_control.png")
    noise(64, 64, 19).save(root / "outside.png")
    (manifest_dir / "link_out.png").symlink_to(root / "outside.png")
    rows = [{"image_path": "m_good.png", "caption": "from the manifest", "control_path": "m_good_control.png"},
            {"image_path": "../outside.png", "caption": "escapes the root"},
            {"image_path": "link_out.png", "caption": "a symlink that escapes the root"},
            {"image_path": "missing.png", "caption": "not there"},
            {"image_path": "m_good.png", "caption": "two columns for control 1", "control_path_1": "m_good_control.png",
             "control_path_01": "m_good_control.png"}]
    (manifest_dir / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    expected.update({"m_good.png": None, "outside.png": "path_outside_root", "link_out.png": "path_outside_root",
                     "missing.png": "image_missing", "manifest.jsonl row 5": "bad_row"})

    # A folder with loss masks by stem.
    masked, masks = root / "masked", root / "masks"
    for d in (masked, masks):
        d.mkdir(parents=True, exist_ok=True)
    for i, (name, mask_size, reason) in enumerate([("mask_good.png", (96, 64), None),
                                                   ("mask_gone.png", None, "mask_missing"),
                                                   ("mask_small.png", (48, 32), "mask_unusable")]):
        noise(96, 64, 30 + i).save(masked / name)
        (masked / f"{Path(name).stem}.txt").write_text("a masked photo", encoding="utf-8")
        if mask_size:
            Image.new("L", mask_size, 255).save(masks / name)
        expected[name] = reason
    return expected


def bad_corpus_sources(root: str | Path, resolution: int = 64) -> list[SourceParams]:
    """The corpus's three sources: the image folder with its controls, the JSONL manifest, the masked folder."""
    root = Path(root).absolute()
    return [SourceParams(image_directory=str(root / "images"), control_directory=str(root / "controls"),
                         resolution=resolution),
            SourceParams(manifest=str(root / "manifest" / "manifest.jsonl"), resolution=resolution),
            SourceParams(image_directory=str(root / "masked"), mask_directory=str(root / "masks"),
                         resolution=resolution)]
