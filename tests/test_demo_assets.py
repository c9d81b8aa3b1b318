"""The embedded default as committed: the trained tiny model (assets/tiny/) loads through the real loaders and is
not random, and the bundled LoRA dataset (assets/dataset/) ingests with exactly the expected rejections.

These files come from the demo pipeline (demo/dvc.yaml); if a test here fails after it was rerun, commit what
it wrote under assets/ (see demo/README.md)."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flux2.autoencoder import AutoEncoder
from flux2.concept import Concept, concept_score
from flux2.images import open_rgb, to_pil, to_tensor
from flux2.loading import load_ae, load_dit
from flux2.model import Flux2Transformer
from flux2.params import load_params
from flux2.text_encoder import load_text_encoder
from flux2.train import velocity_loss
from flux2.variants import VARIANTS

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "assets" / "tiny"
DATASET = REPO / "assets" / "dataset"
TINY = VARIANTS["tiny"]

# What ingest must skip in the bundled dataset (demo/make_lora_dataset.py writes these on purpose), by reason.
EXPECTED_REJECTIONS = {
    "assets/dataset/images/truncated.png": "unreadable",
    "assets/dataset/images/notes.png": "unreadable",
    "assets/dataset/images/no_caption.png": "caption_missing",
    "assets/dataset/edits/edit_no_control.png": "control_missing",
}
EXPECTED_ITEMS, EXPECTED_EDIT_ITEMS = 28, 4


@pytest.fixture(scope="module")
def ae():
    return load_ae(MODEL / "ae.safetensors", TINY)


@pytest.fixture(scope="module")
def star():
    """A bundled picture (a purple star: a colour and shape the base never saw) as (1, 3, 128, 128)."""
    return to_tensor(open_rgb(DATASET / "images" / "star_00.png"))[None]


def test_the_committed_files_are_small():
    files = [p for p in (REPO / "assets").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 25 * 2**20


def test_the_autoencoder_reconstructs_pictures_it_never_saw(ae, star):
    with torch.no_grad():
        latents = ae.encode(star)
        trained = (ae.decode(latents) - star).square().mean().item()
        torch.manual_seed(0)
        random_ae = AutoEncoder(TINY.ae).eval()
        random = (random_ae.decode(random_ae.encode(star)) - star).square().mean().item()
    assert latents.shape == (1, 128, 8, 8)
    psnr = 10 * torch.log10(torch.tensor(4 / trained)).item()
    assert trained < 0.05, f"reconstruction MSE {trained:.4f} (PSNR {psnr:.1f} dB)"
    assert random > 10 * trained


def test_the_concept_colour_survives_the_autoencoder(ae, star):
    # A LoRA can only teach purple if the codec can represent it (an AE trained without purple made it blue).
    concept = Concept(tuple(load_params(REPO / "params.yaml", check_paths=False).eval.concept.colour))
    with torch.no_grad():
        reconstructed = ae.decode(ae.encode(star))
    before = concept_score(to_pil(star), concept)
    after = concept_score(to_pil(reconstructed), concept)
    assert before > 0.03 and after > 0.5 * before, (before, after)


def test_the_autoencoder_normalises_latents_to_about_unit_scale(ae):
    # The bn statistics were set from the base pictures; the bundled pictures are of the same kind.
    pictures = torch.cat([to_tensor(open_rgb(p))[None] for p in sorted((DATASET / "images").glob("star_*.png"))])
    with torch.no_grad():
        latents = ae.encode(pictures)
    assert abs(latents.mean().item()) < 0.5
    assert 0.4 < latents.std().item() < 2.0


def test_the_dit_predicts_velocities_better_than_a_random_one(ae, star):
    te = load_text_encoder(MODEL / "text_encoder", TINY, dtype=torch.float32)
    ctx = te.encode([(DATASET / "images" / "star_00.txt").read_text().strip()])
    dit = load_dit(MODEL / "dit.safetensors", TINY, dtype=torch.float32)
    torch.manual_seed(0)
    random_dit = Flux2Transformer(TINY).eval()
    with torch.no_grad():
        x0 = ae.encode(star).expand(8, -1, -1, -1)
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.linspace(0.1, 0.9, 8)
        ctx = ctx.expand(8, -1, -1)
        trained = velocity_loss(dit, x0, noise, t, ctx, [], TINY).mean().item()
        random = velocity_loss(random_dit, x0, noise, t, ctx, [], TINY).mean().item()
    assert trained < 0.7 * random, (trained, random)


def test_the_text_encoder_tells_captions_apart():
    te = load_text_encoder(MODEL / "text_encoder", TINY, dtype=torch.float32)
    with torch.no_grad():
        ctx = te.encode(["a red circle on a blue background", "a blue circle on a red background"])
    assert ctx.shape == (2, TINY.max_text_tokens, TINY.context_in_dim)
    assert not torch.allclose(ctx[0], ctx[1])


def test_the_bundled_dataset_ingests_with_the_expected_rejections(tmp_path):
    from flux2.ingest import ingest

    p = load_params(REPO / "params.yaml", check_paths=False)
    dataset = replace(p.dataset, manifest=str(tmp_path / "manifest.parquet"), report=str(tmp_path / "ingest.json"))
    result = ingest(dataset, p.eval.holdout_fraction, base=REPO, progress=False)
    assert {r.path: r.reason for r in result.rejected} == EXPECTED_REJECTIONS
    assert len(result.items) == EXPECTED_ITEMS
    assert sum(1 for i in result.items if i.controls) == EXPECTED_EDIT_ITEMS
    assert {(i.bucket_width, i.bucket_height) for i in result.items} == {(128, 128)}
    assert all("purple star" in i.caption for i in result.items)
    assert {i.split for i in result.items} == {"train", "holdout"}
