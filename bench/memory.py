"""Benchmark: memory of every variant under every memory switch, counted exactly, and rehearsed at full size.

Three parts:

1. The table (default): for every variant and switch (DiT bf16 / fp8 / nf4 / int8; text encoder bf16 / fp8 /
   nf4 / int8) the exact resident bytes of the DiT, a rank-32 LoRA on every block Linear, its AdamW (and
   AdamW8bit) state, and the text encoder with only the layers FLUX.2 reads, counted from the models built on
   the meta device (no weights needed) with the byte formulas of flux2.quantize, which tests/test_memory_bench.py
   checks against really quantised layers.
2. `--rehearse VARIANT ...`: a full-size rehearsal on the CPU with random weights in the official layouts (BFL
   single-file DiT; the text encoder as split shards + model.safetensors.index.json + config.json): per switch,
   in a fresh process, load, build the LoRA, one training step at 128^2 (512 text tokens), and for the text
   encoder load + encode four prompts; peak RSS (anonymous and file pages, sampled, and the kernel's VmHWM) and
   time against the resident floor (the table's bytes). For the DiT switches it also times reading the file
   before the load: twice with plain reads, once dropping the read pages behind (as the loader reads), each
   read and the load starting from a cold page cache. A rehearsal that needs more RAM or disk than
   the machine has free (MemAvailable minus a 3 GiB margin for everyone else) is skipped, saying how much it
   needs. The random files are deleted afterwards unless --keep.
3. `--gpu`: on a CUDA machine, the GPU targets (bench/gpu_suite.sh calls it): a LoRA training step (rank 32,
   gradient checkpointing, 1024^2, AdamW) on dev and klein-base-9b with an NF4 base, weights quantised as they
   are generated (no file needed), peak torch.cuda.max_memory_allocated against the targets (dev <= 24 GiB,
   klein-base-9b <= 12 GiB). Skips cleanly without CUDA.

    python bench/memory.py [--rank 32] [--json bench/results/memory.json]
    python bench/memory.py --rehearse klein-base-4b qwen3-4b --modes bf16 fp8 nf4 int8 --workdir /var/tmp/rehearse
    python bench/memory.py --gpu --json bench/results/memory_gpu.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
DIT_MODES = ("bf16", "fp8", "nf4", "int8")
TE_MODES = ("bf16", "fp8", "nf4", "int8")
# The variants of the table: distilled and base files have the same shapes, so klein-4b stands for both.
TABLE_VARIANTS = ("klein-base-4b", "klein-base-9b", "dev", "tiny")
# Resident-byte targets of issue 16 (decimal GB, like file sizes): (variant, part, mode) -> bytes.
TARGETS = {("klein-base-9b", "dit", "nf4"): 5.5e9, ("dev", "dit", "nf4"): 18.5e9,
           ("dev", "text_encoder", "nf4"): 11e9}
GPU_TARGETS = {"dev": 24 * GIB, "klein-base-9b": 12 * GIB}
MARGIN = 3 * GIB  # left free for the other users of the machine


def mode_of(switch: str) -> str:
    """Table switch -> flux2.quantize mode ("bf16" is no quantisation)."""
    return "none" if switch == "bf16" else switch


# ---------------------------------------------------------------------------------------------------- table


def meta_dit(variant):
    import torch

    from flux2.model import Flux2Transformer

    with torch.device("meta"):
        return Flux2Transformer(variant)


def block_linears(model) -> set[str]:
    """The names of the DiT's block Linears: the ones a memory switch quantises (flux2.fp8.dit_block_linear)."""
    import torch

    from flux2.fp8 import dit_block_linear

    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and dit_block_linear(n, m)}


def step_inputs(variant, res: int, text_tokens: int, device="cpu") -> dict:
    """Random inputs of one training step at res x res (batch 1): clean latents, noise, timestep, text context,
    guidance, position ids."""
    import torch

    from flux2 import sampling

    side = res // 16
    x0 = torch.randn(1, side * side, variant.in_channels, device=device)
    return {"x0": x0, "noise": torch.randn_like(x0), "t": torch.rand(1, device=device),
            "ctx": torch.randn(1, text_tokens, variant.context_in_dim, device=device, dtype=torch.bfloat16),
            "guidance": torch.ones(1, device=device) if variant.use_guidance_embed else None,
            "x_ids": sampling.latent_ids(1, side, side, device=device),
            "ctx_ids": sampling.text_ids(1, text_tokens, device=device)}


