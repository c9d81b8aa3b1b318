"""Small datasets the tests write: coloured shapes with captions that describe them (optionally with controls)."""
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 170, 60), "yellow": (230, 210, 40)}


def write_shapes_dataset(folder: Path, n: int = 12, size: int = 64, seed: int = 0, controls: bool = False) -> Path:
    """n images `img00.png`... with `.txt` captions ("a red circle on a blue background"); with `controls`, a
    `controls/` folder holding for each image the same scene with the shape in grey (an edit pair)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    if controls:
        (folder / "controls").mkdir(exist_ok=True)
    for i in range(n):
        fg, bg = rng.sample(list(COLOURS), 2)
        shape = rng.choice(["circle", "square"])
        r = size // 4
        x, y = rng.randint(r, size - r), rng.randint(r, size - r)
        for target, colour in ((folder / f"img{i:02d}.png", COLOURS[fg]),
                               (folder / "controls" / f"img{i:02d}.png", (128, 128, 128))):
            if target.parent.name == "controls" and not controls:
                continue
            im = Image.new("RGB", (size, size), COLOURS[bg])
            draw = ImageDraw.Draw(im)
            (draw.ellipse if shape == "circle" else draw.rectangle)([x - r, y - r, x + r, y + r], fill=colour)
            im.save(target)
        (folder / f"img{i:02d}.txt").write_text(f"a {fg} {shape} on a {bg} background")
    return folder


def write_params(folder: Path, model: dict, extra: str = "", controls: bool = False, resolution: int = 64,
                 sources: str | None = None) -> Path:
    """A params.yaml for the tiny model files in `model` and the dataset in folder/ds (or `sources`: the lines of
    dataset.sources, each `    - {...}`)."""
    control = "\n      control_directory: ds/controls" if controls else ""
    sources = sources or f"    - image_directory: ds\n      resolution: {resolution}{control}"
    text = f"""model:
  model_version: tiny
  dit: {model['dit']}
  vae: {model['vae']}
  text_encoder: {model['text_encoder']}
dataset:
  min_side: 32
  sources:
{sources}
eval:
  holdout_fraction: 0.25
  holdout_min_items: 0
  prompts: ["a red circle on a blue background", "a green square on a yellow background"]
  image_size: [{resolution}, {resolution}]
train:
  network_dim: 8
  network_alpha: 8
  learning_rate: 0.002
  mixed_precision: "no"
  max_train_steps: 20
  save_every_n_steps: 10
tracking:
  tracking_uri: sqlite:///{folder / 'mlflow.db'}
{extra}"""
    path = folder / "params.yaml"
    path.write_text(text)
    return path


def copy_pipeline(src: Path, dst: Path) -> Path:
    """A private copy `dst` of a pipeline folder (conftest's cached_pipeline), its params.yaml pointed at the copy."""
    shutil.copytree(src, dst)
    (dst / "params.yaml").write_text((src / "params.yaml").read_text().replace(str(src), str(dst)))
    return dst
