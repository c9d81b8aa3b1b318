"""Stage `cache_text`: every prompt that training and evaluation need, encoded by the text encoder once.

The prompts: each distinct manifest caption, the empty prompt (caption dropout and the CFG negative), the
evaluation prompts (params eval.prompts) and the prompts and negative prompts of the sample prompt file
(train.sample_prompts). With them cached, training and evaluation never load the text encoder.
Each context (max_text_tokens, context_in_dim) is stored under `text_key`: a hash of the text and of everything
that decides its embedding (encoder kind and weights fingerprint, layers, token count, template version,
dtypes), so changing one caption encodes that caption only.

Besides shards and index the folder holds `prompts.parquet` (text, key, roles): the lookup from prompt text to
key. See docs/caching.md.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from flux2.cache_latents import DTYPES, finish_report, make_report, process_device, resolve_manifest
from flux2.cache_store import Dist, Job, build_cache, content_key, read_mapping, resolve_store, write_mapping
from flux2.loading import resolve_dtype
from flux2.variants import Variant, get_variant

PROMPTS_FILE = "prompts.parquet"
PROMPTS_SCHEMA = pa.schema([
    ("text", pa.string()),
    ("key", pa.string()),
    ("roles", pa.list_(pa.string())),  # caption | empty | eval | sample | sample_negative
])


@dataclass
class TextConfig:
    """What cache_text needs; `flux2 cache-text` and the DVC stage fill it from options / params.yaml."""

    manifest: Path | None
    cache_dir: Path
    text_encoder: Path
    model_version: str = "tiny"
    tokenizer: Path | None = None
    eval_prompts: list[str] = field(default_factory=list)
    sample_prompts: Path | None = None
    dtype: str = "auto"  # the encoder's compute dtype: auto = bfloat16 (flux2.loading.resolve_dtype)
    text_dtype: str = "bfloat16"  # stored
    fp8_text_encoder: bool = False
    text_encoder_quantize: str = "none"  # none | fp8 | nf4 | int8
    batch_size: int = 8
    shard_mb: int = 256
    device: str = "auto"
    report: Path | None = None
    progress: bool = True
    store: Path | None = None  # the shared store (cache_store.resolve_store)


def text_identity(text_encoder: str | Path, variant: Variant, tokenizer: str | Path | None, dtype: torch.dtype,
                  fp8: bool, quantize: str = "none") -> dict[str, str]:
    """What `load_text_encoder(...).identity()` will return, computed from the files without loading the model,
    so a rerun with nothing new never loads the text encoder."""
    from flux2.text_encoder import encoder_identity, text_encoder_quantize_mode

    return encoder_identity(variant.text_encoder, text_fingerprint(text_encoder, tokenizer), variant, dtype,
                            text_encoder_quantize_mode(fp8, quantize))


def text_fingerprint(text_encoder: str | Path, tokenizer: str | Path | None = None) -> str:
    """The fingerprint of the text-encoder weight files and tokenizer files (text_encoder.files_fingerprint), as
    a text cache records it (`text_fingerprint`): training and evaluation compare theirs with the cache's."""
    from flux2.text_encoder import files_fingerprint, find_tokenizer_dir, resolve_weight_files, tokenizer_files

    files = resolve_weight_files(text_encoder)
    return files_fingerprint(files, tokenizer_files(find_tokenizer_dir(files[0].parent, tokenizer)))


def text_key(text: str, identity: dict[str, str], stored_dtype: str = "bfloat16") -> str:
    """The key of one prompt's context for the encoder `identity` (TextEncoder.identity() / text_identity)."""
    return content_key({"kind": "text", "text": text, "encoder": identity, "stored_dtype": stored_dtype})


def text_meta(variant: Variant, identity: dict[str, str], stored_dtype: str) -> dict[str, str]:
    """The fingerprints every shard and the index carry."""
    return {"kind": "text", "variant": variant.name, "arch": variant.arch, "text_encoder": identity["text_encoder"],
            "text_fingerprint": identity["fingerprint"], "text_layers": identity["text_layers"],
            "context_dim": str(variant.context_in_dim), "max_text_tokens": identity["max_text_tokens"],
            "template_version": identity["template_version"], "encoder_dtype": identity["dtype"],
            "fp8": identity["fp8"], "dtype": stored_dtype,
            **({"quantize": identity["quantize"]} if "quantize" in identity else {})}


def collect_prompts(captions: list[str], eval_prompts: list[str] = (), sample_prompts: str | Path | None = None
                    ) -> dict[str, list[str]]:
    """Every text to encode -> its roles, in first-seen order; the empty prompt is always included."""
    from flux2.prompts import read_prompt_file

    roles: dict[str, list[str]] = {}

    def add(text: str, role: str) -> None:
        have = roles.setdefault(text, [])
        if role not in have:
            have.append(role)

    add("", "empty")
    for caption in captions:
        add(caption, "caption")
    for prompt in eval_prompts:
        add(prompt, "eval")
    if sample_prompts is not None:
        for p in read_prompt_file(sample_prompts):
            add(p.prompt, "sample")
            if p.negative_prompt is not None:
                add(p.negative_prompt, "sample_negative")
    return roles


