"""What the demo stages share: their settings and the base pictures as one uint8 tensor."""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's flux2, whatever the environment has installed
MODEL_DIR = REPO / "assets" / "tiny"


def load_params() -> dict:
    """demo/params.yaml, with torch set to its thread count (1: fastest on a busy 2-core machine)."""
    p = yaml.safe_load((Path(__file__).parent / "params.yaml").read_text())
    torch.set_num_threads(p["threads"])
    return p


def load_pictures(name: str, folder: Path = Path(__file__).parent / "data") -> tuple[torch.Tensor, list[str]]:
    """The pictures `name` (images | codec) of make_images as (N, 3, H, W) uint8, and their captions."""
    rows = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
    pixels = np.stack([np.asarray(Image.open(folder / r["image"]).convert("RGB")) for r in rows])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [r["caption"] for r in rows]


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (as flux2.images.to_tensor)."""
    return pixels.float() / 127.5 - 1.0
