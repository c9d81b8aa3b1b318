"""FLUX.2 text conditioning against diffusers' own prompt encoders, and the loader's file handling."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flux2.fp8 import Fp8Linear
from flux2.text_encoder import (SYSTEM_MESSAGE, TextEncoder, load_text_encoder, qwen3_chat_text,
                                write_tiny_text_encoder)
from flux2.variants import VARIANTS, TextEncoderConfig
from tests.oracles.text import (mistral3_reference_embeds, qwen3_reference_embeds, read_tensors, rel_error,
                                write_shards, write_tiny_mistral3)

TINY = VARIANTS["tiny"]
# klein's layer choice on a tiny Qwen3 as deep as the real one (36 layers): only 28 get loaded.
KLEIN_LIKE = replace(TINY, name="klein-like", text_layers=(9, 18, 27), text=replace(TINY.text, num_layers=36))
# dev's layer choice on a tiny Mistral3 as deep as the real one (40 layers): only 31 get loaded.
DEV_LIKE = replace(VARIANTS["dev"], name="dev-like", context_in_dim=3 * 64, max_text_tokens=48,
                   text=TextEncoderConfig("mistral3", 64, 40))

LONG = " ".join(["a small red circle on the left of a big blue striped square"] * 12)  # > 64 tokens
PROMPTS = ["a red circle", "", LONG, "A green star, top right. Background: grey!"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_text_encoder(tmp_path_factory.mktemp("tiny") / "text_encoder", TINY)


@pytest.fixture(scope="module")
def klein_like_dir(tmp_path_factory) -> Path:
    return write_tiny_text_encoder(tmp_path_factory.mktemp("klein") / "text_encoder", KLEIN_LIKE, seed=1)


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory) -> Path:
    return write_tiny_mistral3(tmp_path_factory.mktemp("mistral") / "text_encoder", num_layers=40)


@pytest.fixture(scope="module")
def tiny_reference(tiny_dir) -> torch.Tensor:
    return load_text_encoder(tiny_dir, TINY, dtype=torch.float32).encode(PROMPTS)


# ---------------------------------------------------------------------------------------------------------
# Templates


def test_system_message_is_bfls():
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE as DIFFUSERS_SYSTEM_MESSAGE

    assert SYSTEM_MESSAGE == DIFFUSERS_SYSTEM_MESSAGE
    assert "object\nattribution" in SYSTEM_MESSAGE


def test_tiny_template_renders_like_qwen3_without_thinking(tiny_dir):
    te = load_text_encoder(tiny_dir, TINY, dtype=torch.float32)
    text = qwen3_chat_text(te.tokenizer, "a red circle")
    assert text == "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids, mask = te.tokenize(["a red circle", LONG])
    assert ids.shape == mask.shape == (2, TINY.max_text_tokens)
    n = int(mask[0].sum())
    assert mask[0, :n].all() and not mask[0, n:].any()  # right padding
    assert (ids[0, n:] == te.tokenizer.pad_token_id).all()
    assert mask[1].all()  # the long prompt is truncated to max_text_tokens
    assert len(te.tokenizer) <= TINY.text.vocab_size


# ---------------------------------------------------------------------------------------------------------
# Parity with diffusers


def test_klein_parity_tiny_layers(tiny_dir, tiny_reference):
    ref = qwen3_reference_embeds(tiny_dir, PROMPTS, TINY.text_layers, TINY.max_text_tokens)
    assert tiny_reference.shape == ref.shape == (len(PROMPTS), TINY.max_text_tokens, TINY.context_in_dim)
    assert rel_error(tiny_reference, ref) < 1e-5
    torch.testing.assert_close(tiny_reference, ref, rtol=1e-4, atol=1e-5)


def test_klein_parity_klein_layers(klein_like_dir):
    te = load_text_encoder(klein_like_dir, KLEIN_LIKE, dtype=torch.float32)
    assert len(te.model.layers) == 28  # layers 28..35 cannot change hidden_states[27]: not loaded
    ours = te.encode(PROMPTS)
    ref = qwen3_reference_embeds(klein_like_dir, PROMPTS, KLEIN_LIKE.text_layers, KLEIN_LIKE.max_text_tokens)
    assert ours.shape == (len(PROMPTS), 64, 192)
    assert rel_error(ours, ref) < 1e-5
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_dev_parity(mistral_dir):
    prompts = ["a red circle", "", LONG, "a blue [IMG] square at the top"]
    te = load_text_encoder(mistral_dir, DEV_LIKE, dtype=torch.float32)
    assert len(te.model.layers) == 31
    ids, mask = te.tokenize(prompts)
    assert not mask[0, 0] and mask[0, -1]  # this tokenizer pads on the left, like Mistral's
    assert te.tokenizer.convert_tokens_to_ids("[IMG]") not in ids[3].tolist()
    ours = te.encode(prompts)
    ref = mistral3_reference_embeds(mistral_dir, prompts, DEV_LIKE.text_layers, DEV_LIKE.max_text_tokens)
    assert ours.shape == ref.shape == (4, DEV_LIKE.max_text_tokens, DEV_LIKE.context_in_dim)
    assert torch.isfinite(ours).all()
    assert rel_error(ours, ref) < 1e-5
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_dev_old_key_layout_loads_the_same(mistral_dir, tmp_path):
    """Mistral3ForConditionalGeneration files saved before transformers 4.52: `language_model.model.*`."""
    renames = [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
               ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")]
    old = {}
    for key, value in read_tensors(mistral_dir / "model.safetensors").items():
        for new, before in renames:
            if key.startswith(new):
                key = before + key[len(new):]
                break
        old[key] = value
    assert any(k.startswith("language_model.model.layers.") for k in old)
    out = tmp_path / "old"
    out.mkdir()
    save_file(old, str(out / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(mistral_dir / name, out / name)
    prompts = ["a red circle", "two stars"]
    new_te = load_text_encoder(mistral_dir, DEV_LIKE, dtype=torch.float32)
    old_te = load_text_encoder(out, DEV_LIKE, dtype=torch.float32)
    torch.testing.assert_close(old_te.encode(prompts), new_te.encode(prompts), rtol=0, atol=0)


def test_text_encoder_wraps_an_in_memory_model(tiny_dir, tiny_reference):
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    te = TextEncoder(AutoTokenizer.from_pretrained(str(tiny_dir)), model, TINY)
    torch.testing.assert_close(te.encode(PROMPTS), tiny_reference, rtol=1e-5, atol=1e-6)
    assert len(te.fingerprint) == 16
    chunked = te.encode(PROMPTS, batch_size=3)
    torch.testing.assert_close(chunked, tiny_reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="list of prompts"):
        te.encode("a red circle")


# ---------------------------------------------------------------------------------------------------------
# Loading: file layouts


def test_split_set_found_from_its_first_file(tiny_dir, tiny_reference, tmp_path):
    tensors = read_tensors(tiny_dir / "model.safetensors")
    files = write_shards(tensors, tmp_path / "split", "model", 3)
    shutil.copy(tiny_dir / "config.json", tmp_path / "split")
    te = load_text_encoder(files[0], TINY, tokenizer=tiny_dir, dtype=torch.float32)
    torch.testing.assert_close(te.encode(PROMPTS), tiny_reference, rtol=0, atol=0)
    files[1].unlink()
    with pytest.raises(FileNotFoundError, match=r"3-file split set.*model-00002-of-00003\.safetensors"):
        load_text_encoder(files[0], TINY, tokenizer=tiny_dir)


def test_hf_folder_with_index_and_sibling_tokenizer(tiny_dir, tiny_reference, tmp_path):
    """The official repos' layout: text_encoder/ (config + sharded weights + index) beside tokenizer/."""
    repo = tmp_path / "repo"
    write_shards(read_tensors(tiny_dir / "model.safetensors"), repo / "text_encoder", "model", 2,
                 index_name="model.safetensors.index.json")
    shutil.copy(tiny_dir / "config.json", repo / "text_encoder")
    (repo / "tokenizer").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_dir / name, repo / "tokenizer")
    for path in (repo / "text_encoder", repo):  # the folder, or the whole repo
        te = load_text_encoder(path, TINY, dtype=torch.float32)
        torch.testing.assert_close(te.encode(PROMPTS), tiny_reference, rtol=0, atol=0)
    (repo / "text_encoder" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        load_text_encoder(repo / "text_encoder", TINY)


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_single_file_with_builtin_config(tiny_dir, tiny_reference, tmp_path, prefix):
    """ComfyUI-style single file (`model.*`, no lm_head) or a bare Qwen3Model (no prefix), no config.json."""
    tensors = {prefix + k.removeprefix("model."): v for k, v in read_tensors(tiny_dir / "model.safetensors").items()
               if k.startswith("model.")}
    file = tmp_path / "text_encoders" / "qwen_3_tiny.safetensors"
    file.parent.mkdir()
    save_file(tensors, str(file))
    te = load_text_encoder(file, TINY, tokenizer=tiny_dir, dtype=torch.float32)
    torch.testing.assert_close(te.encode(PROMPTS), tiny_reference, rtol=0, atol=0)


def test_no_tokenizer_is_a_clear_error(tiny_dir, tmp_path):
    file = tmp_path / "te" / "model.safetensors"
    file.parent.mkdir()
    shutil.copy(tiny_dir / "model.safetensors", file)
    with pytest.raises(FileNotFoundError, match=r"--tokenizer DIR") as err:
        load_text_encoder(file, TINY)
    assert str(tmp_path / "tokenizer") in str(err.value)
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        load_text_encoder(file, TINY, tokenizer=tmp_path)


def test_wrong_text_encoder_for_the_variant(tiny_dir, mistral_dir, klein_like_dir):
    wide = replace(TINY, name="wide", context_in_dim=3 * 96)
    with pytest.raises(ValueError, match=r"Qwen3 with hidden 64 gives 192-dim context.*wide needs 288"):
        load_text_encoder(tiny_dir, wide)
    klein9 = VARIANTS["klein-9b"]
    with pytest.raises(ValueError, match=r"hidden 64 gives 192-dim.*klein-9b needs 12288 \(Qwen3-8B\)"):
        load_text_encoder(tiny_dir, klein9)
    with pytest.raises(ValueError, match=r"Qwen3 text encoder, but --model_version dev-like needs Mistral3"):
        load_text_encoder(tiny_dir, DEV_LIKE)
    with pytest.raises(ValueError, match=r"Mistral3 text encoder, but --model_version tiny needs Qwen3"):
        load_text_encoder(mistral_dir, TINY)
    deep = replace(TINY, name="deep", text_layers=(2, 4, 6))
    with pytest.raises(ValueError, match=r"3 layers.*layers \[2, 4, 6\]"):
        load_text_encoder(tiny_dir, deep)


def test_pickled_checkpoints_are_refused(tmp_path):
    file = tmp_path / "pytorch_model.bin"
    file.write_bytes(b"not read")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_text_encoder(file, TINY)


# ---------------------------------------------------------------------------------------------------------
# fp8, fingerprints, the tiny writer


def test_fp8_stays_close_to_bf16(tiny_dir):
    bf16 = load_text_encoder(tiny_dir, TINY, dtype=torch.bfloat16)
    fp8 = load_text_encoder(tiny_dir, TINY, dtype=torch.bfloat16, fp8=True)
    linears = [m for m in fp8.model.layers.modules() if isinstance(m, Fp8Linear)]
    assert len(linears) == 7 * TINY.text.num_layers  # q k v o gate up down
    assert fp8.model.embed_tokens.weight.dtype == torch.bfloat16
    a, b = fp8.encode(PROMPTS), bf16.encode(PROMPTS)
    assert a.dtype == torch.bfloat16 and torch.isfinite(a).all()
    # e4m3 keeps 3 mantissa bits: each weight moves by up to 1/16, about 3.6% rms. On this random model that gives
    # 3.4% / 4.9% / 5.8% relative error on layers 1 / 2 / 3 (bf16 rounding alone: 0.5-0.8%). Tolerance: 8%.
    assert 0 < rel_error(a, b) < 0.08
    assert torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0) > 0.995
    assert fp8.identity()["fp8"] == "true" and bf16.identity()["fp8"] == "false"


def test_fingerprint_names_the_weights(tiny_dir, tmp_path):
    a = load_text_encoder(tiny_dir, TINY, dtype=torch.float32)
    b = load_text_encoder(tiny_dir, TINY, dtype=torch.float32)
    other = load_text_encoder(write_tiny_text_encoder(tmp_path / "seed1", TINY, seed=1), TINY)
    assert a.fingerprint == b.fingerprint != other.fingerprint
    assert len(a.fingerprint) == 16
    ident = a.identity()
    assert ident["text_layers"] == "1,2,3" and ident["max_text_tokens"] == "64"
    assert ident["template_version"] and ident["text_encoder"] == "qwen3"


def test_write_tiny_text_encoder_is_deterministic(tiny_dir, tmp_path):
    again = write_tiny_text_encoder(tmp_path / "again", TINY)
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= set(names)
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (tiny_dir / name).read_bytes() == (again / name).read_bytes(), name
    config = json.loads((tiny_dir / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (64, 3, 512)
    other = write_tiny_text_encoder(tmp_path / "seed1", TINY, seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
