"""Benchmark: one LoRA training step (forward, backward, AdamW) of our trainer beside diffusers + PEFT.

Same setup as ../shared/bench/anchor_bench.py (the peers' measured anchors): random weights with the variant's
shapes, LoRA on every Linear of the double and single blocks (rank r, alpha r), AdamW on the LoRA weights, base
weights bf16 with bf16 autocast on CUDA (fp32 on CPU), median step time after warm-up, each configuration in its
own process. On CPU a small FLUX.2-shaped config runs, so the script is exercised everywhere; on CUDA the
klein-4b / klein-9b / dev shapes at 1024x1024.

    python bench/train_step.py                                  # CPU: small config, ours vs diffusers
    python bench/train_step.py --variants klein-base-4b dev --res 1024 --grad_ckpt 1 --json out.json   # CUDA

Prints a table (s/step, peak GiB, LoRA TFLOP/s, % of the measured bf16 matmul peak, ratio to diffusers eager)
and writes JSON.
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

SMALL = dict(hidden_size=256, num_heads=4, axes_dim=(16, 16, 16, 16), depth=2, depth_single_blocks=4,
             context_in_dim=384)


def variant_for(name: str):
    from flux2.variants import VARIANTS

    return replace(VARIANTS["tiny"], **SMALL) if name == "small" else VARIANTS[name]


def fwd_flops(v, n_img: int, n_txt: int) -> float:
    """Forward FLOPs of the blocks (anchors.md): per block 2 * 13 H^2 N (linears) + 4 N^2 H (attention)."""
    n = n_img + n_txt
    h = v.hidden_size
    return (v.depth + v.depth_single_blocks) * (2 * 13 * h * h * n + 4 * n * n * h)


def build_ours(v, rank: int, grad_ckpt: bool, fp8: bool, compile_blocks: bool, device, dtype):
    import torch

    from flux2.fp8 import dit_block_linear, quantize_linears
    from flux2.lora import create_network
    from flux2.model import Flux2Transformer

    with torch.device(device):
        dit = Flux2Transformer(v).to(dtype)
    dit.requires_grad_(False)
    if fp8:
        quantize_linears(dit, dit_block_linear)
    dit.gradient_checkpointing = grad_ckpt
    network = create_network(dit, rank, alpha=rank).to(device)
    network.apply_to(dit)
    if compile_blocks:
        for block in list(dit.double_blocks) + list(dit.single_blocks):
            block.compile()
    params = [p for p in network.parameters() if p.requires_grad]

    def step(x, x_ids, t, ctx, ctx_ids, g):
        return dit(x, x_ids, t, ctx, ctx_ids, g)

    return step, params


def build_diffusers(v, rank: int, grad_ckpt: bool, compile_blocks: bool, device, dtype):
    import torch
    from peft import LoraConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from oracles.dit import diffusers_transformer

    with torch.device(device):
        model = diffusers_transformer(v).to(dtype)
    model.requires_grad_(False)
    if grad_ckpt:
        model.enable_gradient_checkpointing()
    targets = (r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
               r"to_add_out)|ff\.linear_in|ff\.linear_out|ff_context\.linear_in|ff_context\.linear_out)"
               r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))")
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
    params = []
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
            params.append(p)
    if compile_blocks:
        model.compile_repeated_blocks()

    def step(x, x_ids, t, ctx, ctx_ids, g):
        return model(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=x_ids[0], txt_ids=ctx_ids[0],
                     guidance=g, return_dict=False)[0]

    return step, params


def run_one(impl: str, variant: str, res: int, rank: int, grad_ckpt: bool, fp8: bool, compile_blocks: bool,
            steps: int, warmup: int) -> dict:
    import torch

    from flux2 import sampling

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    v = variant_for(variant)
    torch.manual_seed(0)
    if impl == "flux2":
        step, params = build_ours(v, rank, grad_ckpt, fp8, compile_blocks, device, dtype)
    else:
        step, params = build_diffusers(v, rank, grad_ckpt, compile_blocks, device, dtype)
    opt = torch.optim.AdamW(params, lr=1e-4)
    side = res // 16
    n_txt = v.max_text_tokens if variant != "small" else 64
    x_ids = sampling.latent_ids(1, side, side, device=device)
    ctx_ids = sampling.text_ids(1, n_txt, device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        x0 = torch.randn(1, side * side, 128, device=device, dtype=dtype)
        noise = torch.randn_like(x0)
        t = torch.rand(1, device=device)
        xt = ((1 - t[:, None, None]) * x0 + t[:, None, None] * noise).to(dtype)
        ctx = torch.randn(1, n_txt, v.context_in_dim, device=device, dtype=dtype)
        g = torch.full((1,), 1.0, device=device) if v.use_guidance_embed else None
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            pred = step(xt, x_ids, t, ctx, ctx_ids, g)
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    med = statistics.median(times)
    flops = fwd_flops(v, side * side, n_txt)
    return {"impl": impl + ("+compile" if compile_blocks else "") + ("+fp8" if fp8 else ""), "variant": variant,
            "res": res, "rank": rank, "grad_ckpt": grad_ckpt, "device": torch.cuda.get_device_name() if cuda else
            "cpu", "step_s": med, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "lora_tflops": 2 * flops / med / 1e12, "loss": float(loss)}


def matmul_peak() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    return 2 * 8192**3 / ((time.perf_counter() - start) / 20) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="*", default=None, help="default: small on CPU, klein-base-4b on CUDA")
    ap.add_argument("--res", type=int, default=None, help="default: 256 on CPU, 1024 on CUDA")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--grad_ckpt", type=int, default=1)
    ap.add_argument("--impls", nargs="*", default=["flux2", "diffusers"],
                    help="flux2, flux2+compile, flux2+fp8, diffusers, diffusers+compile")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        impl, variant = args.one.split(":")
        base = impl.split("+")[0]
        row = run_one(base, variant, args.res, args.rank, bool(args.grad_ckpt), "+fp8" in impl, "+compile" in impl,
                      args.steps, args.warmup)
        print(json.dumps(row))
        return
    import torch

    cuda = torch.cuda.is_available()
    variants = args.variants or (["klein-base-4b"] if cuda else ["small"])
    res = args.res or (1024 if cuda else 256)
    peak = matmul_peak()
    rows = []
    for variant in variants:
        for impl in args.impls:
            cmd = [sys.executable, __file__, "--one", f"{impl}:{variant}", "--res", str(res), "--rank", str(args.rank),
                   "--grad_ckpt", str(args.grad_ckpt), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
            if out.returncode:
                print(f"{impl} {variant} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"LoRA training step, res {res}, rank {args.rank}, grad ckpt {bool(args.grad_ckpt)}, device "
          f"{rows[0]['device'] if rows else '?'}" + (f", bf16 matmul peak {peak:.0f} TFLOP/s" if peak else ""))
    print(f"{'variant':<14} {'impl':<20} {'s/step':>8} {'peak GiB':>9} {'TFLOP/s':>8} {'% peak':>7} {'vs diffusers':>13}")
    for r in rows:
        ref = next((q["step_s"] for q in rows if q["variant"] == r["variant"] and q["impl"] == "diffusers"), None)
        r["ratio_vs_diffusers"] = r["step_s"] / ref if ref else None
        r["pct_of_peak"] = 100 * r["lora_tflops"] / peak if peak else None
        peak_gib = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        pct = f"{r['pct_of_peak']:.0f}%" if r["pct_of_peak"] is not None else "-"
        ratio = f"{r['ratio_vs_diffusers']:.2f}" if r["ratio_vs_diffusers"] else "-"
        print(f"{r['variant']:<14} {r['impl']:<20} {r['step_s']:>8.4f} {peak_gib:>9} {r['lora_tflops']:>8.2f} "
              f"{pct:>7} {ratio:>13}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"matmul_peak_tflops": peak, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
