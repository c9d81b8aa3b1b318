"""Benchmark: a whole generation (load, text encoding, denoising with true CFG, decoding), ours beside
diffusers' Flux2KleinPipeline.

Same files for both (the tiny variant's from `flux2 make-tiny-model`), same prompt, seed and size; each
implementation in its own process, on the CPU. Prints a table (s per image end to end, ratio ours / diffusers)
and writes JSON. The GPU rows of the performance issue (klein-4b 1024^2, dev) need real-size weights and are not
covered yet.

    python bench/generate.py                      # CPU: tiny model, 256x256, 8 steps
    python bench/generate.py --json bench/results/generate_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "a red circle on a blue background"


def run_one(impl: str, model_dir: Path, size: int, steps: int, repeats: int) -> dict:
    import torch

    from flux2.variants import VARIANTS

    v = VARIANTS["tiny"]
    files = {"dit": model_dir / "dit.safetensors", "vae": model_dir / "ae.safetensors",
             "text_encoder": model_dir / "text_encoder"}
    if impl == "flux2":
        from flux2.generate import GenerateOptions, generate

        def once(out: Path) -> None:
            generate(GenerateOptions(model_version="tiny", dit=str(files["dit"]), vae=str(files["vae"]),
                                     text_encoder=str(files["text_encoder"]), prompt=PROMPT,
                                     image_size=(size, size), infer_steps=steps, seed=0, device="cpu",
                                     dtype="float32", save_path=str(out)))
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from safetensors.torch import load_file

        from oracles.ae import load_oracle
        from oracles.dit import diffusers_transformer, dit_to_diffusers

        def once(out: Path) -> None:
            # Built from the files each time, as `flux2 generate` loads them each time.
            from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
            from transformers import AutoTokenizer, Qwen3ForCausalLM

            transformer = diffusers_transformer(v).eval()
            transformer.load_state_dict(dit_to_diffusers(load_file(files["dit"])))
            pipe = Flux2KleinPipeline(
                scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential"),
                vae=load_oracle(load_file(files["vae"]), v.ae).eval(), transformer=transformer,
                text_encoder=Qwen3ForCausalLM.from_pretrained(str(files["text_encoder"]), dtype=torch.float32),
                tokenizer=AutoTokenizer.from_pretrained(str(files["text_encoder"])))
            pipe.set_progress_bar_config(disable=True)
            image = pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=4.0,
                         generator=torch.Generator("cpu").manual_seed(0), max_sequence_length=v.max_text_tokens,
                         text_encoder_out_layers=v.text_layers).images[0]
            image.save(out / "image.png")

    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats + 1):
            start = time.perf_counter()
            once(Path(tmp))
            if i:  # the first run pays one-time imports
                times.append(time.perf_counter() - start)
    return {"impl": impl, "size": size, "steps": steps, "image_s": statistics.median(times), "device": "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model_dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, Path(args.model_dir), args.size, args.steps, args.repeats)))
        return
    from flux2.tiny import make_tiny_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_model(tmp, seed=0)
        for impl in ("flux2", "diffusers"):
            out = subprocess.run([sys.executable, __file__, "--one", impl, "--model_dir", tmp, "--size",
                                  str(args.size), "--steps", str(args.steps), "--repeats", str(args.repeats)],
                                 capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
            if out.returncode:
                sys.exit(f"{impl} failed:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[1]["image_s"]
    print(f"generate, tiny model, {args.size}x{args.size}, {args.steps} steps with true CFG, CPU, "
          f"median of {args.repeats}")
    print(f"{'impl':<10} {'s/image':>9} {'ratio':>7}")
    for r in rows:
        r["ratio_vs_diffusers"] = r["image_s"] / base
        print(f"{r['impl']:<10} {r['image_s']:>9.3f} {r['ratio_vs_diffusers']:>7.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