def step_loss(step, inputs: dict):
    """The flow-matching loss of step(x, x_ids, t, ctx, ctx_ids, guidance) under bf16 autocast: what every
    memory bench here trains (bench/memory.py --gpu, bench/step_memory.py)."""
    import torch

    x0, noise, t = inputs["x0"], inputs["noise"], inputs["t"]
    with torch.autocast(x0.device.type, dtype=torch.bfloat16):
        pred = step((1 - t) * x0 + t * noise, inputs["x_ids"], t, inputs["ctx"], inputs["ctx_ids"],
                    inputs["guidance"])
    return (pred.float() - (noise - x0)).square().mean()


def dit_bytes(variant, switch: str) -> int:
    """Exact resident bytes of the DiT in bf16 with `switch` applied to its block Linears (flux2.loading)."""
    from flux2.quantize import linear_bytes

    model, total = meta_dit(variant), 0
    quantized = block_linears(model)
    for name, tensor in model.state_dict().items():
        module = name.rpartition(".")[0]
        if module in quantized and switch != "bf16":
            total += linear_bytes(mode_of(switch), *tensor.shape)
        else:
            total += tensor.numel() * 2
    return total


def lora_numels(variant, rank: int) -> list[int]:
    """Element counts of the trainable tensors of a rank-`rank` LoRA on every block Linear (flux2.lora)."""
    from flux2.lora import create_network

    network = create_network(meta_dit(variant), rank, rank)
    return [p.numel() for p in network.parameters() if p.requires_grad]


def lora_bytes(variant, rank: int) -> int:
    """float32 LoRA weights plus the float32 alpha scalars of its state_dict."""
    from flux2.lora import create_network

    network = create_network(meta_dit(variant), rank, rank)
    return sum(t.numel() * t.element_size() for t in network.state_dict().values())


def optimizer_bytes(numels: list[int], kind: str = "adamw") -> int:
    """State of the optimizer over tensors of these sizes: torch AdamW keeps two float32 moments and a float32
    step per tensor; bitsandbytes AdamW8bit keeps two uint8 moments plus a float32 absmax per 256 values for
    tensors of at least 4096 values (smaller ones in float32) and its two 256-entry float32 quantisation maps,
    shared by all tensors (`state1`/`state2`/`absmax1`/`absmax2`/`qmap1`/`qmap2`)."""
    if kind == "adamw":
        return sum(2 * 4 * n + 4 for n in numels)
    if kind == "adamw8bit":
        maps = 2 * 256 * 4 if any(n >= 4096 for n in numels) else 0
        return maps + sum(2 * (n + 4 * math.ceil(n / 256)) if n >= 4096 else 2 * 4 * n for n in numels)
    raise ValueError(kind)


def text_encoder_config(variant):
    """The transformers config of the variant's text encoder, cut to the layers FLUX.2 loads (flux2.text_encoder)."""
    from flux2.text_encoder import _truncated_config, builtin_config

    config = builtin_config(variant)
    deepest = max(variant.text_layers)
    keep = config.num_hidden_layers if deepest >= config.num_hidden_layers else deepest + 1
    return _truncated_config(config, keep)


def text_encoder_bytes(variant, switch: str) -> int:
    """Exact resident bytes of the text encoder as flux2.text_encoder loads it (bf16; decoder-layer Linears
    quantised by `switch`)."""
    import torch
    from transformers import MistralModel, Qwen3Model

    config = text_encoder_config(variant)
    with torch.device("meta"):
        model = (Qwen3Model if variant.text_encoder == "qwen3" else MistralModel)(config)
    from flux2.quantize import linear_bytes

    total = 0
    linears = {f"layers.{i}.{n}" for i, layer in enumerate(model.layers) for n, m in layer.named_modules()
               if isinstance(m, torch.nn.Linear)}
    for name, tensor in model.state_dict().items():
        if name.rpartition(".")[0] in linears and switch != "bf16":
            total += linear_bytes(mode_of(switch), *tensor.shape)
        else:
            total += tensor.numel() * 2
    return total


