"""Stage `cache_latents`: every manifest item (and each of its control images) encoded by the autoencoder once.

An image is resized to cover its item's bucket and centre-cropped (`images.resize_cover_crop`); a control image
is brought the same way to the size ingest chose for it (its item's bucket, or by the source's no_resize_control
/ control_resolution its own size or bucket). The latent (128, H/16, W/16) is stored under `latent_key`: a hash
of the image bytes (sha256), the size, the crop rule, the autoencoder's fingerprint and the dtype, so the same
image at the same size is stored once, whatever item or role it has (an image at two resolutions: twice).
A loss mask is resized and cropped like its image, then averaged over each 16x16 patch: (1, H/16, W/16) weights
in [0, 1] under `mask_key`.

Besides the shards and the index (flux2.cache_store), the folder holds `items.parquet`: one row per manifest
item (id, split, bucket, latent_key, control_keys, mask_key), which training and evaluation read instead of
recomputing keys. See docs/caching.md.
"""
from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from flux2.cache_store import (BuildStats, CacheError, Dist, Job, build_cache, content_key, peak_rss_mb,
                               read_mapping, resolve_store, write_mapping)
from flux2.loading import resolve_device
from flux2.variants import Variant, get_variant

if TYPE_CHECKING:
    from flux2.params import DatasetParams, EvalParams

ITEMS_FILE = "items.parquet"
# The resize rule (scale to cover, LANCZOS up / BOX down, centre crop): bump it if resize_cover_crop changes.
CROP_RULE = "cover-centre-v1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

ITEMS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("split", pa.string()),
    ("bucket_width", pa.int32()),
    ("bucket_height", pa.int32()),
    ("latent_key", pa.string()),
    ("control_keys", pa.list_(pa.string())),
    ("mask_key", pa.string()),  # null: no mask
])


@dataclass
class LatentsConfig:
    """What cache_latents needs; `flux2 cache-latents` and the DVC stage fill it from options / params.yaml."""

    manifest: Path
    cache_dir: Path
    vae: Path
    model_version: str = "tiny"
    base: Path = Path(".")  # relative image paths in the manifest are relative to this (params.yaml's folder)
    vae_dtype: str = "float32"
    batch_size: int = 8
    shard_mb: int = 256
    num_workers: int = 2
    device: str = "auto"
    report: Path | None = None
    progress: bool = True
    store: Path | None = None  # the shared store (cache_store.resolve_store)


@dataclass
class ItemLatents:
    """Where one manifest item's latents are: its own and its controls' (in control order)."""

    latent_key: str
    control_keys: list[str]
    bucket: tuple[int, int]  # (width, height)
    split: str
    mask_key: str | None = None


def ae_fingerprint(vae: str | Path) -> str:
    """Names the autoencoder weights: header + size + sampled bytes of the file (see files_fingerprint)."""
    from flux2.text_encoder import files_fingerprint

    path = Path(vae)
    if not path.is_file():
        raise FileNotFoundError(f"autoencoder not found: {path} (pass --vae ae.safetensors)")
    return files_fingerprint([path])


def latent_key(image_sha256: str, width: int, height: int, ae_fingerprint: str, dtype: str = "float32") -> str:
    """The key of an image's latent at bucket width x height."""
    return content_key({"kind": "latent", "image_sha256": image_sha256, "width": int(width), "height": int(height),
                        "crop": CROP_RULE, "ae": ae_fingerprint, "dtype": dtype})


def mask_key(mask_sha256: str, alpha: bool, width: int, height: int, dtype: str = "float32") -> str:
    """The key of a loss mask (a mask file, or the alpha channel of an image) at bucket width x height."""
    return content_key({"kind": "mask", "mask_sha256": mask_sha256, "alpha": bool(alpha), "width": int(width),
                        "height": int(height), "crop": CROP_RULE, "dtype": dtype})


def latents_meta(variant: Variant, ae_fp: str, dtype: str) -> dict[str, str]:
    """The fingerprints every shard and the index carry."""
    return {"kind": "latents", "variant": variant.name, "arch": variant.arch, "ae_fingerprint": ae_fp,
            "latent_channels": str(variant.ae.latent_channels), "downscale": str(variant.ae.downscale),
            "dtype": dtype, "crop": CROP_RULE}


