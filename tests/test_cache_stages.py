"""cache_latents and cache_text on the tiny model: real files, ingest -> caches; values against direct encoding;
incremental reruns; two processes; and the whole chain under `dvc repro` in a temporary git + DVC repo."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from flux2 import cli
from flux2.cache_latents import ITEMS_FILE, ae_fingerprint, latent_key, read_item_map
from flux2.cache_store import INDEX_FILE, CacheError, CacheReader, build_cache, check_cache_compatible, read_index
from flux2.cache_text import PROMPTS_FILE, read_prompt_map
from flux2.ingest import ingest, read_manifest
from flux2.params import load_params
from tests.test_cache_store import META, Encoder, jobs_for

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

PARAMS = """\
model:
  model_version: tiny
  dit: models/tiny/dit.safetensors
  vae: models/tiny/ae.safetensors
  text_encoder: models/tiny/text_encoder
  tokenizer: null
  dtype: auto
  vae_dtype: float32
  fp8_text_encoder: false
  device: auto
dataset:
  sources:
    - {image_directory: data/images/a, resolution: 64}
    - {image_directory: data/images/b, control_directory: data/controls/b, resolution: RES_B}
cache: {latents_dir: cache/latents, text_dir: cache/text, shard_mb: 1, batch_size: 4, text_dtype: bfloat16}
eval: {prompts: ["an evaluation prompt"], holdout_fraction: 0.25}
train: {sample_prompts: prompts/sample_prompts.txt}
"""

# The stages as the project's dvc.yaml should hold them (plus each stage's code as deps there).
DVC_YAML = """\
stages:
  ingest:
    cmd: python -m stages.ingest
    deps:
      - data/images
      - data/controls
    params:
      - dataset
      - eval.holdout_fraction
    outs:
      - data/manifest.parquet
    metrics:
      - reports/ingest.json:
          cache: false
  cache_latents:
    cmd: python -m stages.cache_latents
    deps:
      - data/manifest.parquet
      - ${model.vae}
    params:
      - model.model_version
      - model.vae
      - model.vae_dtype
      - model.device
      - cache.latents_dir
      - cache.shard_mb
      - cache.batch_size
    outs:
      - ${cache.latents_dir}:
          persist: true
          cache: false
    metrics:
      - reports/cache_latents.json:
          cache: false
  cache_text:
    cmd: python -m stages.cache_text
    deps:
      - data/manifest.parquet
      - ${model.text_encoder}
      - ${train.sample_prompts}
    params:
      - model.model_version
      - model.text_encoder
      - model.tokenizer
      - model.dtype
      - model.fp8_text_encoder
      - model.device
      - cache.text_dir
      - cache.text_dtype
      - cache.shard_mb
      - cache.batch_size
      - eval.prompts
      - train.sample_prompts
    outs:
      - ${cache.text_dir}:
          persist: true
          cache: false
    metrics:
      - reports/cache_text.json:
          cache: false
