"""The concept score on synthetic images: exact shares of pixels near the concept colour."""
import pytest
from PIL import Image, ImageDraw

from flux2.concept import Concept, colour_fraction, concept_presence, concept_score

PURPLE = (145, 55, 200)


def picture(fill: tuple[int, int, int], background: tuple[int, int, int] = (40, 160, 60), box: int = 0,
            size: int = 20) -> Image.Image:
    """A size x size background with a box x box square of `fill` in the top left corner."""
    im = Image.new("RGB", (size, size), background)
    if box:
        ImageDraw.Draw(im).rectangle([0, 0, box - 1, box - 1], fill=fill)
    return im


def test_colour_fraction_counts_pixels_near_the_colour():
    assert colour_fraction(picture(PURPLE, box=10), PURPLE, 40) == pytest.approx(100 / 400)
    assert colour_fraction(picture(PURPLE, box=0), PURPLE, 40) == 0.0
    assert colour_fraction(Image.new("RGB", (8, 8), PURPLE), PURPLE, 1) == 1.0


def test_tolerance_is_a_euclidean_distance_in_rgb():
    near = (PURPLE[0] + 30, PURPLE[1] + 40, PURPLE[2])  # distance 50
    im = Image.new("RGB", (4, 4), near)
    assert colour_fraction(im, PURPLE, 50) == 1.0
    assert colour_fraction(im, PURPLE, 49.9) == 0.0


def test_other_modes_are_compared_in_rgb():
    rgba = Image.new("RGBA", (4, 4), PURPLE + (255,))
    grey = Image.new("L", (4, 4), 128)
    assert colour_fraction(rgba, PURPLE, 1) == 1.0
    assert colour_fraction(grey, (128, 128, 128), 1) == 1.0


def test_score_and_presence_over_samples():
    concept = Concept(PURPLE, tolerance=40, min_fraction=0.05)
    samples = [picture(PURPLE, box=10), picture(PURPLE, box=2), picture((215, 40, 40), box=10)]
    # shares 0.25, 0.01, 0 (red is far from purple)
    assert concept_score(samples, concept) == pytest.approx((0.25 + 0.01) / 3)
    assert concept_presence(samples, concept) == pytest.approx(1 / 3)
    assert concept_score(iter(samples), concept) == pytest.approx((0.25 + 0.01) / 3)  # any iterable


def test_the_base_colours_of_the_demo_are_not_the_concept():
    # The embedded default's base pictures use these colours; none may count as purple at the default tolerance.
    concept = Concept(PURPLE)
    for colour in [(215, 40, 40), (40, 160, 60), (40, 70, 210), (235, 215, 50), (240, 140, 30), (240, 240, 240),
                   (25, 25, 25)]:
        assert colour_fraction(Image.new("RGB", (4, 4), colour), concept.colour, concept.tolerance) == 0.0


def test_prompts_that_ask_for_the_concept():
    concept = Concept(PURPLE, word="Purple")
    assert concept.asks_for("a purple star on a blue background")
    assert not concept.asks_for("a red circle on a blue background")
    assert Concept(PURPLE).asks_for("anything")


@pytest.mark.parametrize("kwargs, message", [
    (dict(colour=(1, 2)), "three integers"),
    (dict(colour=(1, 2, 300)), "three integers"),
    (dict(colour=(1.5, 2, 3)), "three integers"),
    (dict(colour=(1, 2, 3), tolerance=0), "tolerance"),
    (dict(colour=(1, 2, 3), min_fraction=0), "min_fraction"),
    (dict(colour=(1, 2, 3), min_fraction=1.5), "min_fraction"),
])
def test_bad_settings_are_refused_with_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Concept(**kwargs)


def test_a_list_colour_from_yaml_is_accepted():
    assert Concept([145, 55, 200]).colour == PURPLE


def test_no_images_is_an_error():
    with pytest.raises(ValueError, match="at least one image"):
        concept_score([], Concept(PURPLE))
    with pytest.raises(ValueError, match="at least one image"):
        concept_presence([], Concept(PURPLE))