def plan_latents(rows: list[dict[str, Any]], base: Path, ae_fp: str, dtype: str
                 ) -> tuple[list[Job], list[dict[str, Any]]]:
    """(jobs, item map rows): one job per distinct (image, size), controls and masks included. A job's payload is
    (path, sha256, size, kind): kind "image", or "mask" / "alpha" (a mask file / an image's alpha channel)."""
    jobs: list[Job] = []
    items = []
    for row in rows:
        size = (int(row["bucket_width"]), int(row["bucket_height"]))
        key = latent_key(row["sha256"], *size, ae_fp, dtype)
        jobs.append(Job(key, (base / row["image_path"], row["sha256"], size, "image"), group=size, label=row["id"]))
        control_keys = []
        for i, c in enumerate(row.get("controls") or []):
            csize = (int(c.get("bucket_width") or size[0]), int(c.get("bucket_height") or size[1]))
            ckey = latent_key(c["sha256"], *csize, ae_fp, dtype)
            jobs.append(Job(ckey, (base / c["path"], c["sha256"], csize, "image"), group=csize,
                            label=f"{row['id']}/control{i}"))
            control_keys.append(ckey)
        mkey = None
        if row.get("mask"):
            m = row["mask"]
            mkey = mask_key(m["sha256"], m["alpha"], *size, dtype)
            kind = "alpha" if m["alpha"] else "mask"
            jobs.append(Job(mkey, (base / m["path"], m["sha256"], size, kind), group=("mask", size),
                            label=f"{row['id']}/mask"))
        items.append({"id": row["id"], "split": row["split"], "bucket_width": size[0], "bucket_height": size[1],
                      "latent_key": key, "control_keys": control_keys, "mask_key": mkey})
    return jobs, items


def load_image(path: Path, sha256: str, size: tuple[int, int], kind: str = "image") -> torch.Tensor:
    """(3, H, W) in [-1, 1] at the bucket size, or for a mask (kind "mask" / "alpha") (1, H, W) in [0, 1];
    CacheError if the file changed since ingest."""
    from flux2.images import open_mask, open_rgb, resize_cover_crop, to_tensor

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CacheError(f"{path}: image listed in the manifest is gone; rerun ingest (dvc repro)") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CacheError(f"{path} changed since ingest (its sha256 differs from the manifest's); rerun ingest "
                         f"(dvc repro) before caching")
    if kind == "image":
        return to_tensor(resize_cover_crop(open_rgb(path), *size))
    mask = resize_cover_crop(open_mask(path, alpha=kind == "alpha"), *size)
    return torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).reshape(1, size[1], size[0]) / 255.0


def process_device(device: str, dist: Dist) -> torch.device:
    """`device`, where "auto" is the device accelerate gave this process (else the usual choice)."""
    return dist.device if device == "auto" and dist.device is not None else resolve_device(device)


def cache_latents(cfg: LatentsConfig, dist: Dist | None = None) -> dict[str, Any]:
    """Bring cfg.cache_dir up to date with the manifest; returns (and writes to cfg.report) the report."""
    from flux2.ingest import read_manifest
    from flux2.loading import check_ae, load_ae

    dist = dist or Dist()
    variant = get_variant(cfg.model_version)
    if cfg.vae_dtype not in DTYPES:
        raise ValueError(f"vae_dtype {cfg.vae_dtype!r}: use float32 or bfloat16")
    check_ae(cfg.vae, variant)  # header only: a wrong file fails before any work
    ae_fp = ae_fingerprint(cfg.vae)
    rows = read_manifest(cfg.manifest)
    jobs, items = plan_latents(rows, Path(cfg.base), ae_fp, cfg.vae_dtype)
    meta = latents_meta(variant, ae_fp, cfg.vae_dtype)
    device = process_device(cfg.device, dist)
    dtype = DTYPES[cfg.vae_dtype]
    ae = None

    def load(batch: list[Job]) -> tuple[bool, torch.Tensor]:
        return batch[0].payload[3] != "image", torch.stack([load_image(*job.payload) for job in batch])

    def prepare() -> None:
        nonlocal ae
        ae = load_ae(cfg.vae, variant, device=device, dtype=dtype)

    def encode(inputs: tuple[bool, torch.Tensor]) -> torch.Tensor:
        is_mask, pixels = inputs
        if is_mask:  # the share of each latent token's 16x16 patch that is learned
            return torch.nn.functional.avg_pool2d(pixels, variant.ae.downscale).to(dtype)
        with torch.no_grad():
            latents = ae.encode(pixels.to(device, dtype)).to(dtype)
        bad = ~torch.isfinite(latents).flatten(1).all(1)
        if bad.any():
            fix = "use --vae_dtype float32" if dtype != torch.float32 else f"check {cfg.vae} (damaged weights?)"
            raise CacheError(f"the autoencoder produced NaN/inf latents for {int(bad.sum())} image(s) in "
                             f"{cfg.vae_dtype}; {fix}")
        return latents

    stats = build_cache(cfg.cache_dir, jobs, meta, load, encode, cfg.batch_size, cfg.shard_mb, dist,
                        num_workers=cfg.num_workers, progress=cfg.progress, desc="cache_latents", prepare=prepare,
                        store=cfg.store)
    if dist.rank == 0:
        write_mapping(Path(cfg.cache_dir) / ITEMS_FILE, sorted(items, key=lambda r: r["id"]), ITEMS_SCHEMA, meta)
    report = make_report("cache_latents", stats, dist, items=len(items))
    if dist.rank == 0:
        finish_report(report, cfg.report)
    dist.barrier()
    return report