def table(rank: int = 32) -> list[dict]:
    """One row per variant: bytes of each part under each switch."""
    from flux2.variants import VARIANTS

    rows = []
    for name in TABLE_VARIANTS:
        v = VARIANTS[name]
        numels = lora_numels(v, rank)
        rows.append({
            "variant": name, "rank": rank,
            "dit": {s: dit_bytes(v, s) for s in DIT_MODES},
            "lora": lora_bytes(v, rank),
            "optimizer": {"adamw": optimizer_bytes(numels, "adamw"), "adamw8bit": optimizer_bytes(numels, "adamw8bit")},
            "text_encoder": {s: text_encoder_bytes(v, s) for s in TE_MODES},
            "text_encoder_layers": text_encoder_config(v).num_hidden_layers,
        })
    return rows


def gb(n: float) -> str:
    """Decimal GB with two decimals; below 0.1 GB in MB."""
    return f"{n / 1e9:.2f}" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def markdown(rows: list[dict]) -> str:
    """The table as markdown (GB = 10^9 bytes, as download pages count; the text encoder with only the layers
    FLUX.2 reads)."""
    lines = ["| variant | DiT bf16 | DiT fp8 | DiT nf4 | DiT int8 | LoRA r32 | AdamW | AdamW8bit | text encoder "
             "(layers) | TE bf16 | TE fp8 | TE nf4 | TE int8 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(gb(r["dit"][s]) for s in DIT_MODES) + f" | {gb(r['lora'])} | "
                     f"{gb(r['optimizer']['adamw'])} | {gb(r['optimizer']['adamw8bit'])} | "
                     f"{r['text_encoder_layers']} | " + " | ".join(gb(r["text_encoder"][s]) for s in TE_MODES) + " |")
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> list[str]:
    """'ok' / 'MISSED' lines for the resident-byte targets."""
    by_name = {r["variant"]: r for r in rows}
    out = []
    for (variant, part, switch), limit in TARGETS.items():
        value = by_name[variant][part][switch]
        out.append(f"{'ok' if value <= limit else 'MISSED'}: {variant} {part} {switch} {value:,} bytes "
                   f"({gb(value)} GB) <= {gb(limit)} GB")
    return out


# ---------------------------------------------------------------------------------------------------- files


def write_random_safetensors(path: Path, shapes: dict, seed: int = 0, std: float = 0.02) -> int:
    """Write random bf16 tensors (name -> shape) as a safetensors file without holding them in memory: the
    header first, then each tensor generated and written a chunk at a time. Returns the file size."""
    import torch

    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            n, step = math.prod(shape), 1 << 24
            for start in range(0, n, step):
                chunk = (torch.randn(min(step, n - start), generator=g) * std).to(torch.bfloat16)
                if name.endswith(("norm.weight", ".scale")):  # norms near 1, as in real weights
                    chunk = (chunk + 1).to(torch.bfloat16)
                f.write(chunk.view(torch.uint8).numpy().tobytes())
    tmp.replace(path)
    return path.stat().st_size


def write_random_dit(path: Path, variant) -> int:
    """A random DiT in the BFL single-file layout (bf16)."""
    return write_random_safetensors(path, {k: tuple(t.shape) for k, t in meta_dit(variant).state_dict().items()})


def write_random_text_encoder(folder: Path, variant, shard_bytes: int = 4_000_000_000) -> int:
    """A random text encoder of the variant's real config in Hugging Face layout: every layer (not only those
    FLUX.2 reads), split into shards of at most `shard_bytes` (at least two) `model-0000k-of-0000N.safetensors` with model.safetensors.index.json,
    config.json and a (small, trained) tokenizer with the chat template. Returns the bytes written."""
    import torch
    from transformers import Qwen3ForCausalLM

    from flux2.text_encoder import builtin_config, train_tiny_tokenizer

    config = builtin_config(variant)
    if variant.text_encoder != "qwen3":
        raise ValueError("rehearsals cover the Qwen3 encoders (klein)")
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    shards, current, size = [], {}, 0
    shard_bytes = min(shard_bytes, sum(math.prod(s) * 2 for s in shapes.values()) // 2 + 1)  # always split
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = shape, size + nbytes
    shards.append(current)
    total, weight_map = 0, {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_random_safetensors(folder / file, shard, seed=i)
        weight_map.update({name: file for name in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(math.prod(s) * 2 for s in shapes.values())}, "weight_map": weight_map}))
    config.to_json_file(str(folder / "config.json"))
    train_tiny_tokenizer(512).save_pretrained(str(folder))
    return total


