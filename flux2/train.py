"""LoRA training: the `train` stage and `flux2 train`.

Flow matching on cached latents and text embeddings: x_t = (1 - t) x0 + t noise, the DiT predicts the velocity
noise - x0, MSE. Reads the caches only (no text encoder in memory). Checkpoints every `save_every_n_steps` into
`checkpoint_dir/<fingerprint>/` (one folder per configuration, none ever deleted for another) and resumes from
the last good one; every random draw is a function of (seed, step), so a resumed run ends with the same LoRA,
loss history and MLflow metrics as an uninterrupted one. One training at a time per checkpoint folder (a lock).
Several processes (`accelerate launch`) average their LoRA gradients, so two processes with batch B equal one
process with batch 2B. `train.network_weights` starts from an existing LoRA (flux2/warm_start.py);
`train.ema_decay` keeps an EMA of the LoRA (flux2/ema.py), checkpointed with it and saved beside it;
`save_every_n_epochs` / `sample_every_n_epochs` add per-epoch LoRA files and samples.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from flux2 import sampling, timesteps
from flux2.atomic import atomic_write_json, atomic_write_text, remove_temporaries, sha256_file
from flux2.checkpoint import TrainState, adopt_flat_checkpoints, load_ema_state, load_latest_checkpoint, save_checkpoint
from flux2.ema import EMA, ema_path
from flux2.optim import build_optimizer, check_optimizer, lr_factor
from flux2.params import Params, to_flat_dict
from flux2.train_data import Batch, TrainData, mix_seed, model_fingerprints
from flux2.variants import Variant, get_variant

if TYPE_CHECKING:
    from flux2.warm_start import WarmStart

log = logging.getLogger("flux2.train")
RUN_RECORD = "mlflow_run_id.txt"  # in a configuration's checkpoint folder: the MLflow run of its last training


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to try."""


@dataclass
class TrainResult:
    lora_path: Path
    steps: int
    final_loss: float
    bad_steps: int
    mlflow_run_id: str | None


def distilled_warning(variant: Variant) -> str | None:
    if variant.is_base:
        return None
    base = {"klein-4b": "klein-base-4b", "klein-9b": "klein-base-9b"}.get(variant.name)
    advice = f"train on {base} and sample the result with {variant.name}" if base else \
        "dev has no base release: expect a LoRA that works at inference but trains less stably"
    return (f"model_version {variant.name} is a guidance-distilled model; LoRAs trained on distilled weights "
            f"often collapse or need strengths above 1: {advice}")


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"



def run_fingerprint(p: Params, manifest_sha: str, latents_meta: dict, text_meta: dict, world_size: int,
                    network_weights_sha: str | None = None) -> str:
    """What decides the trained weights; checkpoints from a run with another fingerprint are not resumed. A warm
    start counts by the content of its file (`network_weights_sha`), not by its path."""
    t = asdict(p.train)
    # Speed switches that leave the trained weights alone (compile: up to float rounding) may change on resume.
    for k in ("sample_prompts", "sample_every_n_steps", "sample_every_n_epochs", "save_every_n_steps",
              "save_every_n_epochs", "log_every_n_steps", "output_dir", "output_name", "checkpoint_dir",
              "max_bad_steps", "compile", "gradient_checkpointing_blocks"):
        t.pop(k)
    t["network_weights"] = network_weights_sha
    t["ema_decay"] = t["ema_decay"] or None  # 0 and null both mean no EMA
    if p.train.lr_scheduler in ("constant", "constant_with_warmup"):
        # The run length changes nothing already trained: a longer run continues from the last checkpoint.
        t.pop("max_train_steps")
        t.pop("max_train_epochs")
    m = asdict(p.model)
    m.pop("device")
    m.pop("attention_backend")  # the same attention, another kernel
    if not m["fp8_matmul"]:
        m.pop("fp8_matmul")  # so runs from before the switch existed still resume
    blob = json.dumps([t, m, manifest_sha, latents_meta, text_meta, world_size], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device: a plain copy to a GPU waits for all queued work,
    one from pinned memory does not."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def flux_loss(dit: torch.nn.Module, batch: Batch, variant: Variant, p: Params, device: torch.device
              ) -> torch.Tensor:
    """Weighted flow-matching MSE of one micro-batch (mean over samples)."""
    t_cfg = p.train
    x0, noise = to_device(batch.latents, device), to_device(batch.noise, device)
    b, _, h, w = x0.shape
    t = to_device(timesteps.sample_timesteps(t_cfg.timestep_sampling, batch.normal, batch.uniform, h * w,
                                             t_cfg.sigmoid_scale, t_cfg.discrete_flow_shift, t_cfg.logit_mean,
                                             t_cfg.logit_std), device)
    mask = to_device(batch.masks, device) if batch.masks is not None else None
    per_sample = velocity_loss(dit, x0, noise, t, to_device(batch.ctx, device),
                               [to_device(c, device) for c in batch.controls], variant, t_cfg.guidance, mask)
    return (per_sample * timesteps.loss_weights(t_cfg.weighting_scheme, t)).mean()


