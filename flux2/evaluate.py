"""The evaluate stage: what the trained LoRA changed, as numbers and pictures, for DVC and MLflow.

- Validation loss: the unweighted flow-matching loss (flux2.train.velocity_loss, the training objective) of every
  hold-out item at the fixed timesteps `eval.timesteps`, with noise drawn from (eval.noise_seed, item id,
  timestep index), for the base DiT and with the LoRA: a per-timestep table and the mean. The same inputs give
  the same numbers on every run. The training items get the same treatment: a LoRA that learned anything must
  lower the loss there. A dataset too small for a hold-out (eval.holdout_min_items) has its validation loss
  measured on the training items, and metrics/eval.json says so (`val_loss_split: train`, `val_loss_note`).
- Sample grid: eval.prompts x eval.seeds, base beside LoRA, with the prompts written on it; hold-out items with
  reference images (edit LoRAs) as extra rows, their caption and control image beside the outputs. Text
  embeddings come from the text cache: no text encoder is loaded.
- CLIP score (when eval.clip_model names a Hugging Face CLIP folder): 100 * max(cos(image, prompt), 0) averaged
  over the grid's prompt images, for base and LoRA.

The LoRA evaluated is `<train.output_name>.safetensors`, or its EMA `<train.output_name>_ema.safetensors` when the
training kept one (train.ema_decay; metrics/train.json names it); `lora_weights` (raw | ema) in metrics/eval.json. Sample size, steps and guidance default
to the variant's (Variant.sample_settings), as in training samples and `flux2 generate`.

Outputs: metrics/eval.json (for `dvc metrics diff` / `dvc exp show`), plots/val_loss.csv, plots/loss.png,
plots/val_loss.png and {eval.output_dir}/grid.png, all logged to the training's MLflow run (its id is in
metrics/train.json).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from flux2 import plots, sampling
from flux2.atomic import atomic_write_json, atomic_write_text, sha256_file
from flux2.cache_store import CacheError, CacheReader, check_cache_compatible
from flux2.ema import ema_path
from flux2.params import Params, to_flat_dict
from flux2.train_data import mix_seed, model_fingerprints
from flux2.variants import Variant, get_variant

MAX_EDIT_ROWS = 4  # hold-out items with reference images shown in the grid
MAX_LOSS_ITEMS = 256  # items per split whose loss is measured (the first by id), so big datasets stay quick


class EvaluationError(ValueError):
    """The evaluation cannot run; the message says what is missing and which stage to run."""


@dataclass(frozen=True)
class EvalItem:
    """A manifest item with its cache keys."""

    id: str
    caption: str
    latent_key: str
    control_keys: tuple[str, ...]
    caption_key: str
    image_path: str = ""  # as in the manifest: relative to the project folder, or absolute
    control_paths: tuple[str, ...] = ()


@dataclass
class GridCase:
    """One row of the sample grid: a prompt (or a hold-out edit item, with its files) and its size."""

    label: str
    text_key: str
    height: int
    width: int
    control_keys: tuple[str, ...] = ()
    control_path: str | None = None
    target_path: str | None = None


# ---------------------------------------------------------------------------------------------- inputs

def read_items(manifest: Path, latents_dir: Path, prompt_map: dict[str, str], split: str) -> list[EvalItem]:
    """The manifest items of `split` ('holdout' or 'train'), sorted by id, with their cache keys."""
    from flux2.cache_latents import read_item_map
    from flux2.ingest import read_manifest

    item_map = read_item_map(latents_dir)
    items = []
    for row in sorted(read_manifest(manifest), key=lambda r: r["id"]):
        if row["split"] != split:
            continue
        lat, key = item_map.get(row["id"]), prompt_map.get(row["caption"])
        if lat is None or key is None:
            missing = "cache_latents" if lat is None else "cache_text"
            raise CacheError(f"manifest item {row['id']} ({row['image_path']}) is not in the caches: rerun "
                             f"{missing} (dvc repro)")
        items.append(EvalItem(row["id"], row["caption"], lat.latent_key, tuple(lat.control_keys), key,
                              row["image_path"], tuple(c["path"] for c in row["controls"] or [])))
    return items


def read_train_summary(path: Path) -> dict:
    """metrics/train.json as the train stage wrote it (the MLflow run id, the step count)."""
    if not path.is_file():
        raise EvaluationError(f"{path} not found: run the train stage first (dvc repro train / flux2 train)")
    return json.loads(path.read_text())


def grid_cases(prompts: list[str], image_size: list[int], prompt_map: dict[str, str], holdout: list[EvalItem],
               latents: CacheReader, downscale: int) -> list[GridCase]:
    """The grid's rows: every evaluation prompt, then up to MAX_EDIT_ROWS hold-out items with references."""
    cases = []
    for prompt in prompts:
        if prompt not in prompt_map:
            raise CacheError(f"eval.prompts: {prompt!r} is not in the text cache: rerun cache_text (dvc repro) "
                             "after editing eval.prompts")
        cases.append(GridCase(prompt, prompt_map[prompt], image_size[0], image_size[1]))
    for item in [i for i in holdout if i.control_keys][:MAX_EDIT_ROWS]:
        _, h, w = latents.shape(item.latent_key)
        cases.append(GridCase(f"hold-out {item.id[:8]} (edit): {item.caption}", item.caption_key, h * downscale,
                              w * downscale, item.control_keys, item.control_paths[0], item.image_path))
    return cases


