"""`flux2` command line: one subcommand per job, options named as in the seed's scripts."""
from __future__ import annotations

import argparse
import os
import sys

from flux2.variants import VARIANTS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show every option's default in --help."""


def add_model_args(p: argparse.ArgumentParser, need_dit: bool = True) -> None:
    p.add_argument("--model_version", required=True, choices=list(VARIANTS), help="FLUX.2 variant")
    if need_dit:
        p.add_argument("--dit", required=True, help="DiT weights: BFL single file (flux2-*.safetensors)")
    p.add_argument("--vae", required=True, help="autoencoder weights (ae.safetensors)")
    p.add_argument("--text_encoder", required=True,
                   help="text encoder: a Hugging Face folder or the first file of a split set (...-00001-of-0000N)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: beside the text encoder)")
    p.add_argument("--fp8_text_encoder", action="store_true", help="text encoder Linear weights in fp8")


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images (text-to-image or editing with reference images)",
                       formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default="", help="negative prompt for true CFG (base variants)")
    p.add_argument("--image_size", type=int, nargs=2, default=[1024, 1024], metavar=("H", "W"),
                   help="height and width, multiples of 16")
    p.add_argument("--infer_steps", type=int, default=None, help="steps (default: 4 distilled klein, else 50)")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="true CFG scale for base variants (default 4.0; ignored by distilled variants)")
    p.add_argument("--embedded_cfg_scale", type=float, default=4.0, help="dev's embedded (distilled) guidance")
    p.add_argument("--flow_shift", type=float, default=None, help="constant schedule shift instead of empirical mu")
    p.add_argument("--seed", type=int, default=None, help="noise seed (random when unset)")
    p.add_argument("--control_image_path", nargs="*", default=[], help="reference image(s) for editing")
    p.add_argument("--no_resize_control", action="store_true", help="keep reference images at their size")
    p.add_argument("--fp8_scaled", action="store_true", help="DiT block weights in block-wise scaled fp8")
    p.add_argument("--blocks_to_swap", type=int, default=0, help="DiT blocks kept in CPU memory (CUDA only)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="DiT compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--save_path", default="outputs", help="output folder")
    p.add_argument("--output_type", choices=["images", "latent", "latent_images"], default="images")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> None:
    from flux2.generate import GenerateOptions, generate

    opts = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    opts["image_size"] = tuple(opts["image_size"])
    generate(GenerateOptions(**opts))


def add_make_tiny_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny-model", help="write the tiny FLUX.2-shaped model files (random weights)",
                       formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_make_tiny_model)


def run_make_tiny_model(args: argparse.Namespace) -> None:
    from flux2.tiny import make_tiny_model

    paths = make_tiny_model(args.out, seed=args.seed)
    print("wrote " + ", ".join(f"{k}: {v}" for k, v in paths.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux2", description="FLUX.2 LoRA training pipeline",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_generate, add_make_tiny_model):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # Our errors carry a message a user can act on; show it without a traceback (FLUX2_DEBUG=1 for one).
        if os.environ.get("FLUX2_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