"""


def noise(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def add_image(folder: Path, name: str, size, seed: int, caption: str | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    noise(*size, seed).save(folder / f"{name}.png")
    if caption is not None:
        (folder / f"{name}.txt").write_text(caption, encoding="utf-8")


def make_project(root: Path, models: Path, res_b: int = 48) -> Path:
    """Two sources: a (4 images, two share a caption) at 64; b (2 images with 3 controls) at res_b."""
    shutil.copytree(models, root / "models/tiny")
    a, b, cb = root / "data/images/a", root / "data/images/b", root / "data/controls/b"
    add_image(a, "a0", (64, 64), 0, "a red circle")
    add_image(a, "a1", (96, 64), 1, "a red circle")
    add_image(a, "a2", (64, 96), 2, "a blue square on the left")
    add_image(a, "a3", (80, 80), 3, "a green star")
    add_image(b, "b0", (64, 64), 4, "a yellow heart")
    add_image(b, "b1", (64, 112), 5, "a small ring")
    add_image(cb, "b0_0", (64, 64), 6, None)
    add_image(cb, "b0_1", (32, 32), 7, None)
    add_image(cb, "b1", (80, 48), 8, None)
    (root / "prompts").mkdir()
    (root / "prompts/sample_prompts.txt").write_text("# samples\na purple cross --w 64 --h 64 --d 1 --n ugly, blurry\n"
                                                     "a red circle --d 2\n", encoding="utf-8")
    (root / "params.yaml").write_text(PARAMS.replace("RES_B", str(res_b)))
    return root


def run_ingest(root: Path) -> list[dict]:
    params = load_params(root / "params.yaml", check_paths=False)
    ingest(params.dataset, params.eval.holdout_fraction, base=root, progress=False)
    return read_manifest(root / "data/manifest.parquet")


def run_cli(*argv: str) -> dict:
    assert cli.main(list(argv)) == 0
    kind = "latents" if argv[0] == "cache-latents" else "text"
    params = Path(argv[argv.index("--params") + 1])
    return json.loads((params.parent / f"reports/cache_{kind}.json").read_text())


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from flux2.tiny import make_tiny_model

    out = tmp_path_factory.mktemp("models")
    make_tiny_model(out)
    return out


@pytest.fixture
def project(tmp_path, tiny_models):
    root = make_project(tmp_path / "proj", tiny_models)
    return root, run_ingest(root)


# ------------------------------------------------------------------------------------------------ in process


def test_cache_latents_values_mapping_and_incremental_reruns(project):
    from flux2.images import open_rgb, resize_cover_crop, to_tensor
    from flux2.loading import load_ae

    root, rows = project
    params = str(root / "params.yaml")
    report = run_cli("cache-latents", "--params", params)
    assert (report["encoded"], report["reused"], report["dropped"]) == (9, 0, 0)  # 6 images + 3 controls
    assert report["items"] == 6

    cache = root / "cache/latents"
    reader = CacheReader(cache)
    fp = ae_fingerprint(root / "models/tiny/ae.safetensors")
    check_cache_compatible(reader, "tiny", "latents", fingerprint=fp)
    assert reader.meta["ae_fingerprint"] == fp and reader.meta["variant"] == "tiny"
    items = read_item_map(cache)
    assert set(items) == {r["id"] for r in rows}
    ae = load_ae(root / "models/tiny/ae.safetensors", "tiny")
    for row in rows:
        item = items[row["id"]]
        w, h = row["bucket_width"], row["bucket_height"]
        assert item.bucket == (w, h) and item.split == row["split"]
        assert item.latent_key == latent_key(row["sha256"], w, h, fp)
        paths = [row["image_path"]] + [c["path"] for c in row["controls"]]
        keys = [item.latent_key] + item.control_keys
        assert len(keys) == 1 + len(row["controls"])
        for path, key in zip(paths, keys):
            # Every control is brought to its item's bucket, like the item itself.
            pixels = to_tensor(resize_cover_crop(open_rgb(root / path), w, h))[None]
            with torch.no_grad():
                expected = ae.encode(pixels)[0]
            got = reader.get(key)
            assert got.shape == (128, h // 16, w // 16) and got.dtype == torch.float32
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    report = run_cli("cache-latents", "--params", params)
    assert (report["encoded"], report["reused"], report["seconds_model_load"]) == (0, 9, 0.0)  # AE not loaded

    # Resolution of source b changed: only b's two images and three controls are encoded again.
    (root / "params.yaml").write_text(PARAMS.replace("RES_B", "32"))
    rows = run_ingest(root)
    report = run_cli("cache-latents", "--params", params)
    b_ids = sorted(r["id"] for r in rows if r["source"] == 1)
    assert (report["encoded"], report["reused"], report["dropped"]) == (5, 4, 5)
    assert report["encoded_labels"] == sorted(b_ids + [f"{b_ids[0]}/control0", f"{b_ids[0]}/control1",
                                                       f"{b_ids[1]}/control0"])
    assert len(CacheReader(cache)) == 9

    # An image that changed after ingest is refused, naming the file.
    (root / "data/images/a/a0.png").write_bytes(noise(64, 64, 99).tobytes()[:10] + b"x")
    shutil.rmtree(cache)
    assert cli.main(["cache-latents", "--params", params]) == 2
    with pytest.raises(CacheError, match=r"a0.png changed since ingest"):
        from flux2.cache_latents import cache_latents, config_from_args

        cache_latents(config_from_args(cli.build_parser().parse_args(["cache-latents", "--params", params])))


def test_cache_text_values_prompts_and_one_caption_edit(project):
    from flux2.text_encoder import load_text_encoder
    from flux2.variants import VARIANTS

    root, rows = project
    params = str(root / "params.yaml")
    report = run_cli("cache-text", "--params", params)
    captions = {r["caption"] for r in rows}
    expected = captions | {"", "an evaluation prompt", "a purple cross", "ugly, blurry"}  # "a red circle" twice
    assert report["encoded"] == len(expected) == 9 and sorted(report["encoded_labels"]) == sorted(expected)

    cache = root / "cache/text"
    reader = CacheReader(cache)
    keys = read_prompt_map(cache)
    assert set(keys) == expected
    roles = {r["text"]: r["roles"] for r in pq.read_table(cache / PROMPTS_FILE).to_pylist()}
    assert roles[""] == ["empty"] and roles["a red circle"] == ["caption", "sample"]
    assert roles["ugly, blurry"] == ["sample_negative"] and roles["an evaluation prompt"] == ["eval"]

    te = load_text_encoder(root / "models/tiny/text_encoder", VARIANTS["tiny"], dtype=torch.float32)
    assert reader.meta["text_fingerprint"] == te.fingerprint
    check_cache_compatible(reader, "tiny", "text", fingerprint=te.fingerprint)
    texts = sorted(expected)
    reference = te.encode(texts).to(torch.bfloat16)
    for text, ref in zip(texts, reference):
        got = reader.get(keys[text])
        assert got.dtype == torch.bfloat16 and got.shape == (64, 192)
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)

    with pytest.raises(CacheError) as e:
        check_cache_compatible(reader, "klein-base-4b", "text")
    assert str(e.value) == (f"{cache} was made with layers (1, 2, 3) of a qwen3 encoder for tiny; klein-base-4b "
                            f"needs qwen3 layers (9, 18, 27): rerun cache_text")

    # One caption edited: that caption alone is encoded; the old one (used by no other prompt) is dropped.
    (root / "data/images/a/a3.txt").write_text("a green star, edited")
    run_ingest(root)
    report = run_cli("cache-text", "--params", params)
    assert (report["encoded"], report["reused"], report["dropped"]) == (1, 8, 1)
    assert report["encoded_labels"] == ["a green star, edited"]
    assert "a green star" not in read_prompt_map(cache)
    report = run_cli("cache-text", "--params", params)
    assert (report["encoded"], report["reused"], report["seconds_model_load"]) == (0, 9, 0.0)


def test_seed_style_options_with_a_musubi_toml(tmp_path, tiny_models, monkeypatch, capsys):
    add_image(tmp_path / "imgs", "x0", (64, 64), 0, "one")
    add_image(tmp_path / "imgs", "x1", (96, 64), 1, "two")
    (tmp_path / "ds.toml").write_text('[general]\nresolution = [64, 64]\nenable_bucket = true\n'
                                      '[[datasets]]\nimage_directory = "imgs"\n')
    monkeypatch.chdir(tmp_path)
    assert cli.main(["cache-latents", "--dataset_config", "ds.toml", "--vae", str(tiny_models / "ae.safetensors"),
                     "--model_version", "tiny", "--batch_size", "2", "--vae_dtype", "bfloat16"]) == 0
    assert "cache_latents: encoded 2, reused 0" in capsys.readouterr().out
    reader = CacheReader("cache/latents")
    assert reader.meta["dtype"] == "bfloat16" and {reader.get(k).dtype for k in reader.keys()} == {torch.bfloat16}
    assert len(read_manifest("data/manifest.parquet")) == 2
    assert cli.main(["cache-latents", "--vae", str(tiny_models / "ae.safetensors"), "--model_version", "tiny"]) == 2
    assert "needs --manifest" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DVC_NO_ANALYTICS="1",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("FLUX2_DEBUG", None)
    return env


@pytest.mark.slow
def test_two_processes_give_the_same_index_as_one(project):
    root, _ = project
    common = ["cache-latents", "--params", str(root / "params.yaml"), "--batch_size", "1"]
    one = subprocess.run([sys.executable, "-m", "flux2.cli", *common, "--cache_dir", str(root / "c1"),
                          "--report", str(root / "one.json")], env=subprocess_env(), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    # accelerate's --cpu launcher starts one process; --multi_gpu is its torchrun launcher, and on a machine
    # without CUDA our PartialState(cpu=True) makes the two processes a gloo group.
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", str(free_port()), "-m", "flux2.cli", *common,
                          "--cache_dir", str(root / "c2"), "--report", str(root / "two.json")],
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "cache_latents: encoded 9, reused 0" in two.stdout and two.stdout.count("cache_latents: encoded") == 1
    assert json.loads((root / "two.json").read_text())["processes"] == 2

    def entries(cache):
        rows, meta = read_index(cache)
        return {r["key"]: (tuple(r["shape"]), r["dtype"], r["nbytes"], r["crc32"]) for r in rows}, meta

    (e1, m1), (e2, m2) = entries(root / "c1"), entries(root / "c2")
    assert e1 == e2 and m1 == m2 and len(e1) == 9
    assert {r["shard"].split("-")[-2] for r in read_index(root / "c2")[0]} == {"r0", "r1"}  # each rank wrote shards
    assert not list((root / "c2").glob("index.part-*"))
    assert pq.read_table(root / "c1" / ITEMS_FILE).equals(pq.read_table(root / "c2" / ITEMS_FILE))


# The stand-in encoder of test_cache_store, in each process of a two-process build_cache with a shared store.
TWO_RANKS = """\
import json, sys
from pathlib import Path
from flux2.cache_store import Dist, build_cache
from tests.test_cache_store import META, Encoder, jobs_for