# ---------------------------------------------------------------------------------------------- loss

def item_noise(shape: tuple[int, ...], noise_seed: int, item_id: str, k: int) -> Tensor:
    """The fixed noise of item `item_id` at timestep index k: a function of the seed and the id only, so adding
    items to the dataset does not change the others' numbers."""
    g = torch.Generator().manual_seed(mix_seed(noise_seed, zlib.crc32(item_id.encode()), k))
    return torch.randn(shape, generator=g)


@torch.no_grad()
def loss_table(dit: torch.nn.Module, items: list[EvalItem], latents: CacheReader, text: CacheReader,
               variant: Variant, timesteps: list[float], noise_seed: int, guidance: float, device: torch.device,
               desc: str = "validation loss", progress: bool = True) -> list[list[float]]:
    """The flow-matching loss of each item (rows) at each timestep (columns), one forward pass each."""
    from flux2.train import velocity_loss

    table = []
    for item in tqdm(items, desc=desc, unit="item", disable=not progress, leave=False):
        x0 = latents.get(item.latent_key).float()[None].to(device)
        ctx = text.get(item.caption_key)[None].to(device)
        controls = [latents.get(k).float()[None].to(device) for k in item.control_keys]
        row = []
        for k, t in enumerate(timesteps):
            noise = item_noise(tuple(x0.shape), noise_seed, item.id, k).to(device)
            t_vec = torch.tensor([t], dtype=torch.float32, device=device)
            row.append(velocity_loss(dit, x0, noise, t_vec, ctx, controls, variant, guidance).item())
        table.append(row)
    return table


def column_means(table: list[list[float]], n: int) -> list[float | None]:
    """Mean over items per timestep (None for an empty table)."""
    return [math.fsum(row[k] for row in table) / len(table) if table else None for k in range(n)]


def mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return math.fsum(kept) / len(kept) if kept else None


# ---------------------------------------------------------------------------------------------- samples