def cache_text(cfg: TextConfig, dist: Dist | None = None) -> dict[str, Any]:
    """Bring cfg.cache_dir up to date with the prompts; returns (and writes to cfg.report) the report."""
    from flux2.text_encoder import load_text_encoder

    dist = dist or Dist()
    variant = get_variant(cfg.model_version)
    if cfg.text_dtype not in DTYPES:
        raise ValueError(f"text_dtype {cfg.text_dtype!r}: use float32 or bfloat16")
    device = process_device(cfg.device, dist)
    dtype = resolve_dtype(cfg.dtype, device, variant)
    identity = text_identity(cfg.text_encoder, variant, cfg.tokenizer, dtype, cfg.fp8_text_encoder,
                             cfg.text_encoder_quantize)
    captions = []
    if cfg.manifest is not None:
        from flux2.ingest import read_manifest

        captions = [row["caption"] for row in read_manifest(cfg.manifest)]
    prompts = collect_prompts(captions, cfg.eval_prompts, cfg.sample_prompts)
    keys = {text: text_key(text, identity, cfg.text_dtype) for text in prompts}
    jobs = [Job(key, text, label=text) for text, key in keys.items()]
    meta = text_meta(variant, identity, cfg.text_dtype)
    stored = DTYPES[cfg.text_dtype]
    encoder = None

    def prepare() -> None:
        nonlocal encoder
        encoder = load_text_encoder(cfg.text_encoder, variant, tokenizer=cfg.tokenizer, device=device, dtype=dtype,
                                    fp8=cfg.fp8_text_encoder, quantize=cfg.text_encoder_quantize)
        if encoder.identity() != identity:
            raise RuntimeError(f"the loaded text encoder's identity {encoder.identity()} differs from the one "
                               f"computed from its files {identity}; keys would be wrong (a bug)")

    def encode(texts: list[str]) -> torch.Tensor:
        return encoder.encode(texts).to(stored)

    stats = build_cache(cfg.cache_dir, jobs, meta, lambda batch: [job.payload for job in batch], encode,
                        cfg.batch_size, cfg.shard_mb, dist, num_workers=1, progress=cfg.progress,
                        desc="cache_text", prepare=prepare, store=cfg.store)
    if dist.rank == 0:
        rows = [{"text": text, "key": keys[text], "roles": roles} for text, roles in prompts.items()]
        write_mapping(Path(cfg.cache_dir) / PROMPTS_FILE, sorted(rows, key=lambda r: r["text"]), PROMPTS_SCHEMA,
                      meta)
    report = make_report("cache_text", stats, dist, prompts=len(prompts), captions=len(set(captions)))
    if dist.rank == 0:
        finish_report(report, cfg.report)
    dist.barrier()
    return report


def read_prompt_map(cache_dir: str | Path) -> dict[str, str]:
    """Prompt text -> key, from the text cache's prompts.parquet."""
    return {r["text"]: r["key"] for r in read_mapping(Path(cache_dir) / PROMPTS_FILE, "cache_text")}


# ----------------------------------------------------------------------------------------------------------
# Options (flux2 cache-text, stages/cache_text.py)


def config_from_args(args: argparse.Namespace) -> TextConfig:
    """TextConfig from `flux2 cache-text` options, over params.yaml when --params is given."""
    from flux2.params import CacheParams, DatasetParams, EvalParams, ModelParams, TrainParams

    model, cache, dataset, evals, train, base = (ModelParams(), CacheParams(), DatasetParams(), EvalParams(),
                                                 TrainParams(), Path("."))
    if args.params:
        from flux2.params import load_params

        params = load_params(args.params, check_paths=False)
        model, cache, dataset, evals, train = params.model, params.cache, params.dataset, params.eval, params.train
        base = Path(args.params).parent
    elif args.text_encoder is None or args.model_version is None:
        raise ValueError("cache-text needs --params params.yaml, or --text_encoder and --model_version (with "
                         "--manifest or --dataset_config)")
    manifest = resolve_manifest(args, base, dataset, evals, "cache-text")
    sample = args.sample_prompts or (str(base / train.sample_prompts) if train.sample_prompts else None)
    tokenizer = args.tokenizer or (str(base / model.tokenizer) if model.tokenizer else None)
    return TextConfig(
        manifest=manifest, cache_dir=Path(args.cache_dir) if args.cache_dir else base / cache.text_dir,
        text_encoder=Path(args.text_encoder) if args.text_encoder else base / model.text_encoder,
        model_version=args.model_version or model.model_version,
        tokenizer=Path(tokenizer) if tokenizer else None,
        eval_prompts=args.prompt if args.prompt is not None else list(evals.prompts),
        sample_prompts=Path(sample) if sample else None,
        dtype=args.dtype or model.dtype, text_dtype=args.text_dtype or cache.text_dtype,
        fp8_text_encoder=args.fp8_text_encoder if args.fp8_text_encoder is not None else model.fp8_text_encoder,
        text_encoder_quantize=args.text_encoder_quantize or model.text_encoder_quantize,
        batch_size=args.batch_size or cache.batch_size, shard_mb=args.shard_mb or cache.shard_mb,
        device=args.device or model.device, store=resolve_store(args.store if args.store is not None else cache.store),
        report=Path(args.report) if args.report else base / "reports" / "cache_text.json")