root, dist, enc = Path(sys.argv[1]), Dist(), Encoder()
stats = build_cache(root / "b", jobs_for(range(8)), META, enc.load, enc, batch_size=3, shard_mb=1, dist=dist,
                    progress=False, store=root / "store")
(root / f"stats-r{dist.rank}.json").write_text(json.dumps([stats.wanted, stats.reused, stats.from_store,
                                                           stats.recovered, stats.encoded, stats.shards]))
dist.state.destroy_process_group()  # a gloo process that exits without it may abort
"""


@pytest.mark.slow
def test_with_a_shared_store_every_process_returns_the_same_counts(tmp_path):
    enc = Encoder()  # six entries go into the store from another folder
    build_cache(tmp_path / "a", jobs_for(range(6)), META, enc.load, enc, batch_size=3, shard_mb=1, progress=False,
                store=tmp_path / "store")
    (tmp_path / "two_ranks.py").write_text(TWO_RANKS)
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", str(free_port()), str(tmp_path / "two_ranks.py"), str(tmp_path)],
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    counts = [json.loads((tmp_path / f"stats-r{r}.json").read_text()) for r in (0, 1)]
    # wanted, reused, from_store, recovered, encoded, shards
    assert counts[0] == counts[1] == [8, 6, 6, 0, 2, 3], counts


# ------------------------------------------------------------------------------------------------ dvc repro


def dvc(repo: Path, *args: str) -> str:
    env = dict(subprocess_env(), GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com")
    env.pop("PYTHONPATH")  # the stages import the installed package, as in the project
    out = subprocess.run([str(VENV_BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_dvc_repro_first_run_noop_caption_edit_new_image_resolution_change(tmp_path, tiny_models):
    repo = make_project(tmp_path / "repo", tiny_models)
    env = subprocess_env()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    dvc(repo, "init", "-q")
    (repo / "dvc.yaml").write_text(DVC_YAML)

    def reports():
        return [json.loads((repo / f"reports/cache_{k}.json").read_text()) for k in ("latents", "text")]

    def ids_of(source):
        return sorted(r["id"] for r in read_manifest(repo / "data/manifest.parquet") if r["source"] == source)

    dvc(repo, "repro")
    lat, txt = reports()
    assert (lat["encoded"], lat["reused"], txt["encoded"], txt["reused"]) == (9, 0, 9, 0)

    out = dvc(repo, "repro")  # nothing changed: no stage runs
    assert "didn't change" in out and "Running stage" not in out
    assert reports() == [lat, txt]

    (repo / "data/images/a/a2.txt").write_text("a blue square on the right")
    dvc(repo, "repro")
    lat, txt = reports()
    assert (lat["encoded"], lat["reused"]) == (0, 9)
    assert (txt["encoded"], txt["reused"], txt["dropped"], txt["encoded_labels"]) == (
        1, 8, 1, ["a blue square on the right"])

    before = set(ids_of(0))
    add_image(repo / "data/images/a", "a4", (64, 64), 10, "a new black dot")
    dvc(repo, "repro")
    lat, txt = reports()
    (new_id,) = set(ids_of(0)) - before
    assert (lat["encoded"], lat["reused"], lat["encoded_labels"]) == (1, 9, [new_id])
    assert (txt["encoded"], txt["reused"], txt["encoded_labels"]) == (1, 9, ["a new black dot"])

    (repo / "params.yaml").write_text(PARAMS.replace("RES_B", "32"))
    dvc(repo, "repro")
    lat, txt = reports()
    b = ids_of(1)
    assert (lat["encoded"], lat["reused"], lat["dropped"]) == (5, 5, 5)
    assert lat["encoded_labels"] == sorted(b + [f"{b[0]}/control0", f"{b[0]}/control1", f"{b[1]}/control0"])
    assert (txt["encoded"], txt["reused"]) == (0, 10)
    assert len(CacheReader(repo / "cache/latents")) == 10 and (repo / "cache/latents" / INDEX_FILE).is_file()