@torch.no_grad()
def sample_cases(dit: torch.nn.Module, cases: list[GridCase], seeds: list[int], text: CacheReader,
                 latents: CacheReader, empty_key: str, variant: Variant, guidance: float, steps: int,
                 device: torch.device, dtype: torch.dtype) -> list[list[Tensor]]:
    """Latents per case (rows) and seed (columns), on the CPU."""
    from flux2.generate import sample_latents, use_cfg

    cfg = use_cfg(variant, guidance)
    out = []
    for case in cases:
        cond = sampling.Conditioning(
            ctx=text.get(case.text_key)[None].to(device, dtype),
            neg_ctx=text.get(empty_key)[None].to(device, dtype) if cfg else None,
            cfg_scale=guidance if cfg else None, guidance=guidance if variant.use_guidance_embed else None)
        if case.control_keys:
            refs = [latents.get(k).float()[None].to(device) for k in case.control_keys]
            cond.ref_tokens, cond.ref_ids = sampling.reference_tokens(refs)
        out.append([sample_latents(dit, variant, cond, case.height, case.width, seed, steps, None, device,
                                   progress=False).cpu() for seed in seeds])
    return out


@torch.no_grad()
def decode(ae: torch.nn.Module, latent: Tensor, device: torch.device) -> Image.Image:
    from flux2.images import to_pil

    (im,) = to_pil(ae.decode(latent.float().to(device)))
    return im


