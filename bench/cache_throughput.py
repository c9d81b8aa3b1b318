"""Benchmark: cache_latents and cache_text throughput on the tiny model with generated images.

For each dataset size, a fresh process caches the latents (then the text) of N generated images from scratch,
then reruns with nothing to do. Reported per stage: items/s, the share of the stage's wall time (model load
excluded, shown on its own) spent outside the encoder forward (image decoding and resizing, hashing, checksums,
shard and index writes), the no-op rerun time and the process's peak RSS. Peak RSS should not grow with N:
per item only its index row is held, plus the pending tensors of one shard (at most cache.shard_mb).

    python bench/cache_throughput.py                       # 100 and 1000 items
    python bench/cache_throughput.py --sizes 100 --json bench/results/cache_throughput.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE_SIZES = [(320, 240), (240, 320), (256, 256), (384, 256)]
RESOLUTION = 128
SHARD_MB = 2  # a shard of pending tensors is held in memory: peak RSS grows with it, not with N


def make_dataset(folder: Path, n: int) -> None:
    """n distinct images (smooth gradients plus a shape: small PNGs, like photos after decoding) with captions."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        y, x = np.mgrid[0:h, 0:w]
        a = np.stack([(x * (i % 7 + 1)) % 256, (y * (i % 5 + 1)) % 256, (x + y + i) % 256], -1).astype("uint8")
        im = Image.fromarray(a, "RGB")
        ImageDraw.Draw(im).ellipse([i % 50, i % 40, w // 2 + i % 60, h // 2 + i % 30], fill=(i % 256, 40, 200))
        im.save(folder / f"img{i:05d}.png")
        (folder / f"img{i:05d}.txt").write_text(f"image number {i}: a coloured gradient with a purple ellipse")


def run_case(args: argparse.Namespace) -> None:
    """In a fresh process: cache the project in args.project, print the reports as JSON."""
    import torch

    from flux2 import cli

    torch.set_num_threads(args.threads)
    out = {}
    for stage in ("latents", "text"):
        argv = [f"cache-{stage}", "--params", str(Path(args.project) / "params.yaml")]
        t0 = time.perf_counter()
        assert cli.main(argv) == 0
        first = time.perf_counter() - t0
        report = json.loads((Path(args.project) / f"reports/cache_{stage}.json").read_text())
        t0 = time.perf_counter()
        assert cli.main(argv) == 0
        rerun = time.perf_counter() - t0
        out[stage] = {**report, "wall_first": first, "wall_rerun": rerun}
    print("RESULT " + json.dumps(out))


def bench(n: int, models: Path, threads: int) -> dict:
    from flux2.ingest import ingest
    from flux2.params import load_params

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        make_dataset(project / "data/images", n)
        (project / "params.yaml").write_text(
            f"model: {{model_version: tiny, vae: {models}/ae.safetensors, text_encoder: {models}/text_encoder, "
            f"dit: {models}/dit.safetensors}}\n"
            f"dataset: {{sources: [{{image_directory: data/images, resolution: {RESOLUTION}}}]}}\n"
            f"cache: {{batch_size: 8, shard_mb: {SHARD_MB}}}\n")
        params = load_params(project / "params.yaml", check_paths=False)
        ingest(params.dataset, params.eval.holdout_fraction, base=project, progress=False)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        proc = subprocess.run([sys.executable, __file__, "--case", "--project", str(project), "--threads",
                               str(threads)], env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the caching process (1: steady timings on a shared machine)")
    p.add_argument("--json", default="bench/results/cache_throughput.json")
    p.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--project", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        return run_case(args)

    from flux2.tiny import make_tiny_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "tiny"
        make_tiny_model(models)
        for n in args.sizes:
            result = bench(n, models, args.threads)
            for stage, r in result.items():
                loop = r["seconds"] - r["seconds_model_load"]  # the model load is reported on its own
                rows.append({
                    "stage": f"cache_{stage}", "items": n, "encoded": r["encoded"],
                    "items_per_s": round(r["encoded"] / loop, 1),
                    "outside_forward": round(1 - r["seconds_encoder_forward"] / loop, 3),
                    "model_load_s": r["seconds_model_load"], "stage_s": round(loop, 2),
                    "noop_rerun_s": round(r["wall_rerun"], 2), "peak_rss_mb": r["peak_rss_mb"],
                })
    header = ["stage", "items", "encoded", "items_per_s", "outside_forward", "model_load_s", "stage_s",
              "noop_rerun_s", "peak_rss_mb"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(r[h]) for h in header) + " |")
    import torch

    meta = {"device": "cpu", "torch_threads": args.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "image_sizes": IMAGE_SIZES, "resolution": RESOLUTION, "batch_size": 8, "shard_mb": SHARD_MB}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
