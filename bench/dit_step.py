"""Benchmark: one DiT forward + backward, ours beside diffusers' Flux2Transformer2DModel, same weights and inputs.

Each implementation runs in its own process (clean peak memory, no shared caches). On CPU it uses a small
FLUX.2-shaped config; on CUDA the klein-4b shapes at 1024x1024 (4096 image + 512 text tokens) in bf16.

    python bench/dit_step.py                     # auto: CUDA if present, else CPU small config
    python bench/dit_step.py --config small --steps 5 --json bench/results/dit_step_cpu.json

Prints a table (median s/step, peak memory, ratio ours/diffusers; below 1 means we are faster) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    # name: (variant, overrides, image tokens side, text tokens)
    "small": ("tiny", dict(hidden_size=256, num_heads=4, axes_dim=(16, 16, 16, 16), depth=2,
                           depth_single_blocks=4, context_in_dim=384), 16, 64),
    "klein-4b-1024": ("klein-base-4b", {}, 64, 512),
}


def run_one(impl: str, config: str, steps: int, warmup: int) -> dict:
    import torch

    from flux2 import sampling
    from flux2.model import Flux2Transformer
    from flux2.variants import VARIANTS

    name, overrides, side, txt = CONFIGS[config]
    v = replace(VARIANTS[name], **overrides)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        ours = Flux2Transformer(v).to(dtype)
    if impl == "diffusers":
        sys.path.insert(0, str(ROOT / "tests"))
        from oracles.dit import diffusers_transformer, dit_to_diffusers

        with torch.device(device):
            model = diffusers_transformer(v).to(dtype)
        model.load_state_dict(dit_to_diffusers(ours.state_dict()))
        del ours

        def fwd(x, x_ids, t, ctx, ctx_ids):
            return model(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=x_ids, txt_ids=ctx_ids,
                         guidance=None, return_dict=False)[0]
    else:
        model = ours

        def fwd(x, x_ids, t, ctx, ctx_ids):
            return model(x, x_ids, t, ctx, ctx_ids)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, side * side, 128, generator=g).to(device, dtype)
    ctx = torch.randn(1, txt, v.context_in_dim, generator=g).to(device, dtype)
    x_ids, ctx_ids = sampling.latent_ids(1, side, side, device=device), sampling.text_ids(1, txt, device=device)
    t = torch.full((1,), 0.5, device=device, dtype=dtype)
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fwd(x, x_ids, t, ctx, ctx_ids).float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"impl": impl, "config": config, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "step_s": statistics.median(times), "peak_gib": peak, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one impl in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.config, args.steps, args.warmup)))
        return
    import torch

    config = args.config or ("klein-4b-1024" if torch.cuda.is_available() else "small")
    rows = []
    for impl in ("flux2", "diffusers"):
        out = subprocess.run([sys.executable, __file__, "--one", impl, "--config", config, "--steps",
                              str(args.steps), "--warmup", str(args.warmup)], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if out.returncode:
            sys.exit(f"{impl} failed:\n{out.stderr}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[1]["step_s"]
    print(f"DiT forward+backward, config {config}, device {rows[0]['device']}")
    print(f"{'impl':<10} {'s/step':>9} {'peak GiB':>9} {'ratio':>7}")
    for r in rows:
        r["ratio_vs_diffusers"] = r["step_s"] / base
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{r['impl']:<10} {r['step_s']:>9.4f} {peak:>9} {r['ratio_vs_diffusers']:>7.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