def clip_scores(model_dir: str | Path, images: list[Image.Image], prompts: list[str], device: torch.device
                ) -> list[float]:
    """CLIP score per (image, prompt) pair: 100 * max(cosine of the CLIP embeddings, 0) (as torchmetrics'
    CLIPScore). `model_dir` is a Hugging Face CLIP folder (CLIPModel weights, tokenizer, image processor)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"eval.clip_model: {model_dir} is not a Hugging Face CLIP folder (no config.json); "
                                "download one (e.g. openai/clip-vit-large-patch14) or unset eval.clip_model")
    # use_safetensors: a folder holding only pytorch_model.bin is refused rather than unpickled.
    model = CLIPModel.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    max_len = model.config.text_config.max_position_embeddings
    text = tokenizer(prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(device)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
    with torch.no_grad():
        out = model(input_ids=text["input_ids"], attention_mask=text.get("attention_mask"), pixel_values=pixels)
    cos = (out.image_embeds * out.text_embeds).sum(dim=-1)
    return (100 * cos.clamp(min=0)).tolist()


# ---------------------------------------------------------------------------------------------- outputs

def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    """{'val_loss': {'base': 1.0}} -> {'val_loss_base': 1.0}; None values and words (lora_weights, notes) left
    out."""
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}_{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, name))
        elif value is not None and not isinstance(value, str):
            out[name] = float(value)
    return out


def build_grid(cases: list[GridCase], seeds: list[int], images: dict[str, list[list[Image.Image]]],
               base: Path, title: str) -> Image.Image:
    """Rows: the cases; columns: (for edit rows) the control and target images, then base and LoRA per seed."""
    from flux2.images import open_rgb

    edits = any(c.control_path for c in cases)
    columns = (["control image", "hold-out target"] if edits else [])
    columns += [f"{which}, seed {s}" for s in seeds for which in ("base", "LoRA")]
    rows = []
    for i, case in enumerate(cases):
        cells = []
        if edits:
            cells = [open_rgb(base / case.control_path) if case.control_path else None,
                     open_rgb(base / case.target_path) if case.target_path else None]
        for j in range(len(seeds)):
            cells += [images["base"][i][j], images["lora"][i][j]]
        rows.append(plots.GridRow(case.label, cells))
    if not rows:
        rows = [plots.GridRow("no eval.prompts and no hold-out edit items: nothing to sample", [None] * len(columns))]
    return plots.image_grid(rows, columns, title=title)


def run_models(p: Params, base: Path, variant: Variant, lora_path: Path, loss_items: dict[str, list[EvalItem]],
               cases: list[GridCase], latents: CacheReader, text: CacheReader, empty_key: str, progress: bool
               ) -> tuple[dict, dict]:
    """The base DiT, then the same DiT with the LoRA attached (as in training, on fp8 weights too): loss tables
    ({model: {split: items x timesteps}}) and sampled latents ({model: cases x seeds}) of each."""
    from flux2.generate import free
    from flux2.loading import load_frozen_dit
    from flux2.lora import apply_loras
    from flux2.loading import resolve_device, resolve_dtype

    e = p.eval
    device = resolve_device(p.model.device)
    dtype = resolve_dtype(p.model.dtype, device, variant)
    settings = variant.sample_settings(steps=e.infer_steps, guidance=e.guidance_scale)
    m = p.model
    dit = load_frozen_dit(base / m.dit, variant, device, dtype, load_device="cpu" if m.blocks_to_swap else None,
                          fp8_scaled=m.fp8_base or m.fp8_scaled, quantize=m.quantize, fp8_matmul=m.fp8_matmul,
                          attention_backend=m.attention_backend)
    if p.model.blocks_to_swap:
        from flux2.block_swap import enable_block_swap

        enable_block_swap(dit, p.model.blocks_to_swap, device)
    tables, sampled = {}, {}
    for which in ("base", "lora"):
        if which == "lora":
            for network in apply_loras(dit, [lora_path], merge=False):
                network.to(device)
        tables[which] = {split: loss_table(dit, items, latents, text, variant, e.timesteps, e.noise_seed,
                                           p.train.guidance, device, f"{which} loss, {split}", progress)
                         for split, items in loss_items.items()}
        sampled[which] = sample_cases(dit, cases, e.seeds, text, latents, empty_key, variant, settings.guidance,
                                      settings.steps, device, dtype)
    free(dit)
    return tables, sampled


def loss_metrics(timesteps: list[float], tables: dict, split: str = "holdout", note: str | None = None
                 ) -> tuple[dict, dict]:
    """metrics/eval.json's loss entries, and the curves {model: {split: mean loss per timestep}}. The validation
    loss is that of `split` ("holdout", or "train" when nothing is held out, with `note` saying so)."""
    curves = {which: {name: column_means(table, len(timesteps)) for name, table in by_split.items()}
              for which, by_split in tables.items()}
    val = {which: mean(curves[which][split]) for which in curves}
    metrics = {
        "val_loss": {"base": val["base"], "lora": val["lora"],
                     "improvement": None if val["base"] is None else val["base"] - val["lora"]},
        "val_loss_split": split,
        "val_loss_note": note,
        "val_loss_by_t": {f"t{t:g}": {which: curves[which][split][k] for which in curves}
                          for k, t in enumerate(timesteps)},
        "train_loss": {which: mean(curves[which]["train"]) for which in curves},
        "items": {split: len(table) for split, table in tables["base"].items()},
    }
    return metrics, curves


def clip_metric(model_dir: Path, cases: list[GridCase], images: dict[str, list[list[Image.Image]]],
                device: torch.device) -> dict[str, float | None]:
    """The mean CLIP score of the prompt rows' images against their prompts, for base and LoRA."""
    pairs = {which: [(im, case.label) for case, row in zip(cases, rows) if not case.control_keys for im in row]
             for which, rows in images.items()}
    flat = pairs["base"] + pairs["lora"]
    scores = clip_scores(model_dir, [im for im, _ in flat], [t for _, t in flat], device) if flat else []
    n = len(pairs["base"])
    return {"base": mean(scores[:n]), "lora": mean(scores[n:])}


def concept_metric(concept_params, cases: list[GridCase], images: dict[str, list[list[Image.Image]]]
                   ) -> dict[str, dict[str, float | None]]:
    """Concept score (mean share of concept pixels) and presence (share of samples showing it) of the prompt rows
    that ask for the concept, for base and LoRA."""
    from flux2.concept import Concept, concept_presence, concept_score

    concept = Concept(tuple(concept_params.colour), concept_params.tolerance, concept_params.min_fraction,
                      concept_params.word)
    out: dict[str, dict[str, float | None]] = {"concept_score": {}, "concept_presence": {}}
    for which, rows in images.items():
        chosen = [im for case, row in zip(cases, rows) if not case.control_keys and concept.asks_for(case.label)
                  for im in row]
        out["concept_score"][which] = concept_score(chosen, concept) if chosen else None
        out["concept_presence"][which] = concept_presence(chosen, concept) if chosen else None
    return out