# ---------------------------------------------------------------------------------------------------- rehearsal


class PeakRSS:
    """Samples /proc/self/status every 20 ms: the peak of VmRSS with its anonymous and file parts at that moment,
    and the kernel's own peak (VmHWM)."""

    def __init__(self):
        self.peak = {"rss": 0, "anon": 0, "file": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def status() -> dict[str, int]:
        values = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
        return values

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.sample()

    def sample(self) -> None:
        s = self.status()
        if s["VmRSS"] > self.peak["rss"]:
            self.peak = {"rss": s["VmRSS"], "anon": s["RssAnon"], "file": s["RssFile"] + s.get("RssShmem", 0)}

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self.peak["hwm"] = self.status()["VmHWM"]


def drop_page_cache(path: Path) -> None:
    """Evict a file's clean pages from the page cache (so the next read comes from disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_through(path: Path, chunk: int = 64 << 20, drop_behind: bool = True) -> float:
    """Seconds to read a whole file with plain reads (into one reused buffer), from a cold page cache; with
    `drop_behind`, dropping what was read from the page cache behind the reader, as
    flux2.safetensors_io.TensorFile does (the fastest way to read a file on this project's machines)."""
    drop_page_cache(path)
    buf = bytearray(chunk)
    view = memoryview(buf)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        offset = 0
        while n := f.readinto(view):
            if drop_behind and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), offset, n, os.POSIX_FADV_DONTNEED)
            offset += n
    return time.perf_counter() - start


def worker_dit(path: Path, variant_name: str, switch: str, rank: int, step: bool) -> dict:
    """In a fresh process: load the DiT, LoRA, one training step at 128^2; peak RSS and times."""
    import torch

    from flux2 import sampling
    from flux2.loading import load_dit
    from flux2.lora import create_network
    from flux2.variants import VARIANTS

    torch.manual_seed(0)
    variant = VARIANTS[variant_name]
    if mode_of(switch) in ("nf4", "int8"):
        import flux2.bnb_linear  # noqa: F401  (imported before the baseline: its import is not the load's)
    out = {"baseline": PeakRSS.status()}
    # The file read twice with plain reads (a `cat`, the page cache keeping what was read), then once the way
    # the loader reads (dropping behind); every read and the load from a cold page cache.
    if variant_name != "tiny":
        out["read_1_s"], out["read_2_s"] = (read_through(path, drop_behind=False) for _ in range(2))
        out["read_drop_behind_s"] = read_through(path)
    drop_page_cache(path)
    cpu = time.process_time()
    with PeakRSS() as load_peak:
        start = time.perf_counter()
        dit = load_dit(path, variant, dtype=torch.bfloat16, quantize=mode_of(switch))
        out["load_s"] = time.perf_counter() - start
    out["load_cpu_s"] = time.process_time() - cpu
    out["load_peak"] = load_peak.peak
    out["after_load"] = PeakRSS.status()
    with PeakRSS() as peak:
        dit.gradient_checkpointing = True
        network = create_network(dit, rank, rank)
        network.apply_to(dit)
        params = [p for p in network.parameters() if p.requires_grad]
        if step:
            opt = torch.optim.AdamW(params, lr=1e-4)
            side, n_txt = 128 // 16, variant.max_text_tokens
            x0, noise = torch.randn(1, side * side, 128), torch.randn(1, side * side, 128)
            t = torch.rand(1)
            xt = (1 - t) * x0 + t * noise
            ctx = torch.randn(1, n_txt, variant.context_in_dim, dtype=torch.bfloat16)
            g = torch.ones(1) if variant.use_guidance_embed else None
            start = time.perf_counter()
            pred = dit(xt, sampling.latent_ids(1, side, side), t, ctx, sampling.text_ids(1, n_txt), g)
            loss = (pred.float() - (noise - x0)).square().mean()
            loss.backward()
            opt.step()
            out["step_s"] = time.perf_counter() - start
            out["loss"] = loss.item()
    out["peak"] = peak.peak
    return out


