"""Stage make_images: the base model's training pictures, from params.yaml's seed.

    data/images/*.png + data/images.jsonl ({"image": ..., "caption": ...} per line): the DiT's pictures, a base
        shape of a named base colour on another, captioned ("a red circle on a blue background")
    data/codec/*.png + data/codec.jsonl (captions empty): the autoencoder's pictures, base shapes in
        CODEC_COLOURS, the concept's colour among them, so that the codec can represent it
"""
import json
import random
from pathlib import Path

import yaml

from shapes import BASE_COLOURS, BASE_SHAPES, CODEC_COLOURS, random_scene, render


def write(name: str, scenes: list, resolution: int, captions: bool) -> None:
    out = Path("data") / name
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, scene in enumerate(scenes):
        render(scene, resolution).save(out / f"{i:05d}.png")
        lines.append(json.dumps({"image": f"{name}/{i:05d}.png", "caption": scene.caption if captions else ""}))
    Path(f"data/{name}.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pictures to {out}")


def main() -> None:
    p = yaml.safe_load(Path("params.yaml").read_text())
    rng = random.Random(p["seed"])
    write("images", [random_scene(rng, BASE_SHAPES, BASE_COLOURS, BASE_COLOURS) for _ in range(p["images"]["count"])],
          p["resolution"], captions=True)
    write("codec", [random_scene(rng, BASE_SHAPES, CODEC_COLOURS, CODEC_COLOURS)
                    for _ in range(p["images"]["codec_count"])], p["resolution"], captions=False)


if __name__ == "__main__":
    main()