def write_plots(base: Path, timesteps: list[float], curves: dict, items: dict[str, int], output_name: str,
                split: str = "holdout") -> list[Path]:
    """plots/val_loss.csv and plots/val_loss.png, and plots/loss.png from the training's plots/train_loss.csv.
    The validation columns (base, lora) are those of `split` (training items when nothing is held out)."""
    label = "hold-out" if split == "holdout" else "validation on training items (nothing held out)"
    series = {f"base, {label}": curves["base"][split], f"LoRA, {label}": curves["lora"][split],
              "base, training items": curves["base"]["train"], "LoRA, training items": curves["lora"]["train"]}
    rows = ["t,base,lora,base_train,lora_train"] + [
        ",".join([f"{t:g}"] + ["" if v[k] is None else repr(v[k]) for v in series.values()])
        for k, t in enumerate(timesteps)]
    atomic_write_text(base / "plots" / "val_loss.csv", "\n".join(rows) + "\n")
    paths = [plots.plot_val_loss(timesteps, series, base / "plots" / "val_loss.png",
                                 title=f"flow-matching loss per timestep ({items['holdout']} hold-out, "
                                       f"{items['train']} training items)")]
    loss_csv = base / "plots" / "train_loss.csv"
    if loss_csv.is_file():
        paths.append(plots.plot_train_loss(loss_csv, base / "plots" / "loss.png",
                                           title=f"training loss ({output_name})"))
    return paths


def log_to_mlflow(p: Params, summary: dict, metrics: dict, eval_files: list[Path], plot_files: list[Path],
                  lora_path: Path, base: Path) -> str | None:
    """Metrics (flattened, `eval_*`) and files into the training's MLflow run (tracking.evaluation_run: or a
    run of its own when the training run was already evaluated otherwise); returns the run's id. Under DVC the
    dvc.lock too: by now it holds the train stage's entry of this run."""
    import os

    from flux2.tracking import evaluation_run, tracking_uri

    run_id = summary.get("mlflow_run_id")
    if not run_id:
        print("warning: metrics/train.json names no MLflow run; nothing logged")
        return None
    digest = sha256_file(lora_path) + json.dumps([asdict(p.model), asdict(p.eval)], sort_keys=True, default=str)
    run = evaluation_run(tracking_uri(p.tracking.tracking_uri), p.tracking.experiment, run_id,
                         hashlib.sha256(digest.encode()).hexdigest()[:16], to_flat_dict(p))
    run.log_metrics(flatten(metrics, "eval"), int(summary.get("steps", 0)))
    run.flush()
    run.set_tags({"flux2.eval_lora_weights": metrics["lora_weights"]})
    for folder, paths in (("eval", eval_files), ("plots", plot_files)):
        for path in paths:
            run.log_artifact(path, folder)
    if os.environ.get("DVC_STAGE") and (base / "dvc.lock").is_file():
        run.log_artifact(base / "dvc.lock")
    if run.run_id != run_id:
        run.end()  # an evaluation run of its own is complete now; the training run keeps its status
    return run.run_id