def worker_text_encoder(folder: Path, variant_name: str, switch: str) -> dict:
    """In a fresh process: load the text encoder (split shards), encode four prompts; peak RSS and times."""
    import torch

    from flux2.text_encoder import load_text_encoder
    from flux2.variants import VARIANTS

    if mode_of(switch) in ("nf4", "int8"):
        import flux2.bnb_linear  # noqa: F401
    import transformers  # noqa: F401

    out = {"baseline": PeakRSS.status()}
    for f in folder.glob("*.safetensors"):
        drop_page_cache(f)
    cpu = time.process_time()
    with PeakRSS() as load_peak:
        start = time.perf_counter()
        te = load_text_encoder(folder, VARIANTS[variant_name], dtype=torch.bfloat16, quantize=mode_of(switch))
        out["load_s"] = time.perf_counter() - start
    out["load_cpu_s"] = time.process_time() - cpu
    out["load_peak"] = load_peak.peak
    out["after_load"] = PeakRSS.status()
    with PeakRSS() as peak:
        start = time.perf_counter()
        ctx = te.encode(["a purple star on a yellow background", "a cat holding a sign", "",
                         "two red circles and a blue square"], batch_size=1)
        out["encode_s"] = time.perf_counter() - start
        out["finite"] = bool(torch.isfinite(ctx).all())
    out["peak"] = peak.peak
    return out


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def needs(floor: int, part: str, switch: str) -> int:
    """RAM a rehearsal may take: the resident floor, the file pages of a memory-mapped bf16 load (another file's
    size), the python/torch process (~0.8 GiB) and the step's activations (~1 GiB)."""
    return int(floor * (2 if switch == "bf16" else 1.15)) + int(1.8 * GIB)


def run_worker(kind: str, path: Path, variant: str, switch: str, rank: int, step: bool, timeout: int) -> dict:
    args = [sys.executable, __file__, "--worker", kind, str(path), variant, switch, str(rank), str(int(step))]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rehearse(names: list[str], switches: list[str], workdir: Path, rank: int, keep: bool, step: bool = True,
             timeout: int = 3600, isolate: bool = True, step_switches: list[str] | None = None) -> list[dict]:
    """Full-size rehearsals (see the module docstring); names are variants ('klein-base-4b') or encoders
    ('qwen3-4b' = the text encoder of klein-base-4b, 'qwen3-8b' of klein-base-9b). isolate=False runs the
    workers in this process (the tests' tiny rehearsal: its peak RSS is then this process's). `step_switches`
    limits the DiT training step to those switches (default: every one, when `step`)."""
    from flux2.variants import VARIANTS

    encoders = {"qwen3-4b": "klein-base-4b", "qwen3-8b": "klein-base-9b", "qwen3-tiny": "tiny"}
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        part = "text_encoder" if name in encoders else "dit"
        variant = VARIANTS[encoders.get(name, name)]
        bytes_of = text_encoder_bytes if part == "text_encoder" else dit_bytes
        file_bytes = bytes_of(variant, "bf16") if part == "dit" else _te_file_bytes(variant)
        free_disk = shutil.disk_usage(workdir).free
        if free_disk < file_bytes + 2 * GIB:
            results.append({"name": name, "skipped": f"needs {file_bytes / GIB:.1f} GiB of disk in {workdir} plus 2 "
                                                     f"GiB, has {free_disk / GIB:.1f} GiB"})
            print(results[-1]["skipped"], flush=True)
            continue
        target = workdir / (f"{name}.safetensors" if part == "dit" else name)
        start = time.perf_counter()
        written = write_random_dit(target, variant) if part == "dit" else write_random_text_encoder(target, variant)
        print(f"{name}: wrote {written / 1e9:.2f} GB of random weights in {time.perf_counter() - start:.0f} s",
              flush=True)
        try:
            for switch in switches:
                floor = bytes_of(variant, switch)
                need, free = needs(floor, part, switch), mem_available()
                row = {"name": name, "part": part, "switch": switch, "floor": floor, "file_bytes": written}
                if free - MARGIN < need:
                    row["skipped"] = (f"needs {need / GIB:.1f} GiB of RAM plus a {MARGIN / GIB:.0f} GiB margin, "
                                      f"MemAvailable is {free / GIB:.1f} GiB")
                else:
                    kind = "te" if part == "text_encoder" else "dit"
                    step_here = step and (step_switches is None or switch in step_switches)
                    if isolate:
                        row.update(run_worker(kind, target, variant.name, switch, rank, step_here, timeout))
                    elif kind == "dit":
                        row.update(worker_dit(target, variant.name, switch, rank, step_here))
                    else:
                        row.update(worker_text_encoder(target, variant.name, switch))
                    if "peak" in row:
                        row["load_peak_over_floor"] = row["load_peak"]["hwm"] / floor
                        row["load_peak_above_baseline_over_floor"] = (
                            (row["load_peak"]["hwm"] - row["baseline"]["VmRSS"]) / floor)
                        row["peak_over_floor"] = row["peak"]["hwm"] / floor
                results.append(row)
                print(rehearsal_line(row), flush=True)
        finally:
            if not keep:
                shutil.rmtree(target) if target.is_dir() else target.unlink()
    return results


