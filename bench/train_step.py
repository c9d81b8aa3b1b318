"""Benchmark: one LoRA training step (forward, loss, backward, clipping, AdamW), flux2's levers beside diffusers + PEFT.

Every row trains the same thing: the same random DiT weights (ours, converted to diffusers' layout for its rows),
LoRA rank 32 / alpha 32 on every Linear of the double and single blocks, AdamW on the LoRA weights (flux2: the
product's fused AdamW and device-side skip, `flux2.train.optimizer_step`; diffusers: torch's default AdamW, as
its training scripts use), gradient clipping at 1.0, the same inputs. A row is an implementation and its levers:

    flux2                     the product's defaults (train.compile auto: compiled on CUDA, eager on a CPU)
    flux2+eager / +compile    train.compile false / true (regional: one compiled forward per block kind, the
                              checkpoint inside it)
    flux2+gc=N / +nogc        train.gradient_checkpointing_blocks N / gradient checkpointing off
    flux2+fp8                 model.fp8_matmul (fp8 products; on a CPU for correctness only, it has no fp8 units)
    flux2+fp8w                model.fp8_scaled (fp8 weights, dequantised per call: today's weight-only mode)
    flux2+sac[=mm|attn|none]  checkpointing inside the compiled blocks, saving the matmul and attention outputs
                              (mm), only the attention outputs (attn) or nothing (none: full recompute)
    flux2+attn=NAME           model.attention_backend: flash, cudnn, efficient or math (auto: torch's choice)
    flux2+fwd / diffusers+fwd one no-grad forward with the LoRA attached: a denoising step, not a training step
    diffusers / +compile      Flux2Transformer2DModel + PEFT, eager / compile_repeated_blocks()
Levers combine: flux2+compile+gc=3. Gradient checkpointing is on for every row unless it says otherwise.

All rows are built in one process and timed interleaved: round after round, each row runs a few steps; a row's
time is the median over all its timed steps, and its ratio to the reference row is the median of the per-round
ratios (with their min and max: the spread), so machine noise hits every row alike. `--memory` adds one profiled
step per row: the peak of the bytes allocated during the step (activations, gradients, optimizer temporaries),
counted from the allocator's events on a CPU and from torch.cuda.max_memory_allocated on a GPU.

    python bench/train_step.py                          # CPU: the small config, the default rows
    python bench/train_step.py --rows flux2 flux2+compile diffusers+compile --rounds 9 --json out.json
    python bench/train_step.py --one flux2+fp8 --variant klein-base-4b --res 1024    # one row (bench/gpu_suite.sh)

On a GPU the default is klein-base-4b at 1024x1024 in bf16; bench/gpu_suite.sh runs one process per row there
(clean peak memory). On a CPU it is a small FLUX.2-shaped config (hidden 256, 2 double + 4 single blocks) at
256x256 in float32.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = dict(hidden_size=256, num_heads=4, axes_dim=(16, 16, 16, 16), depth=2, depth_single_blocks=4,
             context_in_dim=384)
DRY = dict(hidden_size=64, num_heads=2, axes_dim=(8, 8, 8, 8), depth=1, depth_single_blocks=1, context_in_dim=96)
DEFAULT_ROWS = ["flux2", "flux2+compile", "flux2+compile+gc=5", "flux2+compile+gc=4", "flux2+compile+gc=3",
                "flux2+nogc", "flux2+compile+nogc", "flux2+sac=attn", "flux2+attn=math", "flux2+fp8", "flux2+fp8w",
                "diffusers", "diffusers+compile"]
DIFFUSERS_TARGETS = (r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                     r"to_add_out)|ff\.linear_in|ff\.linear_out|ff_context\.linear_in|ff_context\.linear_out)"
                     r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))")


def variant_for(name: str):
    from flux2.variants import VARIANTS

    if name == "small":
        return replace(VARIANTS["tiny"], **SMALL)
    if name == "dry":
        return replace(VARIANTS["tiny"], **DRY)
    return VARIANTS[name]


def fwd_flops(v, n_img: int, n_txt: int) -> float:
    """Forward FLOPs of the blocks (anchors.md): per block 2 * 13 H^2 N (linears) + 4 N^2 H (attention)."""
    n = n_img + n_txt
    h = v.hidden_size
    return (v.depth + v.depth_single_blocks) * (2 * 13 * h * h * n + 4 * n * n * h)


@dataclass
class Row:
    """One benchmark row: `impl+lever+lever...`."""

    name: str
    impl: str = "flux2"
    compile: bool | str = "auto"
    grad_ckpt: bool = True
    ckpt_blocks: int | None = None
    fp8: str | None = None  # "matmul" | "weights"
    sac: str | None = None  # selective checkpointing inside the compiled blocks: mm | attn | none
    attention: str = "auto"  # model.attention_backend
    fwd: bool = False  # one no-grad forward with the LoRA attached (a denoising step) instead of a training step
    step: object = None
    times: list = field(default_factory=list)
    rounds: list = field(default_factory=list)  # per-round median step time

    def checkpointing(self, v) -> str:
        """Which blocks recompute in backward: all, the first N of M, selective (policy) or none."""
        if self.fwd:
            return "forward only"
        if self.sac:
            return f"selective ({self.sac})"
        if not self.grad_ckpt:
            return "none"
        total = v.depth + v.depth_single_blocks
        return "all" if self.ckpt_blocks is None or self.ckpt_blocks >= total else f"{self.ckpt_blocks} of {total}"

    @classmethod
    def parse(cls, name: str) -> "Row":
        impl, *levers = name.split("+")
        if impl not in ("flux2", "diffusers"):
            raise SystemExit(f"row {name!r}: the implementation is flux2 or diffusers")
        row = cls(name, impl, compile="auto" if impl == "flux2" else False)
        for lever in levers:
            key, _, value = lever.partition("=")
            if key in ("compile", "eager"):
                row.compile = key == "compile"
            elif key == "nogc":
                row.grad_ckpt = False
            elif key == "gc" and value.isdigit():
                row.ckpt_blocks = int(value)
            elif key in ("fp8", "fp8w") and impl == "flux2":
                row.fp8 = "matmul" if key == "fp8" else "weights"
            elif key == "sac" and impl == "flux2":
                row.sac = value or "mm"
            elif key == "fwd":
                row.fwd = True
            elif key == "attn" and impl == "flux2" and value:
                row.attention = value
            else:
                raise SystemExit(f"row {name!r}: unknown lever {lever!r} (see the docstring)")
        return row


def build_flux2(row: Row, v, sd, rank: int, device, backend: str | None):
    import torch

    from flux2.compile import compile_blocks, resolve
    from flux2.fp8 import dit_block_linear, quantize_linears
    from flux2.fp8_matmul import use_fp8_matmuls
    from flux2.lora import create_network
    from flux2.model import Flux2Transformer
    from flux2.optim import build_optimizer
    from flux2.train import optimizer_step, velocity_loss

    with torch.device("meta"):
        dit = Flux2Transformer(v)
    dit.load_state_dict(sd, assign=True)
    dit.requires_grad_(False)
    if row.fp8 == "matmul":
        use_fp8_matmuls(dit, dit_block_linear)
    elif row.fp8 == "weights":
        quantize_linears(dit, dit_block_linear)
    dit.gradient_checkpointing = row.grad_ckpt
    dit.checkpoint_blocks = row.ckpt_blocks
    dit.set_attention_backend(row.attention)
    torch.manual_seed(1)
    network = create_network(dit, rank, alpha=rank).to(device)
    network.apply_to(dit)
    if row.sac:
        compile_with_sac(dit, backend, row.sac)
    elif resolve(row.compile, device):
        if not compile_blocks(dit, backend):
            raise SystemExit(f"{row.name}: torch.compile does not work here")
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, "adamw", 1e-4)
    autocast = device.type == "cuda"

    def step(x0, noise, t, ctx):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), torch.set_grad_enabled(not row.fwd):
            loss = velocity_loss(dit, x0, noise, t, ctx, [], v).mean()
        if row.fwd:
            return loss[None]
        loss.backward()
        return optimizer_step(params, optimizer, loss.detach(), 1.0)[0]

    if row.fwd:
        dit.eval()

    return step, dit, network, optimizer


def compile_with_sac(dit, backend: str | None, policy_name: str) -> None:
    """Experimental lever: the checkpoint inside each compiled block, so the compiler plans the recompute
    (selective activation checkpointing). policy mm: save matmul and attention outputs; attn: save only attention
    outputs; none: save nothing (full recompute, planned by the compiler). docs/performance.md has the verdict."""
    import types
    from functools import partial

    import torch
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    attention = {aten._scaled_dot_product_flash_attention.default,
                 aten._scaled_dot_product_efficient_attention.default,
                 aten._scaled_dot_product_cudnn_attention.default,
                 aten._scaled_dot_product_flash_attention_for_cpu.default}
    save = {"mm": attention | {aten.mm.default, aten.bmm.default, aten.addmm.default}, "attn": attention,
            "none": set()}[policy_name]

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    dit.gradient_checkpointing = False  # the checkpoint is inside the compiled region instead
    for blocks in (dit.double_blocks, dit.single_blocks):
        eager = type(blocks[0]).forward

        def checkpointed(block, *args, eager=eager):
            return checkpoint(eager, block, *args, use_reentrant=False,
                              context_fn=partial(create_selective_checkpoint_contexts, policy))

        compiled = torch.compile(checkpointed, backend=backend or "inductor")
        for block in blocks:
            block.forward = types.MethodType(compiled, block)


def build_diffusers(row: Row, v, sd, rank: int, device, backend: str | None):
    import torch
    from peft import LoraConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from oracles.dit import diffusers_transformer, dit_to_diffusers

    from flux2 import sampling

    with torch.device("meta"):
        model = diffusers_transformer(v)
    model.load_state_dict(dit_to_diffusers(sd), assign=True)
    model.requires_grad_(False)
    if row.grad_ckpt:
        model.enable_gradient_checkpointing()
    torch.manual_seed(1)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                 target_modules=DIFFUSERS_TARGETS))
    params = []
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
            params.append(p)
    model.train(not row.fwd)
    if row.compile is True:
        model.compile_repeated_blocks(**({"backend": backend} if backend else {}))
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    autocast = device.type == "cuda"

    def step(x0, noise, t, ctx):
        b, _, h, w = x0.shape
        tt = t.view(-1, 1, 1, 1)
        xt, target = (1 - tt) * x0 + tt * noise, noise - x0
        x_ids = sampling.latent_ids(1, h, w, device=device)[0]  # diffusers takes (N, 4) ids
        ctx_ids = sampling.text_ids(1, ctx.shape[1], device=device)[0]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), torch.set_grad_enabled(not row.fwd):
            pred = model(hidden_states=sampling.pack(xt), encoder_hidden_states=ctx, timestep=t, img_ids=x_ids,
                         txt_ids=ctx_ids, guidance=torch.ones(b, device=device) if v.use_guidance_embed else None,
                         return_dict=False)[0]
            loss = (pred.float() - sampling.pack(target)).square().mean()
        if row.fwd:
            return loss[None]
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return torch.stack([loss.detach(), norm])

    return step, model, None, optimizer


def make_inputs(v, side: int, n_txt: int, seed: int, device, dtype, batch: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, v.in_channels, side, side, generator=g).to(device, dtype)
    noise = torch.randn(batch, v.in_channels, side, side, generator=g).to(device, dtype)
    t = torch.rand(batch, generator=g).to(device)
    ctx = torch.randn(batch, n_txt, v.context_in_dim, generator=g).to(device, dtype)
    return x0, noise, t, ctx


def timed(step, inputs, cuda: bool, clock=time.perf_counter) -> float:
    import torch

    if cuda:
        torch.cuda.synchronize()
    start = clock()
    out = step(*inputs)
    if cuda:
        torch.cuda.synchronize()
    else:
        out.tolist()
    return clock() - start


def step_peak_bytes(step, inputs, cuda: bool) -> int:
    """Peak bytes allocated above what was live before the step, during one step."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(*inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(*inputs)
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def resident_bytes(model, network, optimizer) -> int:
    """Bytes held between steps: model weights and buffers (LoRA included when it is part of the model) and the
    optimizer state, counted."""
    import torch

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    if network is not None:
        tensors |= {id(t): t for t in [*network.parameters(), *network.buffers()]}
    for state in optimizer.state.values():
        tensors |= {id(t): t for t in state.values() if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the C++ compiler runs in children: with
    TORCHINDUCTOR_COMPILE_THREADS=1 they are waited for, so a compile's whole cost shows here)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def matmul_peak_tflops() -> float:
    """The card's measured bf16 matrix-product throughput (8192^3), the 100% of the table."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    return 2 * 8192**3 / ((time.perf_counter() - start) / 20) / 1e12


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default=None, help="small (CPU default), dry (tiny, for tests) or a FLUX.2 variant")
    ap.add_argument("--res", type=int, default=None, help="image side in pixels (default: 256 on CPU, 1024 on CUDA)")
    ap.add_argument("--text_tokens", type=int, default=None, help="default: 64 on CPU, the variant's 512 on CUDA")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rows", nargs="*", default=DEFAULT_ROWS)
    ap.add_argument("--one", default=None, help="run only this row (one process per row: clean peak memory)")
    ap.add_argument("--reference", default="diffusers+compile", help="the row the ratios are relative to")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per row and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per row first (compiles happen here)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--clock", choices=["cpu", "wall"], default=None,
                    help="cpu: this process's CPU time (default on a CPU: other processes on a shared machine barely "
                         "move it); wall: elapsed time (default on a GPU)")
    ap.add_argument("--memory", action="store_true", help="also count each row's step peak memory")
    ap.add_argument("--backend", default=None, help="torch.compile backend for compiled rows (default inductor)")
    ap.add_argument("--json", default=None, help="write the rows here (a list of objects)")
    ap.add_argument("--matmul_peak", action="store_true", help="print the GPU's bf16 matmul TFLOP/s as JSON, only")
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import torch

    if args.matmul_peak:
        print(json.dumps({"matmul_peak_tflops": matmul_peak_tflops(), "device": torch.cuda.get_device_name()}))
        return []
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    variant = args.variant or ("klein-base-4b" if cuda else "small")
    v = variant_for(variant)
    res = args.res or (1024 if cuda else 256)
    n_txt = args.text_tokens or (v.max_text_tokens if cuda else 64)
    side = res // v.ae.downscale
    rows = [Row.parse(args.one)] if args.one else [Row.parse(r) for r in args.rows]
    clock_name = args.clock or ("wall" if cuda else "cpu")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter

    from flux2.model import Flux2Transformer

    torch.manual_seed(0)
    with torch.device(device):
        sd = {k: t.to(dtype) for k, t in Flux2Transformer(v).state_dict().items()}
    built = {}
    for row in rows:
        build = build_flux2 if row.impl == "flux2" else build_diffusers
        start = time.perf_counter()
        row.step, *built[row.name] = build(row, v, sd, args.rank, device, args.backend)
        row.build_s = time.perf_counter() - start
    del sd
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # as anchors.md: from after building, warm-up steps included
    for row in rows:
        start, start_cpu = time.perf_counter(), cpu_seconds()
        inputs = make_inputs(v, side, n_txt, 0, device, dtype, args.batch)
        for _ in range(args.warmup):
            timed(row.step, inputs, cuda)
        row.warmup_s, row.warmup_cpu_s = time.perf_counter() - start, cpu_seconds() - start_cpu
    for r in range(args.rounds):
        inputs = make_inputs(v, side, n_txt, r + 1, device, dtype, args.batch)
        for row in rows:
            times = [timed(row.step, inputs, cuda, clock) for _ in range(args.steps)]
            row.times += times
            row.rounds.append(statistics.median(times))
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    results = []
    ref = next((q for q in rows if q.name == args.reference), None)
    flops = fwd_flops(v, side * side, n_txt) * args.batch
    for row in rows:
        model, network, optimizer = built[row.name]
        med = statistics.median(row.times)
        out = {"row": row.name, "variant": variant, "res": res, "text_tokens": n_txt, "rank": args.rank,
               "batch": args.batch, "grad_ckpt": row.checkpointing(v), "forward_only": row.fwd,
               "device": torch.cuda.get_device_name() if cuda else f"cpu ({args.threads} thread(s))",
               "dtype": str(dtype).removeprefix("torch."), "clock": clock_name, "step_s": med,
               "step_s_min": min(row.times), "step_s_max": max(row.times), "timed_steps": len(row.times),
               "build_s": row.build_s, "warmup_s": row.warmup_s, "warmup_cpu_s": row.warmup_cpu_s,
               "lora_tflops": (1 if row.fwd else 2) * flops / med / 1e12,
               "resident_mib": resident_bytes(model, network, optimizer) / 2**20, "peak_gib": peak_gib}
        if ref is not None:
            ratios = [a / b for a, b in zip(row.rounds, ref.rounds)]
            out |= {"vs_reference": statistics.median(ratios), "vs_reference_min": min(ratios),
                    "vs_reference_max": max(ratios), "reference": ref.name}
        results.append(out)
    if args.memory:
        for row, out in zip(rows, results):
            inputs = make_inputs(v, side, n_txt, 0, device, dtype, args.batch)
            out["step_peak_mib"] = step_peak_bytes(row.step, inputs, cuda) / 2**20
    print_table(results, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def print_table(results: list[dict], args) -> None:
    r0 = results[0]
    print(f"LoRA training step: {r0['variant']}, {r0['res']}x{r0['res']} + {r0['text_tokens']} text tokens, batch "
          f"{r0['batch']}, rank {r0['rank']}, {r0['dtype']}, {r0['device']}; {args.rounds} rounds x {args.steps} "
          f"steps, interleaved, {r0['clock']} time")
    ref = r0.get("reference")
    head = f"{'row':<26} {'s/step':>8} {'min':>7} {'max':>7}"
    if ref:
        head += f" {'vs ' + ref:>22} {'spread':>11}"
    head += f" {'warm-up s':>9} {'resident MiB':>12}" + (f" {'step peak MiB':>13}" if args.memory else "")
    if r0["peak_gib"] is not None:
        head += f" {'peak GiB':>8}"
    print(head)
    for r in results:
        line = f"{r['row']:<26} {r['step_s']:>8.4f} {r['step_s_min']:>7.4f} {r['step_s_max']:>7.4f}"
        if ref:
            line += f" {r['vs_reference']:>22.3f} {r['vs_reference_min']:>5.2f}-{r['vs_reference_max']:<5.2f}"
        line += f" {r['warmup_s']:>9.1f} {r['resident_mib']:>12.1f}"
        line += f" {r['step_peak_mib']:>13.1f}" if args.memory else ""
        line += f" {r['peak_gib']:>8.2f}" if r["peak_gib"] is not None else ""
        print(line)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
