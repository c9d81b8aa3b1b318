"""Stage make_lora_dataset: the bundled LoRA dataset (assets/dataset/), teaching the concept the base never saw:
"a purple star" (shapes.CONCEPT_*), on the base's background colours.

    images/star_NN.png + .txt      text-to-image items
    edits/edit_NN.png + .txt       edit items: controls/edit_NN.png is the same picture with a base shape (a
                                   circle, square or triangle of a base colour) where the star is
    broken items, each rejected by ingest with its own reason (EXPECTED_REJECTIONS; tests/test_demo_assets.py):
    images/truncated.png           the first half of a PNG file                 -> unreadable
    images/notes.png               a text file named .png                       -> unreadable
    images/no_caption.png          a good picture without its .txt              -> caption_missing
    edits/edit_no_control.png      an edit item whose control image is missing  -> control_missing
"""
import io
import random
import shutil
from dataclasses import replace
from pathlib import Path

from common import REPO, load_params
from shapes import (BASE_COLOURS, BASE_SHAPES, CONCEPT_COLOUR, CONCEPT_COLOUR_NAME, CONCEPT_SHAPE, jitter,
                    random_scene, render)

OUT = REPO / "assets" / "dataset"
TEXT_TO_IMAGE, EDITS = 24, 4
EXPECTED_REJECTIONS = {"images/truncated.png": "unreadable", "images/notes.png": "unreadable",
                       "images/no_caption.png": "caption_missing", "edits/edit_no_control.png": "control_missing"}


def concept_scene(rng: random.Random):
    """A large purple star near the centre, on one of the base's background colours. Large and central because
    the tiny base renders the 8x8-token pictures as coarse blobs: a small star at a random place averages out to
    background, a large central one is a concept a LoRA learns in a few hundred CPU steps."""
    scene = random_scene(rng, (CONCEPT_SHAPE,), {CONCEPT_COLOUR_NAME: CONCEPT_COLOUR}, BASE_COLOURS)
    size = rng.uniform(0.7, 0.9)
    return replace(scene, size=size, cx=0.5 + rng.uniform(-0.05, 0.05), cy=0.5 + rng.uniform(-0.05, 0.05))


def write_item(folder: Path, stem: str, scene, resolution: int, caption: bool = True) -> None:
    render(scene, resolution).save(folder / f"{stem}.png")
    if caption:
        (folder / f"{stem}.txt").write_text(scene.caption + "\n")


def main() -> None:
    p = load_params()
    res = p["resolution"]
    rng = random.Random(p["seed"] + 1000)
    shutil.rmtree(OUT, ignore_errors=True)
    images, edits, controls = OUT / "images", OUT / "edits", OUT / "controls"
    for folder in (images, edits, controls):
        folder.mkdir(parents=True)

    for i in range(TEXT_TO_IMAGE):
        write_item(images, f"star_{i:02d}", concept_scene(rng), res)
    for i in range(EDITS):
        scene = concept_scene(rng)
        write_item(edits, f"edit_{i:02d}", scene, res)
        colour = rng.choice(sorted(c for c in BASE_COLOURS if c != scene.background))
        before = replace(scene, shape=rng.choice(BASE_SHAPES))
        render(before, res, rgb=jitter(rng, BASE_COLOURS[colour])).save(controls / f"edit_{i:02d}.png")

    write_item(edits, "edit_no_control", concept_scene(rng), res)
    write_item(images, "no_caption", concept_scene(rng), res, caption=False)
    buffer = io.BytesIO()
    scene = concept_scene(rng)
    render(scene, res).save(buffer, format="PNG")
    (images / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (images / "truncated.txt").write_text(scene.caption + "\n")
    (images / "notes.png").write_text("not a picture: a text file with an image's name\n")
    (images / "notes.txt").write_text("a purple star on a white background\n")
    print(f"wrote {TEXT_TO_IMAGE} + {EDITS} items and {len(EXPECTED_REJECTIONS)} broken ones to {OUT}")


if __name__ == "__main__":
    main()