def _te_file_bytes(variant) -> int:
    import torch
    from transformers import Qwen3ForCausalLM

    from flux2.text_encoder import builtin_config

    config = builtin_config(variant)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    sd = model.state_dict()
    return sum(t.numel() * 2 for k, t in sd.items() if not (config.tie_word_embeddings and k == "lm_head.weight"))


def rehearsal_line(row: dict) -> str:
    head = f"{row['name']} {row['switch']}: "
    if "skipped" in row:
        return head + "skipped: " + row["skipped"]
    if "error" in row:
        return head + "FAILED: " + row["error"][-500:]
    lp, p, base = row["load_peak"], row["peak"], row["baseline"]["VmRSS"]
    text = (f"floor {row['floor'] / GIB:.2f} GiB; load: peak {lp['hwm'] / GIB:.2f} GiB "
            f"({row['load_peak_over_floor']:.2f}x the floor, {row['load_peak_above_baseline_over_floor']:.2f}x above "
            f"the {base / GIB:.2f} GiB process before it; anon {lp['anon'] / GIB:.2f} + file {lp['file'] / GIB:.2f} GiB "
            f"at the sampled peak), {row['load_s']:.1f} s ({row['load_cpu_s']:.0f} s CPU)")
    if row.get("read_1_s"):
        reads = row["read_1_s"] + row["read_2_s"]
        text += (f" (reading the file twice: {row['read_1_s']:.1f} s + {row['read_2_s']:.1f} s, the load "
                 f"{row['load_s'] / reads:.2f}x that; once dropping behind: {row['read_drop_behind_s']:.1f} s)")
    if "step_s" in row:
        text += f"; LoRA + training step at 128^2: {row['step_s']:.1f} s"
    if "encode_s" in row:
        text += f"; four prompts: {row['encode_s']:.1f} s"
    text += f"; whole run peak {p['hwm'] / GIB:.2f} GiB ({row['peak_over_floor']:.2f}x)"
    return head + text


# ---------------------------------------------------------------------------------------------------- GPU


class RandomSource:
    """A TensorFile look-alike whose tensors are random (deterministic per name), made on `device` a chunk of
    rows at a time: lets flux2.quantize.load_streaming build a full-size quantised model without a file."""

    def __init__(self, shapes: dict, device):
        self.shapes, self.device, self.path = shapes, device, "<random weights>"

    def shape(self, key):
        return self.shapes[key]

    def read(self, key, rows=None):
        import torch

        shape = self.shapes[key]
        if rows is not None:
            shape = (rows[1] - rows[0],) + tuple(shape[1:])
        return (torch.randn(shape, device=self.device) * 0.02).to(torch.bfloat16)

    def iter_rows(self, key, rows_per_chunk, keep=1):  # each chunk is fresh memory: valid as long as it is held
        total = self.shapes[key][0]
        for start in range(0, total, rows_per_chunk):
            yield start, self.read(key, (start, min(start + rows_per_chunk, total)))


