"""DVC stage `cache_text`: captions of data/manifest.parquet, the empty prompt, eval.prompts and the
train.sample_prompts file + the text encoder -> cache.text_dir (incremental) and reports/cache_text.json.
Run from the repository root: `python -m stages.cache_text` (or under `accelerate launch`). Extra options are
passed on (see `flux2 cache-text --help`)."""
import sys

from flux2.cli import main

if __name__ == "__main__":
    sys.exit(main(["cache-text", "--params", "params.yaml", *sys.argv[1:]]))
