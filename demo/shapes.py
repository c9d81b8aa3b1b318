"""Procedural pictures: one flat-coloured shape on a flat background, with a caption that describes it.

The DiT's pictures use BASE_COLOURS x BASE_SHAPES; the autoencoder's use BASE_SHAPES in CODEC_COLOURS; the
bundled LoRA dataset teaches the CONCEPT, a colour word, colour and shape the DiT never saw. Everything is a function of a seed (random.Random), so the pictures are the same on every run. Shapes are
drawn 4x larger and box-filtered down: soft, anti-aliased edges.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

BASE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 210), "yellow": (235, 215, 50),
    "orange": (240, 140, 30), "white": (240, 240, 240), "black": (25, 25, 25),
}
BASE_SHAPES = ("circle", "square", "triangle")

# The LoRA's concept: neither the word nor the shape nor the colour is in the DiT's pictures.
CONCEPT_COLOUR_NAME, CONCEPT_SHAPE = "purple", "star"
CONCEPT_COLOUR = (145, 55, 200)

# The autoencoder is a general codec, as FLUX.2's is: it also learns colours the DiT never sees, the concept's
# among them, so that it can represent what a LoRA teaches. (Trained on arbitrary RGB colours instead, it
# reconstructed far worse in the same time: 15 dB instead of 28.)
CODEC_COLOURS = {**BASE_COLOURS, CONCEPT_COLOUR_NAME: CONCEPT_COLOUR, "pink": (240, 130, 180),
                 "cyan": (40, 200, 220), "brown": (120, 70, 30), "grey": (128, 128, 128), "navy": (20, 30, 100),
                 "lime": (150, 230, 60), "magenta": (220, 40, 160)}

SUPERSAMPLE = 4
JITTER = 10  # per-channel colour jitter, so a colour word covers a small range


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    rgb: tuple[int, int, int]
    background: str
    background_rgb: tuple[int, int, int]
    cx: float  # centre and size, as fractions of the image side
    cy: float
    size: float

    @property
    def caption(self) -> str:
        return f"{article(self.colour)} {self.colour} {self.shape} on {article(self.background)} {self.background} background"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def jitter(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-JITTER, JITTER))) for c in rgb)


def random_scene(rng: random.Random, shapes: tuple[str, ...], colours: dict[str, tuple[int, int, int]],
                 backgrounds: dict[str, tuple[int, int, int]]) -> Scene:
    """A shape of a random colour, size (30-60% of the side) and position (fully inside) on another colour."""
    shape = rng.choice(shapes)
    colour = rng.choice(sorted(colours))
    background = rng.choice(sorted(b for b in backgrounds if b != colour))
    size = rng.uniform(0.3, 0.6)
    cx, cy = rng.uniform(size / 2, 1 - size / 2), rng.uniform(size / 2, 1 - size / 2)
    return Scene(shape, colour, jitter(rng, colours[colour]), background, jitter(rng, backgrounds[background]),
                 cx, cy, size)


def polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of an upright triangle or five-pointed star of circumradius r around (cx, cy)."""
    if shape == "triangle":
        return [(cx + r * math.sin(a), cy - r * math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    if shape == "star":
        inner = r * 0.5
        return [(cx + (r if k % 2 == 0 else inner) * math.sin(k * math.pi / 5),
                 cy - (r if k % 2 == 0 else inner) * math.cos(k * math.pi / 5)) for k in range(10)]
    raise ValueError(f"no polygon for shape {shape!r}")


def render(scene: Scene, resolution: int, rgb: tuple[int, int, int] | None = None) -> Image.Image:
    """The scene as a resolution x resolution RGB image (`rgb` overrides the shape's colour)."""
    side = resolution * SUPERSAMPLE
    im = Image.new("RGB", (side, side), scene.background_rgb)
    draw = ImageDraw.Draw(im)
    fill = rgb or scene.rgb
    cx, cy, r = scene.cx * side, scene.cy * side, scene.size * side / 2
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        h = r * 0.85  # about the area of the circle of the same size
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        # Triangles and stars are centred on their circumcircle, pushed down a little to look centred.
        draw.polygon(polygon(scene.shape, cx, cy + 0.1 * r, r * 1.05), fill=fill)
    return im.resize((resolution, resolution), Image.BOX)
