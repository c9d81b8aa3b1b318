"""`flux2 make-tiny-model`: the tiny variant's DiT, AE and text encoder as real files, from a seed.

The files use the official formats (BFL single-file DiT and AE, Hugging Face text-encoder folder), so the tests and
the embedded default exercise the same loaders as real weights do.
"""
from __future__ import annotations

from pathlib import Path

import torch

from flux2.variants import VARIANTS, Variant


def make_tiny_model(out_dir: str | Path, seed: int = 0, variant: Variant = VARIANTS["tiny"]) -> dict[str, Path]:
    """Write dit.safetensors, ae.safetensors and text_encoder/ under out_dir; returns their paths."""
    from flux2.autoencoder import AutoEncoder
    from flux2.model import Flux2Transformer
    from flux2.safetensors_io import save_file_atomic
    from flux2.text_encoder import write_tiny_text_encoder

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"flux2.variant": variant.name, "flux2.seed": str(seed)}

    torch.manual_seed(seed)
    dit = Flux2Transformer(variant)
    save_file_atomic({k: v.contiguous() for k, v in dit.state_dict().items()}, out / "dit.safetensors", meta)

    torch.manual_seed(seed + 1)
    ae = AutoEncoder(variant.ae)
    save_file_atomic({k: v.contiguous() for k, v in ae.state_dict().items()}, out / "ae.safetensors", meta)

    te_dir = write_tiny_text_encoder(out / "text_encoder", variant, seed=seed + 2)
    return {"dit": out / "dit.safetensors", "vae": out / "ae.safetensors", "text_encoder": Path(te_dir)}