def make_report(stage: str, stats: BuildStats, dist: Dist, **extra: Any) -> dict[str, Any]:
    """The stage's JSON report: counts, what was encoded (labels, first 1000), timings, memory."""
    labels = stats.encoded_labels
    busy = stats.seconds_encode
    return {
        "stage": stage, **extra, "entries": stats.wanted, "encoded": stats.encoded, "reused": stats.reused,
        "dropped": stats.dropped, "damaged": stats.damaged, "recovered": stats.recovered,
        "from_store": stats.from_store, "problems": stats.problems,
        "encoded_labels": sorted(labels)[:1000], "encoded_labels_truncated": len(labels) > 1000,
        "shards": stats.shards, "shards_deleted": stats.shards_deleted, "shards_compacted": stats.shards_compacted,
        "megabytes": round(stats.bytes / 1e6, 3), "processes": dist.world,
        "seconds": round(stats.seconds, 3), "seconds_verify": round(stats.seconds_verify, 3),
        "seconds_model_load": round(stats.seconds_model_load, 3),
        "seconds_encoder_forward": round(busy, 3), "seconds_waiting_for_inputs": round(stats.seconds_load, 3),
        "items_per_second": round(stats.encoded / stats.seconds, 2) if stats.encoded and stats.seconds else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def finish_report(report: dict[str, Any], path: Path | None) -> None:
    """Print the one-line summary and write the report (atomically) when a path is given."""
    from flux2.atomic import atomic_write_json

    shared = f" ({report['from_store']} from the shared store)" if report.get("from_store") else ""
    print(f"{report['stage']}: encoded {report['encoded']}, reused {report['reused']}{shared}, dropped "
          f"{report['dropped']} ({report['entries']} entries, {report['shards']} shards, {report['megabytes']} MB, "
          f"{report['seconds']} s)")
    if path is not None:
        atomic_write_json(path, report)


def read_item_map(cache_dir: str | Path) -> dict[str, ItemLatents]:
    """Manifest item id -> ItemLatents, from the latents cache's items.parquet."""
    rows = read_mapping(Path(cache_dir) / ITEMS_FILE, "cache_latents")
    return {r["id"]: ItemLatents(r["latent_key"], list(r["control_keys"]), (r["bucket_width"], r["bucket_height"]),
                                 r["split"], r.get("mask_key")) for r in rows}


# ----------------------------------------------------------------------------------------------------------
# Options (flux2 cache-latents, stages/cache_latents.py)


def config_from_args(args: argparse.Namespace) -> LatentsConfig:
    """LatentsConfig from `flux2 cache-latents` options, over params.yaml when --params is given."""
    from flux2.params import CacheParams, DatasetParams, EvalParams, ModelParams

    model, cache, dataset, evals, base = ModelParams(), CacheParams(), DatasetParams(), EvalParams(), Path(".")
    if args.params:
        from flux2.params import load_params

        params = load_params(args.params, check_paths=False)
        model, cache, dataset, evals = params.model, params.cache, params.dataset, params.eval
        base = Path(args.params).parent
    elif args.vae is None or args.model_version is None:
        raise ValueError("cache-latents needs --params params.yaml, or --vae and --model_version (with --manifest "
                         "or --dataset_config)")
    manifest = resolve_manifest(args, base, dataset, evals, "cache-latents")
    return LatentsConfig(
        manifest=manifest, base=base,
        cache_dir=Path(args.cache_dir) if args.cache_dir else base / cache.latents_dir,
        vae=Path(args.vae) if args.vae else base / model.vae,
        model_version=args.model_version or model.model_version,
        vae_dtype=args.vae_dtype or model.vae_dtype, batch_size=args.batch_size or cache.batch_size,
        shard_mb=args.shard_mb or cache.shard_mb, num_workers=args.num_workers,
        device=args.device or model.device, store=resolve_store(args.store if args.store is not None else cache.store),
        report=Path(args.report) if args.report else base / "reports" / "cache_latents.json")


def resolve_manifest(args: argparse.Namespace, base: Path, dataset: DatasetParams, evals: EvalParams,
                     command: str) -> Path:
    """The manifest a cache command reads: --manifest, else params.yaml's; with --dataset_config (a musubi TOML:
    the dataset, in place of params.yaml's sources), ingested into it first. Shared by cache-latents and
    cache-text."""
    import dataclasses

    manifest = Path(args.manifest) if args.manifest else base / dataset.manifest
    if args.dataset_config:
        run_ingest(dataclasses.replace(dataset, sources=[], toml=str(Path(args.dataset_config).absolute()),
                                       manifest=str(manifest.absolute())), evals, base)
    elif not args.params and not args.manifest:
        raise ValueError(f"{command} needs --manifest (from flux2 ingest) or --dataset_config TOML")
    return manifest


def run_ingest(dataset: DatasetParams, evals: EvalParams, base: Path) -> None:
    """Ingest `dataset` (a musubi TOML given on the command line) into its manifest, on the main process only;
    image paths relative to `base` (params.yaml's folder, else the current one)."""
    from flux2.ingest import ingest

    dist = Dist()
    if dist.rank == 0:
        ingest(dataset, evals.holdout_fraction, base=base, holdout_min_items=evals.holdout_min_items)
    dist.barrier()
