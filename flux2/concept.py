"""The concept score: how much of a sample shows the concept a LoRA was trained on, from the pixels alone.

A concept is a colour the base model never produces (`eval.concept` in params.yaml). The embedded default
teaches "a purple star" to a base that never saw purple, so the share of purple pixels in a sample tells whether
the concept is there: about 0 for the base, several percent for a LoRA that learned it (a star covers 5-15% of
a picture). Two numbers per set of samples: the mean share of concept pixels (`concept_score`) and the share of
samples that show the concept at all (`concept_presence`: at least `min_fraction` of their pixels).
Pure functions on PIL images; numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Concept:
    """What to look for: pixels within `tolerance` (Euclidean distance in 8-bit RGB) of `colour`; a sample shows
    the concept when at least `min_fraction` of its pixels do. `word`: the prompts that ask for the concept
    contain it (None: every prompt does)."""

    colour: tuple[int, int, int]
    tolerance: float = 60.0
    min_fraction: float = 0.02
    word: str | None = None

    def __post_init__(self) -> None:
        colour = tuple(self.colour)
        if len(colour) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in colour):
            raise ValueError(f"eval.concept.colour: expected three integers 0-255 (r, g, b), got {self.colour!r}")
        object.__setattr__(self, "colour", colour)
        if not 0 < self.tolerance <= 442:  # 442 > sqrt(3) * 255: every colour
            raise ValueError(f"eval.concept.tolerance: expected a distance in (0, 442] (8-bit RGB), got "
                             f"{self.tolerance!r}")
        if not 0 < self.min_fraction <= 1:
            raise ValueError(f"eval.concept.min_fraction: expected a share of pixels in (0, 1], got "
                             f"{self.min_fraction!r}")

    def asks_for(self, prompt: str) -> bool:
        """Whether `prompt` asks for the concept (contains `word`, case-insensitively; always without a word)."""
        return self.word is None or self.word.lower() in prompt.lower()


def colour_fraction(image: Image.Image, colour: tuple[int, int, int], tolerance: float) -> float:
    """The share of pixels of `image` (any mode; compared in RGB) within `tolerance` of `colour`."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    distance2 = ((pixels - np.asarray(colour, dtype=np.int32)) ** 2).sum(axis=-1)
    return float((distance2 <= tolerance * tolerance).mean())


def concept_fractions(images: Iterable[Image.Image], concept: Concept) -> list[float]:
    """colour_fraction of each image."""
    return [colour_fraction(im, concept.colour, concept.tolerance) for im in images]


def concept_score(images: Iterable[Image.Image], concept: Concept) -> float:
    """The mean share of concept pixels over `images` (ValueError when there are none)."""
    fractions = concept_fractions(images, concept)
    if not fractions:
        raise ValueError("concept_score needs at least one image")
    return float(np.mean(fractions))


def concept_presence(images: Iterable[Image.Image], concept: Concept) -> float:
    """The share of `images` in which at least `concept.min_fraction` of the pixels are concept pixels."""
    fractions = concept_fractions(images, concept)
    if not fractions:
        raise ValueError("concept_presence needs at least one image")
    return sum(f >= concept.min_fraction for f in fractions) / len(fractions)
