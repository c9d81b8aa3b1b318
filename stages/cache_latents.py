"""DVC stage `cache_latents`: data/manifest.parquet + the autoencoder -> cache.latents_dir (incremental) and
reports/cache_latents.json. Run from the repository root: `python -m stages.cache_latents`, or split over
processes with `accelerate launch --num_processes 2 -m stages.cache_latents`. Extra options are passed on
(see `flux2 cache-latents --help`)."""
import sys

from flux2.cli import main

if __name__ == "__main__":
    sys.exit(main(["cache-latents", "--params", "params.yaml", *sys.argv[1:]]))