def evaluate(p: Params, base: Path = Path("."), progress: bool = True) -> dict:
    """Run the evaluation as params.yaml says (paths relative to `base`); returns the metrics written to
    metrics/eval.json."""
    from flux2.cache_text import read_prompt_map
    from flux2.generate import free
    from flux2.loading import load_ae
    from flux2.loading import resolve_device

    t0 = time.perf_counter()
    e = p.eval
    variant = get_variant(p.model.model_version)
    summary = read_train_summary(base / "metrics" / "train.json")
    lora_path = base / p.train.output_dir / f"{p.train.output_name}.safetensors"
    # A training that kept an EMA (train.ema_decay) says so in metrics/train.json; its averaged weights are scored.
    weights = "ema" if summary.get("lora_ema") else "raw"
    if weights == "ema":
        lora_path = ema_path(lora_path)
    if not lora_path.is_file():
        raise EvaluationError(f"{lora_path} not found: run the train stage first (dvc repro train / flux2 train)")

    # Everything is read and checked before the DiT loads.
    latents_dir, text_dir = base / p.cache.latents_dir, base / p.cache.text_dir
    latents, text = CacheReader(latents_dir), CacheReader(text_dir)
    ae_fp, text_fp = model_fingerprints(p.model, base)
    check_cache_compatible(latents, variant, "latents", fingerprint=ae_fp)
    check_cache_compatible(text, variant, "text", fingerprint=text_fp)
    prompt_map = read_prompt_map(text_dir)
    if "" not in prompt_map:
        raise CacheError(f"{text_dir} has no empty-prompt embedding: rerun cache_text")
    manifest = base / p.dataset.manifest
    holdout = read_items(manifest, latents_dir, prompt_map, "holdout")
    train_items = read_items(manifest, latents_dir, prompt_map, "train")
    split, note = "holdout", None
    if not holdout:
        split = "train"
        note = (f"nothing is held out (eval.holdout_fraction {e.holdout_fraction:g}, or fewer images than "
                f"eval.holdout_min_items {e.holdout_min_items}): the validation loss is measured on the training "
                f"items at the fixed timesteps")
        print(f"note: {note}")
    settings = variant.sample_settings(*(e.image_size or (None, None)), e.infer_steps, e.guidance_scale)
    cases = grid_cases(e.prompts, [settings.height, settings.width], prompt_map, holdout, latents,
                       variant.ae.downscale)
    loss_items = {"holdout": holdout[:MAX_LOSS_ITEMS], "train": train_items[:MAX_LOSS_ITEMS]}

    tables, sampled = run_models(p, base, variant, lora_path, loss_items, cases, latents, text, prompt_map[""],
                                 progress)
    device = resolve_device(p.model.device)
    ae = load_ae(base / p.model.vae, variant, device=device, dtype=torch.float32)
    images = {which: [[decode(ae, x, device) for x in row] for row in rows] for which, rows in sampled.items()}
    free(ae)
    del ae

    metrics, curves = loss_metrics(e.timesteps, tables, split, note)
    metrics["lora_weights"] = weights
    if e.clip_model:
        metrics["clip_score"] = clip_metric(base / e.clip_model, cases, images, device)
    if e.concept:
        metrics.update(concept_metric(e.concept, cases, images))
    title = (f"{lora_path.name} after {summary.get('steps', '?')} steps: base vs LoRA ({variant.name}, "
             f"{settings.steps} sampling steps, guidance {settings.guidance:g})")
    grid_path = plots.save_image(build_grid(cases, e.seeds, images, base, title), base / e.output_dir / "grid.png")
    metrics_path = base / "metrics" / "eval.json"
    atomic_write_json(metrics_path, metrics)
    plot_paths = write_plots(base, e.timesteps, curves, metrics["items"], p.train.output_name, split)
    run_id = log_to_mlflow(p, summary, metrics, [metrics_path, grid_path], plot_paths, lora_path, base)

    def change(pair: dict) -> str:
        return "n/a" if pair["base"] is None else f"{pair['base']:.4f} -> {pair['lora']:.4f}"

    print(f"evaluated {lora_path} in {time.perf_counter() - t0:.1f} s: loss base -> LoRA on "
          f"{'hold-out' if split == 'holdout' else 'no hold-out'} items "
          f"{change(metrics['val_loss'])}, on training items {change(metrics['train_loss'])}; wrote {metrics_path}, "
          f"{grid_path}" + (f"; MLflow run {run_id}" if run_id else ""))
    return metrics