def gpu_rows(variants: list[str], res: int, rank: int, device: str = "cuda") -> list[dict]:
    """The GPU targets: NF4 base, LoRA rank `rank`, gradient checkpointing, one warm-up and three timed steps.
    (device="cpu" runs the same code with the process's peak RSS instead: how it is checked without a GPU.)"""
    import torch

    from flux2.lora import create_network
    from flux2.quantize import load_streaming
    from flux2.variants import VARIANTS

    rows = []
    for name in variants:
        variant, device = VARIANTS[name], torch.device(device)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

        def peak_bytes() -> int:
            return torch.cuda.max_memory_allocated() if cuda else PeakRSS.status()["VmHWM"]

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize()

        model = meta_dit(variant)
        shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
        source = RandomSource(shapes, device)
        load_streaming(model, lambda k: (source, k), block_linears(model), "nf4", torch.bfloat16, device)
        model.requires_grad_(False).gradient_checkpointing = True
        load_peak = peak_bytes()
        network = create_network(model, rank, rank)
        network.apply_to(model)
        params = [p for p in network.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        times = []
        for i in range(4):
            inputs = step_inputs(variant, res, variant.max_text_tokens, device)
            sync()
            start = time.perf_counter()
            step_loss(model, inputs).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if i:
                times.append(time.perf_counter() - start)
        peak = peak_bytes()
        # What the caching allocator held at most (allocated + its slack): what has to fit on the card.
        reserved = torch.cuda.max_memory_reserved() if cuda else None
        rows.append({"variant": name, "quantize": "nf4", "res": res, "rank": rank, "grad_ckpt": True,
                     "load_peak_gib": load_peak / GIB, "peak_gib": peak / GIB,
                     "reserved_gib": None if reserved is None else reserved / GIB, "step_s": sorted(times)[1],
                     "target_gib": GPU_TARGETS.get(name, 0) / GIB,
                     "ok": peak <= GPU_TARGETS.get(name, float("inf"))})
        target = (f" (target {GPU_TARGETS[name] / GIB:.0f} GiB: {'ok' if rows[-1]['ok'] else 'MISSED'})"
                  if name in GPU_TARGETS else "")
        print(f"{name} nf4 {res}^2 rank {rank} GC: peak {peak / GIB:.2f} GiB{target}, load peak {load_peak / GIB:.2f} "
              f"GiB, {rows[-1]['step_s']:.3f} s/step", flush=True)
        del model, network, opt, params
    return rows


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=32, help="LoRA rank of the table and rehearsals")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--rehearse", nargs="*", default=None, metavar="NAME",
                   help="full-size rehearsals: klein-base-4b klein-base-9b qwen3-4b qwen3-8b (tiny, qwen3-tiny: tests)")
    p.add_argument("--modes", nargs="*", default=list(DIT_MODES), choices=DIT_MODES, help="switches to rehearse")
    p.add_argument("--workdir", default="/var/tmp/flux2-rehearse", help="where the random weight files go")
    p.add_argument("--keep", action="store_true", help="keep the random weight files")
    p.add_argument("--no_step", action="store_true", help="rehearse loading only (no LoRA training step)")
    p.add_argument("--step_modes", nargs="*", default=None, choices=DIT_MODES,
                   help="switches whose DiT rehearsal includes the training step (default: all)")
    p.add_argument("--gpu", action="store_true", help="the GPU targets (CUDA only; skipped elsewhere)")
    p.add_argument("--gpu_variants", nargs="*", default=list(GPU_TARGETS), help="variants of --gpu")
    p.add_argument("--res", type=int, default=1024, help="resolution of --gpu")
    p.add_argument("--device", default="cuda", help="device of --gpu (cpu: the same step on the CPU, peak RSS)")
    p.add_argument("--worker", nargs=6, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        kind, path, variant, switch, rank, step = args.worker
        result = (worker_dit(Path(path), variant, switch, int(rank), step == "1") if kind == "dit"
                  else worker_text_encoder(Path(path), variant, switch))
        print(json.dumps(result))
        return 0
    out: dict = {}
    if args.gpu:
        import torch

        cuda = torch.device(args.device).type == "cuda"
        if cuda and not torch.cuda.is_available():
            print("--gpu: skipped, no CUDA device here (run it through bench/gpu_suite.sh on a GPU machine)")
            out["gpu"] = {"skipped": "no CUDA device"}
        else:
            name = torch.cuda.get_device_name() if cuda else "cpu"
            out["gpu"] = {"device": name, "rows": gpu_rows(args.gpu_variants, args.res, args.rank, args.device)}
    elif args.rehearse is not None:
        out["rehearsals"] = rehearse(args.rehearse, args.modes, Path(args.workdir), args.rank, args.keep,
                                     not args.no_step, step_switches=args.step_modes)
    else:
        rows = table(args.rank)
        out["table"] = rows
        out["targets"] = check_targets(rows)
        print(markdown(rows))
        print()
        print("\n".join(out["targets"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