def velocity_loss(dit: torch.nn.Module, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
                  controls: list[torch.Tensor], variant: Variant, guidance: float = 1.0,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Flow-matching MSE per sample (B,): the DiT's velocity at x_t = (1 - t) x0 + t noise against noise - x0.
    Reference latents (`controls`, one (B, 128, h_k, w_k) tensor each) join as extra tokens whose predictions
    are dropped. `mask` (B, 1, h, w) weighs each latent token's error (masked loss: the mean of the weighted
    errors, as kohya's sd-scripts); None weighs all alike. Shared by training and the validation loss."""
    b, _, h, w = x0.shape
    device = x0.device
    xt, target = timesteps.noisy_latents(x0, noise, t)
    x, x_ids = sampling.pack(xt), sampling.latent_ids(b, h, w, device=device)
    if controls:
        ref_tokens, ref_ids = sampling.reference_tokens(controls)
        x, x_ids = torch.cat((x, ref_tokens), dim=1), torch.cat((x_ids, ref_ids), dim=1)
    guidance_vec = torch.full((b,), guidance, device=device) if variant.use_guidance_embed else None
    pred = dit(x, x_ids, t, ctx, sampling.text_ids(b, ctx.shape[1], device=device), guidance_vec)[:, : h * w]
    error = (pred.float() - sampling.pack(target)).square()
    if mask is not None:
        error = error * sampling.pack(mask.float())
    return error.mean(dim=(1, 2))


def all_reduce_grads(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average the LoRA gradients over processes (one flat all-reduce)."""
    import torch.distributed as dist

    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def total_steps(p: Params, data: TrainData) -> int:
    """train.max_train_epochs, when set, decides the run length (as in musubi-tuner); else max_train_steps."""
    if p.train.max_train_epochs is not None:
        return p.train.max_train_epochs * data.batches_per_epoch
    return p.train.max_train_steps


@dataclass
class Training:
    """What the loop works with, built once by `setup`: the data, the DiT with the LoRA attached, the optimizer."""

    p: Params
    base: Path
    variant: Variant
    device: torch.device
    dtype: torch.dtype
    rank: int
    world: int
    main: bool
    data: TrainData
    manifest: Path
    fingerprint: str
    steps_total: int
    dit: torch.nn.Module
    network: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    ckpt_dir: Path
    warning: str | None
    warm_start: WarmStart | None = None  # the LoRA file the run started from (train.network_weights)
    ema: EMA | None = None  # the EMA of the LoRA weights (train.ema_decay)


@dataclass
class QueuedStep:
    """A step whose loss and gradient norm (`values`, on the device) are not read yet."""

    step: int  # 0-based index
    lr: float
    values: torch.Tensor
    start: float  # time.perf_counter() when it began and when its work was queued
    end: float
    items: int  # samples in the step over all processes (sources may have batch sizes of their own)


@dataclass
class Progress:
    """The loop's state between steps: the checkpointed position (with the loss history), the MLflow run."""

    state: TrainState
    history_path: Path  # the readable copy of state.history, written with each checkpoint
    run: object | None  # flux2.tracking.Run on the main process
    loss_value: float = float("nan")
    lr: float = 0.0
    consecutive_bad: int = 0
    pending: list[QueuedStep] = field(default_factory=list)  # steps whose loss is still on the device
    last_end: float = 0.0


def train(p: Params, base: Path = Path("."), progress: bool = True) -> TrainResult:
    """Train a LoRA as params.yaml says; returns where it was written. Paths are relative to `base`. A second
    training on the same checkpoint folder is refused while this one runs (flux2.locks)."""
    from contextlib import nullcontext

    from flux2.locks import folder_lock

    main_process = int(os.environ.get("RANK", "0")) == 0  # before accelerate starts: only rank 0 holds the lock
    lock = folder_lock(base / p.train.checkpoint_dir, "in use by another training right now",
                       "wait for it to finish, or give this run another train.checkpoint_dir",
                       "flux2 train") if main_process else nullcontext()
    with lock:
        return _train(p, base, progress)


def _train(p: Params, base: Path, progress: bool) -> TrainResult:
    tr = setup(p, base)
    prog = resume(tr)
    bar = tqdm(total=tr.steps_total, initial=prog.state.step, desc="training", unit="step",
               disable=not (progress and tr.main))
    try:
        tr.dit.train()
        tr.network.train()
        while prog.state.step < tr.steps_total:
            train_step(tr, prog)
            bar.set_postfix(loss=f"{prog.loss_value:.4f}", lr=f"{prog.lr:.2e}")
            bar.update()
        bar.close()
        return finish(tr, prog)
    except BaseException:
        bar.close()
        if prog.run is not None:
            prog.run.end("FAILED")  # a resumed run sets it RUNNING again
        raise


def setup(p: Params, base: Path) -> Training:
    """Processes, device, data, the DiT (with fp8 / FSDP / block swap as asked), the LoRA and its optimizer."""
    from accelerate import PartialState

    from flux2.compile import compile_blocks
    from flux2.compile import resolve as resolve_compile
    from flux2.loading import resolve_device, resolve_dtype
    from flux2.lora import create_network, param_groups
    from flux2.network_config import network_options

    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    main = state.is_main_process
    variant = get_variant(p.model.model_version)
    device = resolve_device(p.model.device, state.local_process_index)
    dtype = resolve_dtype(p.model.dtype, device, variant)
    t_cfg = p.train
    warning = distilled_warning(variant)
    if warning and main:
        log.warning(warning)
        print(f"warning: {warning}")
    check_inputs(p, main)
    if p.model.blocks_to_swap and not t_cfg.gradient_checkpointing:
        raise TrainingError("model.blocks_to_swap needs train.gradient_checkpointing: true (without it autograd "
                            "keeps every swapped block on the GPU until backward, so nothing is saved)")

    manifest = base / p.dataset.manifest
    data = TrainData(manifest, base / p.cache.latents_dir, base / p.cache.text_dir, variant, t_cfg.batch_size,
                     world, t_cfg.seed, t_cfg.caption_dropout_rate, t_cfg.gradient_accumulation_steps,
                     *model_fingerprints(p.model, base), masked_loss=t_cfg.masked_loss)
    warm = None
    if t_cfg.network_weights:
        from flux2.warm_start import read_network_weights

        warm = read_network_weights(base / t_cfg.network_weights)  # checked before the DiT loads
    fingerprint = run_fingerprint(p, sha256_file(manifest), data.latents.meta, data.text.meta, world,
                                  warm.sha256 if warm else None)
    steps_total = total_steps(p, data)

    dit = frozen_dit(p, base, variant, device, dtype)
    torch.manual_seed(t_cfg.seed)  # the LoRA's initial weights
    options = network_options(t_cfg, variant)
    network = create_network(dit, t_cfg.network_dim, t_cfg.network_alpha, t_cfg.include_patterns,
                             t_cfg.exclude_patterns, t_cfg.network_dropout, t_cfg.rank_dropout,
                             t_cfg.module_dropout, options=options).to(device)
    if warm is not None:
        from flux2.warm_start import load_network_weights

        fresh = load_network_weights(network, dit, warm)
        network.to(device)
        if main:
            print(f"starting from {warm.describe()}; {fresh} module(s) it lacks start fresh")
    network.apply_to(dit)
    if resolve_compile(t_cfg.compile, device):
        compile_blocks(dit)  # after the LoRA hooks: they are traced into the blocks' graphs
    params = [q for q in network.parameters() if q.requires_grad]
    groups = param_groups(network, t_cfg.learning_rate, options)
    optimizer = build_optimizer(groups, t_cfg.optimizer_type, t_cfg.learning_rate, t_cfg.optimizer_args)
    ema = EMA(network, t_cfg.ema_decay) if t_cfg.ema_decay else None
    if main:
        print(f"training {len(network.lora_modules)} {options.network_type} modules, "
              f"{sum(q.numel() for q in params):,} parameters (rank {t_cfg.network_dim}, alpha "
              f"{t_cfg.network_alpha:g}, scale {t_cfg.network_alpha / t_cfg.network_dim:g}"
              f"{f', {len(groups)} learning rates' if len(groups) > 1 else ''}) on {len(data.items)} items, "
              f"{steps_total} steps ({steps_total / data.batches_per_epoch:g} epochs), {world} process(es), "
              f"device {device}" + (f"; EMA decay {ema.decay:g} ({ema.nbytes / 2**20:.1f} MiB)" if ema else ""))
    return Training(p, base, variant, device, dtype, rank, world, main, data, manifest, fingerprint, steps_total,
                    dit, network, params, optimizer, base / t_cfg.checkpoint_dir / fingerprint, warning, warm, ema)


def frozen_dit(p: Params, base: Path, variant: Variant, device: torch.device, dtype: torch.dtype
               ) -> torch.nn.Module:
    """The DiT to train a LoRA on, as model.* and train.* ask: quantised or with fp8 products, gradient
    checkpointing, sharded over the processes (FSDP) or with swapped blocks."""
    from flux2.loading import load_frozen_dit

    m, t_cfg = p.model, p.train
    on_cpu_first = m.blocks_to_swap or t_cfg.fsdp
    dit = load_frozen_dit(base / m.dit, variant, device, dtype, load_device="cpu" if on_cpu_first else None,
                          fp8_scaled=m.fp8_base or m.fp8_scaled, quantize=m.quantize, fp8_matmul=m.fp8_matmul,
                          attention_backend=m.attention_backend)
    dit.gradient_checkpointing = t_cfg.gradient_checkpointing
    dit.checkpoint_blocks = t_cfg.gradient_checkpointing_blocks
    if t_cfg.fsdp:
        from flux2.sharding import shard_dit

        shard_dit(dit, device)
    if m.blocks_to_swap:
        from flux2.block_swap import enable_block_swap

        enable_block_swap(dit, m.blocks_to_swap, device)
    return dit


def check_inputs(p: Params, main: bool) -> None:
    """What can be checked in a second, before minutes of loading: the optimizer and its arguments, and (on the
    main process) that an http(s) tracking server answers."""
    from flux2.tracking import check_server, tracking_uri

    check_optimizer(p.train.optimizer_type, p.train.learning_rate, p.train.optimizer_args)
    if main:
        check_server(tracking_uri(p.tracking.tracking_uri))


def resume(tr: Training) -> Progress:
    """The newest checkpoint of this configuration with at most steps_total steps (LoRA, optimizer and loss
    history restored) or step 0; the MLflow run (`open_run`)."""
    ckpt_dir, main = tr.ckpt_dir, tr.main
    if main:
        adopt_flat_checkpoints(ckpt_dir.parent)
    train_state = TrainState(step=0, extra={"fingerprint": tr.fingerprint})
    resumed = load_latest_checkpoint(ckpt_dir, tr.optimizer, max_step=tr.steps_total)
    if resumed is not None:
        train_state, lora_sd = resumed
        tr.network.load_weights(lora_sd)
        if tr.ema is not None:
            ema_state = load_ema_state(ckpt_dir, train_state)
            if ema_state is None:
                raise TrainingError(f"{ckpt_dir}/step-{train_state.step:08d} holds no EMA state although "
                                    "train.ema_decay is set; move that checkpoint folder away to start over")
            tr.ema.load_state_dict(ema_state)
        if main:
            print(f"resuming from {ckpt_dir}/step-{train_state.step:08d}")
    elif main and ckpt_dir.parent.is_dir() and any(d.is_dir() and d != ckpt_dir for d in ckpt_dir.parent.iterdir()):
        print(f"starting from step 0 (the checkpoints of other configurations in {ckpt_dir.parent} are kept)")
    history = train_state.history = [[int(s), float(l), float(r)] for s, l, r in train_state.history]
    run = open_run(tr, train_state, resumed is not None) if main else None
    return Progress(train_state, tr.base / "plots" / "train_loss.csv", run,
                    history[-1][1] if history else float("nan"))


def open_run(tr: Training, state: TrainState, resumed: bool):
    """The MLflow run of this training: the checkpoint's own run when it has exactly these parameters (a resumed
    run), else a new one; a new run that continues another run's checkpoint (the same configuration with other
    settings, e.g. trained for more steps) is tagged with that parent. The loss history it lacks is logged."""
    from flux2.tracking import Run, exp_name, open_store, tracking_uri

    p = tr.p
    client = open_store(tracking_uri(p.tracking.tracking_uri))
    params = {**to_flat_dict(p), "network.type": tr.network.network_type,
              "network.modules": len(tr.network.lora_modules), "network.parameters": sum(q.numel() for q in tr.params)}
    parent = state.extra.get("mlflow_run_id") if resumed else None
    run = Run.reopen(client, parent, params) if parent else None
    record = tr.ckpt_dir / RUN_RECORD  # the run of this folder's latest training, killed before a checkpoint?
    if run is None and not resumed and record.is_file():
        run = Run.reopen(client, record.read_text().strip(), params, unfinished_only=True)
    tags = {"dvc.exp_name": exp_name()} if exp_name() else {}
    if run is not None:
        run.client.update_run(run.run_id, status="RUNNING")  # it failed, was killed, or is rerun
    else:
        run = Run.create(client, p.tracking.experiment, run_name=exp_name() or p.train.output_name)
        run.log_params(params)
        tags.update({"flux2.variant": tr.variant.name, "flux2.commit": git_commit(tr.base),
                     "flux2.manifest_sha256": sha256_file(tr.manifest), "flux2.fingerprint": tr.fingerprint})
        if parent:
            tags.update({"flux2.parent_run_id": parent, "flux2.parent_step": state.step})
            print(f"continuing from step {state.step} of MLflow run {parent} (other settings): new run {run.run_id}")
        if tr.warning:
            tags["flux2.warning"] = tr.warning
        if tr.warm_start is not None:
            tags.update(tr.warm_start.tags())
    if tags:
        run.set_tags(tags)
    state.extra["mlflow_run_id"] = run.run_id
    atomic_write_text(record, run.run_id + "\n")
    for step, loss, lr in state.history:  # steps the run lacks: a warm start's, or a kill before their flush
        if step % p.train.log_every_n_steps == 0:
            run.log_metrics({"loss": loss, "lr": lr}, step)
    run.flush()
    return run


def train_step(tr: Training, prog: Progress) -> None:
    """One optimizer step (all micro-batches, gradient averaging over processes, clipping), skipped on the device
    when the loss or gradient is not finite; then logging, checkpoints and samples as scheduled.

    Nothing here waits for the device: the loss and gradient norm stay there and are read, all queued steps in one
    transfer, every `log_every_n_steps` steps, one step late (`read_steps`), so the GPU always has the next step
    queued. The skip itself needs no host decision either (`optimizer_step`)."""
    p, t_cfg, state = tr.p, tr.p.train, prog.state
    step = state.step
    start = time.perf_counter()
    lr = t_cfg.learning_rate * lr_factor(step, t_cfg.lr_scheduler, tr.steps_total, t_cfg.lr_warmup_steps,
                                         t_cfg.lr_scheduler_num_cycles, t_cfg.lr_scheduler_power)
    for group in tr.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # per-block rates, LoRA+
    prog.lr = lr
    loss_sum, items = torch.zeros((), device=tr.device), 0
    for micro in range(t_cfg.gradient_accumulation_steps):
        torch.manual_seed(mix_seed(t_cfg.seed, step, micro, tr.rank, 7919))  # LoRA dropouts
        batch = tr.data.micro_batch(step, micro, tr.rank)
        items += len(batch.ids) * tr.world
        with torch.autocast(tr.device.type, dtype=torch.bfloat16, enabled=t_cfg.mixed_precision == "bf16"):
            loss = flux_loss(tr.dit, batch, tr.variant, p, tr.device)
        (loss / t_cfg.gradient_accumulation_steps).backward()
        loss_sum += loss.detach().float() / t_cfg.gradient_accumulation_steps
    if tr.world > 1:
        all_reduce_grads(tr.params, tr.world)
        loss_sum = _mean_over_processes(loss_sum)
    values, stepped = optimizer_step(tr.params, tr.optimizer, loss_sum, t_cfg.max_grad_norm)
    if tr.ema is not None and bool(stepped):  # a skipped step leaves the EMA alone too
        tr.ema.update(tr.network)  # its update count lives on the host: with an EMA, one read per step
    state.step += 1
    prog.pending.append(QueuedStep(step, lr, values, start, time.perf_counter(), items))
    if state.step % t_cfg.log_every_n_steps == 0:
        read_steps(tr, prog, keep=1)
    if state.step == tr.steps_total:
        return  # finish() writes the LoRA, the last checkpoint and the samples
    # The epoch this step completed (0 inside an epoch); epochs are batches_per_epoch optimizer steps.
    epoch_done = state.step // tr.data.batches_per_epoch if state.step % tr.data.batches_per_epoch == 0 else 0
    if tr.main and _every(t_cfg.save_every_n_epochs, epoch_done):
        _save_loras(tr, tr.base / t_cfg.output_dir / f"{t_cfg.output_name}-{epoch_done:06d}.safetensors", state)
    if _every(t_cfg.save_every_n_steps, state.step):
        _checkpoint(tr, prog, prog.run)
    if tr.main and (_every(t_cfg.sample_every_n_steps, state.step) or _every(t_cfg.sample_every_n_epochs, epoch_done)):
        _samples(p, tr.base, tr.variant, tr.dit, tr.device, tr.dtype, state.step, prog.run)


def _every(n: int, count: int) -> bool:
    """Whether a cadence of every `n` (0: off) falls on `count` (steps or epochs done; 0: none yet)."""
    return bool(n) and count > 0 and count % n == 0


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` can skip a step by a device flag: torch's fused optimizers (AdamW, Adam, SGD, Adagrad
    with fused=True; the adamw default) take `found_inf` as torch.amp.GradScaler hands it to them."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in optimizer.param_groups)


def optimizer_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradients and step, unless the loss or the gradient norm is not finite: then the weights and the
    optimizer state stay exactly as they were. Returns [loss, grad norm] and whether it stepped (a bool), both on
    the device.

    With a fused optimizer the step runs with `found_inf` = not finite, and its kernel leaves everything untouched
    when it is set (the step count too), so no NaN ever reaches the weights and the host never waits. Other
    optimizers read the flag on the host (one sync per step)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    values = torch.stack([loss.float(), grad_norm.to(loss.device, torch.float32)])
    finite = torch.isfinite(values).all()
    if skips_on_device(optimizer):
        optimizer.found_inf = (~finite).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif finite.item():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return values, finite


def read_steps(tr: Training, prog: Progress, keep: int = 0) -> None:
    """Read the queued steps' loss and gradient norm from the device in one transfer (all but the newest `keep`)
    and account for them in order: loss history, MLflow metrics, bad-step counting. Raises TrainingError when
    `max_bad_steps` steps in a row were not finite (they were skipped; the message names the step)."""
    t_cfg, state = tr.p.train, prog.state
    ready = prog.pending[: max(0, len(prog.pending) - keep)]
    if not ready:
        return
    del prog.pending[: len(ready)]
    for queued, (loss, grad_norm) in zip(ready, torch.stack([q.values for q in ready]).tolist()):
        elapsed = queued.end - max(queued.start, prog.last_end)  # from the previous step's end: device time
        prog.last_end = queued.end
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            prog.consecutive_bad += 1
            state.bad_steps += 1
            if prog.run is not None:
                prog.run.log_metrics({"bad_steps": state.bad_steps}, queued.step)
            if prog.consecutive_bad >= t_cfg.max_bad_steps:
                raise TrainingError(
                    f"step {queued.step}: {prog.consecutive_bad} steps in a row had a non-finite loss or gradient "
                    f"(loss {loss}, grad norm {grad_norm}); likely causes: learning_rate too high "
                    f"({t_cfg.learning_rate:g}), fp8 weights overflowing, or a corrupted cache entry. The last "
                    f"good checkpoint is in {tr.ckpt_dir}")
            continue
        prog.consecutive_bad = 0
        prog.loss_value = loss
        if tr.main:
            done = queued.step + 1
            state.history.append([done, loss, queued.lr])
            if done % t_cfg.log_every_n_steps == 0:
                prog.run.log_metrics({"loss": loss, "lr": queued.lr, "grad_norm": grad_norm, "step_time_s": elapsed,
                                      "samples_per_s": queued.items / elapsed,
                                      "peak_memory_gib": peak_memory_gib(tr.device)}, done)


def finish(tr: Training, prog: Progress) -> TrainResult:
    """The LoRA file (kohya form, with the training's metadata), the last checkpoint, the final samples,
    metrics/train.json and the MLflow artifacts."""
    p, t_cfg, state, run = tr.p, tr.p.train, prog.state, prog.run
    read_steps(tr, prog)
    out_dir = tr.base / t_cfg.output_dir
    lora_path = out_dir / f"{t_cfg.output_name}.safetensors"
    if tr.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_temporaries(out_dir)  # of a LoRA write that a killed run left
        written = _save_loras(tr, lora_path, state)  # nothing time-, path- or commit-dependent in them
        _checkpoint(tr, prog, run)  # MLflow flushed first: a kill in the samples below loses no step
        if t_cfg.sample_prompts:
            _samples(p, tr.base, tr.variant, tr.dit, tr.device, tr.dtype, state.step, run)
        summary = {"steps": state.step, "final_loss": prog.loss_value, "bad_steps": state.bad_steps,
                   "mlflow_run_id": run.run_id, "lora": str(lora_path)}
        if tr.ema is not None:
            summary["lora_ema"] = str(ema_path(lora_path))
        atomic_write_json(tr.base / "metrics" / "train.json", summary)
        for path in written:
            run.log_artifact(path, "lora")
        if (tr.base / "params.yaml").is_file():  # dvc.lock is logged by the evaluate stage: DVC writes train's
            run.log_artifact(tr.base / "params.yaml")  # entry of this run only after this stage ends
        run.end()
        print(f"wrote {lora_path} after {state.step} steps (final loss {prog.loss_value:.4f}); "
              f"MLflow run {run.run_id}")
    return TrainResult(lora_path, state.step, prog.loss_value, state.bad_steps, run.run_id if run else None)


def _save_loras(tr: Training, path: Path, state: TrainState) -> list[Path]:
    """The LoRA as it is now at `path` (kohya form with the training's metadata) and, with an EMA, its averaged
    weights beside it (`<stem>_ema.safetensors`, the same form and metadata); returns the files written."""
    t_cfg = tr.p.train
    meta = {"ss_training_comment": "flux2", "ss_steps": str(state.step), "ss_seed": str(t_cfg.seed),
            "ss_epoch": str(state.step // tr.data.batches_per_epoch),
            "ss_learning_rate": str(t_cfg.learning_rate), "ss_optimizer": t_cfg.optimizer_type,
            "ss_timestep_sampling": t_cfg.timestep_sampling, "ss_weighting_scheme": t_cfg.weighting_scheme,
            "ss_guidance_scale": str(t_cfg.guidance), "ss_mixed_precision": t_cfg.mixed_precision,
            "ss_num_train_items": str(len(tr.data.items)), "flux2.manifest_sha256": sha256_file(tr.manifest),
            "flux2.params": json.dumps(asdict(t_cfg), default=str, sort_keys=True)}
    if tr.warm_start is not None:  # the path as params.yaml gives it: identical runs, identical bytes
        meta.update({**tr.warm_start.tags(), "flux2.warm_start": str(t_cfg.network_weights)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tr.network.save(path, meta)
    if tr.ema is None:
        return [path]
    with tr.ema.applied(tr.network):
        tr.network.save(ema_path(path), {**meta, "flux2.ema_decay": str(tr.ema.decay)})
    return [path, ema_path(path)]


def _mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def _checkpoint(tr: Training, prog: Progress, run) -> None:
    read_steps(tr, prog)  # every process: the bad-step count is part of the state
    if not tr.main:
        return
    # The checkpoint carries the loss history itself (DVC deletes plots/train_loss.csv before it reruns the
    # stage); the CSV is its readable copy. MLflow is flushed first, so a resume logs only steps after this one.
    prog.history_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(prog.history_path,
                      "step,loss,lr\n" + "".join(f"{s},{l!r},{r!r}\n" for s, l, r in prog.state.history))
    if run is not None:
        run.flush()
    save_checkpoint(tr.ckpt_dir, prog.state, tr.network.state_dict(), tr.optimizer,
                    ema=tr.ema.state_dict() if tr.ema is not None else None)


def _samples(p: Params, base: Path, variant: Variant, dit: torch.nn.Module, device: torch.device,
             dtype: torch.dtype, step: int, run) -> None:
    """Images for the prompts of train.sample_prompts with the LoRA as it is now (text from the cache)."""
    from flux2.cache_store import CacheReader
    from flux2.cache_text import read_prompt_map
    from flux2.generate import prepare_control_images, sample_latents, save_png, use_cfg
    from flux2.images import to_pil
    from flux2.loading import load_ae
    from flux2.prompts import read_prompt_file

    if not p.train.sample_prompts:
        return
    prompts = read_prompt_file(base / p.train.sample_prompts)
    text = CacheReader(base / p.cache.text_dir)
    keys = read_prompt_map(base / p.cache.text_dir)
    ae = load_ae(base / p.model.vae, variant, device=device, dtype=torch.float32)
    out_dir = base / p.train.output_dir / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = dit.training
    dit.eval()
    try:
        for i, sp in enumerate(prompts):
            s = variant.sample_settings(sp.height, sp.width, sp.steps, sp.guidance)
            g = s.guidance
            cfg = use_cfg(variant, g)
            neg = sp.negative_prompt or ""
            for text_needed in [sp.prompt] + ([neg] if cfg else []):
                if text_needed not in keys:
                    raise TrainingError(f"sample prompt {text_needed!r} is not in {p.cache.text_dir}: rerun "
                                        f"cache_text (dvc repro) after editing {p.train.sample_prompts}")
            cond = sampling.Conditioning(
                ctx=text.get(keys[sp.prompt])[None].to(device, dtype),
                neg_ctx=text.get(keys[neg])[None].to(device, dtype) if cfg else None,
                cfg_scale=g if cfg else None, guidance=g if variant.use_guidance_embed else None)
            if sp.control_images:
                with torch.no_grad():
                    refs = [ae.encode(x.to(device)) for x in prepare_control_images(
                        [str(base / c) for c in sp.control_images], False, variant.ae.downscale)]
                cond.ref_tokens, cond.ref_ids = sampling.reference_tokens(refs)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=p.train.mixed_precision == "bf16"):
                latents = sample_latents(dit, variant, cond, s.height, s.width, sp.seed if sp.seed is not None else 42,
                                         s.steps, sp.flow_shift, device, progress=False)
            with torch.no_grad():
                (im,) = to_pil(ae.decode(latents.float()))
            path = out_dir / f"{p.train.output_name}_{step:06d}_{i:02d}.png"
            save_png(im, path, {"prompt": sp.prompt, "step": str(step), "height": str(s.height),
                                "width": str(s.width), "infer_steps": str(s.steps), "guidance_scale": f"{g:g}"})
            if run is not None:
                run.log_artifact(path, "samples")
    finally:
        dit.train(was_training)
