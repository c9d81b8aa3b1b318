"""Defensive safetensors reading, atomic writing, and loading/checking the DiT and AE checkpoints."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from flux2.autoencoder import AutoEncoder
from flux2.fp8 import FP8_DTYPE, Fp8Linear, dit_block_linear
from flux2.loading import (check_ae_shapes, check_dit, check_dit_shapes, detect_variant_family,
                           dit_info_from_shapes, expected_ae_shapes, expected_dit_shapes, inspect_dit, load_ae,
                           load_dit, save_dit, strip_prefix)
from flux2.model import Flux2Transformer
from flux2.safetensors_io import (CheckpointError, load_file, read_header, read_metadata, save_file_atomic,
                                  tensor_shapes)
from flux2.variants import VARIANTS
from tests.conftest import dit_inputs, random_dit, rel_err

TINY = VARIANTS["tiny"]
OFFICIAL = ["dev", "klein-4b", "klein-base-4b", "klein-9b", "klein-base-9b"]
# fp8_scaled vs bf16 on the tiny random DiT: relative L2 error of the output. e4m3 rounds each block-linear weight
# by up to 1/16 relative; through the residual stream the output moves by about 0.004 here (bf16 vs fp32: 0.01).
FP8_REL_TOL = 0.02


def run(model: Flux2Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model(*dit_inputs())


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float rounding: equal weights can give outputs that differ in the last bits, because CPU
    kernels pick their code path by memory alignment."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def state(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def dit() -> Flux2Transformer:
    return random_dit()


@pytest.fixture
def dit_file(tmp_path, dit):
    path = tmp_path / "flux2-tiny.safetensors"
    save_file(state(dit), path)
    return path


def random_ae(seed: int = 0) -> AutoEncoder:
    torch.manual_seed(seed)
    ae = AutoEncoder(TINY.ae)
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(0.05 * torch.randn_like(p))
        ae.bn.running_mean.copy_(0.5 * torch.randn_like(ae.bn.running_mean))
        ae.bn.running_var.copy_(0.5 + torch.rand_like(ae.bn.running_var))
    return ae.eval()


@pytest.fixture(scope="module")
def ae() -> AutoEncoder:
    return random_ae()


@pytest.fixture
def ae_file(tmp_path, ae):
    path = tmp_path / "ae.safetensors"
    save_file(state(ae), path)
    return path


def write_raw(path, header: dict | bytes, data: bytes = b"", header_len: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def entry(dtype="F32", shape=(4,), offsets=(0, 16)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# ------------------------------------------------------------------ safetensors_io: reading


def test_header_roundtrip_and_partial_load(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
               "empty": torch.zeros(0)}
    save_file_atomic(tensors, path, metadata={"k": "v"})
    header, offset = read_header(path)
    assert offset == 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert header["__metadata__"] == {"k": "v"} and read_metadata(path) == {"k": "v"}
    assert tensor_shapes(path) == {"a": ((2, 3), torch.float32), "b": ((4,), torch.bfloat16),
                                   "empty": ((0,), torch.float32)}
    loaded = load_file(path, keys=["a"])
    assert list(loaded) == ["a"] and torch.equal(loaded["a"], tensors["a"])
    assert all(torch.equal(load_file(path)[k], v) for k, v in tensors.items())
    with pytest.raises(CheckpointError, match="has no tensor named 'nope'"):
        load_file(path, keys=["nope"])


@pytest.mark.parametrize("content, message", [
    (b"", r"is empty \(0 bytes\), not a safetensors file; download it again"),
    (b"\x01\x02\x03", r"is only 3 bytes"),
    (b"\xff" * 8 + b"\x00" * 32, r"header length of \d+ bytes, which is impossible"),
    (b"hello, this is a text file that someone renamed\n" * 4, r"is a text file, not safetensors"),
    (b"<!DOCTYPE html><html><body>Access denied</body></html>\n", r"is an HTML page"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", r"is a Git LFS pointer"),
    (b'{"weight_map": {"a": "model-00001-of-00002.safetensors"}}', r"is a JSON file"),
    (b"PK\x03\x04" + b"\x00" * 60, r"is a PyTorch pickle checkpoint"),
])
def test_not_a_safetensors_file(tmp_path, content, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as e:
        read_header(path)
    assert str(path) in str(e.value)


def test_torch_save_renamed_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"a": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="pickle checkpoint.*never opens them"):
        read_header(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_header(tmp_path)


def test_header_length_beyond_file(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", {"a": entry()}, header_len=5000)
    with pytest.raises(CheckpointError, match=r"is truncated: its header needs 5.01 KB but the file holds"):
        read_header(path)


@pytest.mark.parametrize("header, message", [
    (b"\xfe\xfe\xfe\xfe", "not valid JSON"),
    (b"{not json at all}", "not valid JSON"),
    (b"[1, 2, 3]", "JSON but not an object"),
    ({"__metadata__": {"a": 1}}, "__metadata__ must map strings to strings"),
    ({"a": [1, 2]}, "is not described by an object"),
    ({"a": entry(dtype="F128")}, "unknown dtype 'F128'"),
    ({"a": entry(shape=(-4,))}, "expected a list of non-negative integers"),
    ({"a": entry(shape=(2.5,))}, "expected a list of non-negative integers"),
    ({"a": entry(offsets=(16, 0))}, r"0 <= begin <= end"),
    ({"a": entry(offsets=(0,))}, r"expected \[begin, end\]"),
    ({"a": entry(shape=(5,))}, r"shape \[5\] F32 \(20 bytes\) but data_offsets \[0, 16\] span 16 bytes"),
    ({"a": entry(), "b": entry(offsets=(8, 24))}, "overlaps another tensor"),
    ({"a": entry(offsets=(16, 32))}, "leaves a gap before it"),
])
def test_malformed_header(tmp_path, header, message):
    path = write_raw(tmp_path / "m.safetensors", header, b"\x00" * 32)
    with pytest.raises(CheckpointError, match=message):
        read_header(path)


def test_offsets_beyond_file_end(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", {"a": entry(shape=(250,), offsets=(0, 1000))}, b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"is truncated: its header says 1.00 KB of tensor data but the file "
                                              r"holds 16 bytes; download it again"):
        read_header(path)


def test_trailing_bytes(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", {"a": entry()}, b"\x00" * 20)
    with pytest.raises(CheckpointError, match="4 bytes after the last tensor"):
        read_header(path)


def test_truncated_download(tmp_path):
    path = tmp_path / "flux2-klein-4b.safetensors"
    save_file({"w": torch.zeros(1000, 1000)}, path)
    _, data_offset = read_header(path)
    with open(path, "r+b") as f:
        f.truncate(data_offset + 1_020_000)  # a download that stopped a quarter of the way
    with pytest.raises(CheckpointError, match=r"flux2-klein-4b.safetensors is truncated: its header says 4.00 MB "
                                              r"of tensor data but the file holds 1.02 MB; download it again"):
        tensor_shapes(path)


# ------------------------------------------------------------------ safetensors_io: atomic writing


def leftovers(folder) -> list[str]:
    """Files other than out.safetensors (temporary files of ours or of safetensors)."""
    return sorted(p.name for p in folder.iterdir() if p.name != "out.safetensors")


def test_atomic_save_replaces_and_leaves_nothing(tmp_path):
    path = tmp_path / "out.safetensors"
    save_file_atomic({"a": torch.zeros(3)}, path)
    save_file_atomic({"a": torch.ones(3)}, path, {"v": "2"})
    assert torch.equal(load_file(path)["a"], torch.ones(3)) and read_metadata(path) == {"v": "2"}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("tensors", [{"a": torch.ones(3), "bad": "not a tensor"},
                                     {"a": torch.ones(4, 4).t()}],  # not contiguous
                         ids=["not_a_tensor", "non_contiguous"])
def test_atomic_save_failure_keeps_old_file_and_no_temp(tmp_path, tensors):
    path = tmp_path / "out.safetensors"
    save_file_atomic({"old": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=f"could not write {path}"):
        save_file_atomic(tensors, path)
    assert list(load_file(path)) == ["old"]
    assert leftovers(tmp_path) == []


def test_atomic_save_into_vanished_folder(tmp_path):
    folder = tmp_path / "gone"
    with pytest.raises(OSError, match=f"could not write {folder / 'x.safetensors'}: folder .* does not exist") as e:
        save_file_atomic({"a": torch.ones(2)}, folder / "x.safetensors")
    assert e.value.errno is not None
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ DiT: checks from the header


def test_tiny_dit_checks_and_loads_exactly(dit, dit_file):
    info = check_dit(dit_file, "tiny")
    assert (info.hidden_size, info.depth, info.depth_single_blocks, info.context_in_dim, info.num_heads) == (
        128, 2, 2, 192, 4)
    assert not info.has_guidance_in and info.dtype == torch.float32
    assert inspect_dit(dit_file) == info
    model = load_dit(dit_file, TINY, dtype=torch.float32)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())
    assert same_weights(model, dit)
    assert_same(run(model), run(dit))


def test_load_casts_everything_to_dtype(dit_file):
    model = load_dit(dit_file, "tiny")  # bf16 default, norm scales included
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_comfyui_prefix_loads(tmp_path, dit, prefix):
    path = tmp_path / "comfy.safetensors"
    save_file(state(dit, prefix), path)
    assert check_dit(path, TINY).hidden_size == 128
    loaded = load_dit(path, TINY, dtype=torch.float32)
    assert same_weights(loaded, dit)
    assert_same(run(loaded), run(dit))


def test_strip_prefix():
    assert strip_prefix(["model.diffusion_model.img_in.weight", "other"]) == {
        "img_in.weight": "model.diffusion_model.img_in.weight", "other": "other"}
    assert strip_prefix(["img_in.weight"]) == {"img_in.weight": "img_in.weight"}
    with pytest.raises(CheckpointError, match="the same weight twice"):
        strip_prefix(["diffusion_model.img_in.weight", "img_in.weight"])


def test_ae_passed_as_dit(ae_file):
    with pytest.raises(CheckpointError, match=r"looks like the FLUX.2 autoencoder \(ae.safetensors\); pass it as "
                                              r"--vae"):
        check_dit(ae_file, TINY)


def test_dit_passed_as_ae(dit_file):
    with pytest.raises(CheckpointError, match=r"looks like a FLUX.2 DiT .*pass it as --dit"):
        load_ae(dit_file, TINY)


def header_only(names_shapes: dict) -> dict:
    return {k: (tuple(s), torch.bfloat16) for k, s in names_shapes.items()}


@pytest.mark.parametrize("keys, message", [
    ({"model.embed_tokens.weight": (100, 64), "model.layers.0.self_attn.q_proj.weight": (64, 64)},
     "looks like a text encoder"),
    ({"transformer_blocks.0.attn.to_q.weight": (128, 128), "x_embedder.weight": (128, 128)},
     r"diffusers-layout transformer \(keys like transformer_blocks.0.attn.to_q.weight.*use the BFL single file"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 128)}, "looks like a LoRA file"),
    ({"encoder.down_blocks.0.resnets.0.conv1.weight": (4, 4, 3, 3)}, "diffusers-layout autoencoder"),
    ({"something.else": (3,)}, "is not a FLUX.2 checkpoint"),
    ({}, "holds no tensors"),
])
def test_wrong_kind_of_file_as_dit(keys, message):
    with pytest.raises(CheckpointError, match=message):
        check_dit_shapes(header_only(keys), TINY, "x.safetensors")


def test_wrong_kind_on_a_real_file(tmp_path):
    path = tmp_path / "model-00001-of-00002.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(10, 4), "lm_head.weight": torch.zeros(10, 4)}, path)
    with pytest.raises(CheckpointError, match=f"{path} looks like a text encoder"):
        load_dit(path, TINY)


def test_klein_4b_file_with_klein_9b_option():
    shapes = header_only(expected_dit_shapes(VARIANTS["klein-4b"]))
    with pytest.raises(CheckpointError) as e:
        check_dit_shapes(shapes, "klein-9b", "flux-2-klein-4b.safetensors")
    assert ("expected hidden 4096, 8 double / 24 single blocks, context 12288 (klein-9b); found hidden 3072, "
            "5 / 20, context 7680, which is klein-4b or klein-base-4b; pass --model_version klein-4b") in str(e.value)


def test_klein_file_with_dev_option_mentions_guidance():
    shapes = header_only(expected_dit_shapes(VARIANTS["klein-9b"]))
    with pytest.raises(CheckpointError, match=r"context 15360, guidance_in \(dev\); found hidden 4096, 8 / 24, "
                                              r"context 12288, no guidance_in, which is klein-9b or klein-base-9b"):
        check_dit_shapes(shapes, "dev")


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_shapes_pass_for_their_family(name):
    shapes = header_only(expected_dit_shapes(VARIANTS[name]))
    info = check_dit_shapes(shapes, name)
    assert info.hidden_size == VARIANTS[name].hidden_size and info.num_heads == VARIANTS[name].num_heads
    family = detect_variant_family(dit_info_from_shapes(shapes))
    assert name in family and all(VARIANTS[f].arch == VARIANTS[name].arch for f in family)
    # distilled and base files cannot be told apart: both options accept the same file
    for other in family:
        check_dit_shapes(shapes, other)


def test_tiny_file_with_official_option(dit_file):
    with pytest.raises(CheckpointError, match=r"found hidden 128, 2 / 2, context 192, which is tiny; pass "
                                              r"--model_version tiny"):
        check_dit(dit_file, "klein-4b")


def test_unknown_dimensions():
    shapes = header_only(expected_dit_shapes(VARIANTS["tiny"]))
    shapes["txt_in.weight"] = ((128, 100), torch.bfloat16)
    with pytest.raises(CheckpointError, match="context 100, which matches no FLUX.2 variant"):
        check_dit_shapes(shapes, "tiny")


def test_missing_key(tmp_path, dit):
    sd = state(dit)
    del sd["double_blocks.1.txt_attn.norm.key_norm.scale"]
    path = tmp_path / "m.safetensors"
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"1 missing \(double_blocks.1.txt_attn.norm.key_norm.scale\)"):
        load_dit(path, TINY)


def test_unexpected_keys(tmp_path, dit):
    sd = state(dit)
    sd.update({f"extra.{i}.weight": torch.zeros(2) for i in range(7)})
    path = tmp_path / "m.safetensors"
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"7 unexpected \(extra.0.weight, .*, \.\.\. \(7 in all\)\)"):
        check_dit(path, TINY)


def test_shape_mismatch():
    shapes = header_only(expected_dit_shapes(TINY))
    shapes["single_blocks.1.linear2.weight"] = ((128, 500), torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"single_blocks.1.linear2.weight is \[128, 500\], expected \[128, "
                                              r"512\]"):
        check_dit_shapes(shapes, TINY)


def test_truncated_dit_file(dit_file):
    with open(dit_file, "r+b") as f:
        f.truncate(dit_file.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="is truncated"):
        load_dit(dit_file, TINY)


def test_scaled_fp8_header_checks():
    """ComfyUI's scaled_fp8 layout passes the header check (tests/test_quantize.py loads it); a scale whose
    weight is not fp8 does not."""
    shapes = header_only(expected_dit_shapes(TINY))
    shapes["double_blocks.0.img_attn.qkv.weight"] = (shapes["double_blocks.0.img_attn.qkv.weight"][0], FP8_DTYPE)
    shapes["double_blocks.0.img_attn.qkv.scale_weight"] = ((), torch.float32)
    shapes["scaled_fp8"] = ((0,), FP8_DTYPE)
    check_dit_shapes(shapes, TINY)
    shapes["double_blocks.0.img_attn.proj.scale_weight"] = ((), torch.float32)
    with pytest.raises(CheckpointError, match=r"fp8 scale double_blocks.0.img_attn.proj.scale_weight but a "
                                              r"bfloat16 weight"):
        check_dit_shapes(shapes, TINY)


# ------------------------------------------------------------------ DiT: fp8


def test_fp8_scaled_close_to_bf16(dit_file):
    plain = load_dit(dit_file, TINY)
    fp8 = load_dit(dit_file, TINY, fp8_scaled=True)
    n_fp8 = sum(isinstance(m, Fp8Linear) for m in fp8.modules())
    assert n_fp8 == TINY.depth * 8 + TINY.depth_single_blocks * 2
    assert fp8.double_blocks[0].img_attn.qkv.weight.dtype == FP8_DTYPE
    assert fp8.img_in.weight.dtype == torch.bfloat16  # outside the blocks: not quantised
    err = rel_err(run(fp8), run(plain))
    assert 0 < err < FP8_REL_TOL


def test_fp8_file_upcasts_and_keeps_values_exactly(tmp_path, dit):
    # A file whose block linears are stored as plain float8 (no scales), the rest bf16.
    fp8_names = {f"{n}.weight" for n, m in dit.named_modules()
                 if isinstance(m, torch.nn.Linear) and dit_block_linear(n, m)}
    sd = {k: v.to(FP8_DTYPE if k in fp8_names else torch.bfloat16) for k, v in state(dit).items()}
    path = tmp_path / "fp8.safetensors"
    save_file(sd, path)
    assert check_dit(path, TINY).dtype in (FP8_DTYPE, torch.bfloat16)
    plain = load_dit(path, TINY)
    assert torch.equal(plain.single_blocks[0].linear1.weight, sd["single_blocks.0.linear1.weight"].to(torch.bfloat16))
    scaled = load_dit(path, TINY, fp8_scaled=True)
    assert torch.equal(scaled.single_blocks[0].linear1.weight, sd["single_blocks.0.linear1.weight"])
    assert_same(run(scaled), run(plain))


# ------------------------------------------------------------------ DiT: saving


def test_save_dit_roundtrip(tmp_path, dit):
    path = tmp_path / "merged.safetensors"
    save_dit(dit, path, {"note": "merged"})
    assert read_metadata(path) == {"note": "merged"}
    check_dit(path, TINY)
    loaded = load_dit(path, TINY, dtype=torch.float32)
    assert same_weights(loaded, dit)
    assert_same(run(loaded), run(dit))


def test_save_dit_dequantises_fp8(tmp_path, dit_file):
    fp8 = load_dit(dit_file, TINY, fp8_scaled=True)
    path = tmp_path / "merged.safetensors"
    save_dit(fp8, path)
    shapes = tensor_shapes(path)
    assert shapes.keys() == expected_dit_shapes(TINY).keys()
    assert {dtype for _, dtype in shapes.values()} == {torch.bfloat16}
    assert_same(run(load_dit(path, TINY)), run(fp8))


def test_save_dit_refuses_extra_layers(tmp_path, dit_file):
    model = load_dit(dit_file, TINY)
    model.double_blocks[0].img_attn.lora_down = torch.nn.Linear(128, 4, bias=False)
    with pytest.raises(ValueError, match="extra keys double_blocks.0.img_attn.lora_down.weight .*merge LoRA"):
        save_dit(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


# ------------------------------------------------------------------ autoencoder


def encode_decode(model: AutoEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        return z, model.decode(z)


def test_ae_loads_with_and_without_num_batches_tracked(tmp_path, ae, ae_file):
    z, x = encode_decode(ae)
    loaded = load_ae(ae_file, TINY)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    z2, x2 = encode_decode(loaded)
    assert same_weights(loaded, ae)
    assert_same(z2, z)
    assert_same(x2, x)

    sd = state(ae)
    del sd["bn.num_batches_tracked"]
    path = tmp_path / "ae-no-nbt.safetensors"
    save_file(sd, path)
    z3, _ = encode_decode(load_ae(path, "tiny"))
    assert_same(z3, z)


def test_ae_bf16_keeps_bn_statistics_float32(ae_file):
    model = load_ae(ae_file, TINY, dtype=torch.bfloat16)
    assert model.encoder.conv_in.weight.dtype == torch.bfloat16
    assert model.bn.running_mean.dtype == torch.float32 and model.bn.running_var.dtype == torch.float32


def test_ae_missing_key(tmp_path, ae):
    sd = state(ae)
    del sd["decoder.conv_out.bias"]
    path = tmp_path / "ae.safetensors"
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"1 missing \(decoder.conv_out.bias\)"):
        load_ae(path, TINY)


def test_ae_of_another_shape():
    shapes = header_only(expected_ae_shapes(VARIANTS["dev"].ae))
    with pytest.raises(CheckpointError, match="ae.safetensors is the autoencoder of dev, klein-4b, klein-base-4b, "
                                              "klein-9b, klein-base-9b, which does not fit --model_version tiny"):
        check_ae_shapes(shapes, TINY, "ae.safetensors")
    check_ae_shapes(shapes, "dev", "ae.safetensors")


def test_flux1_ae_is_named():
    shapes = header_only(expected_ae_shapes(VARIANTS["dev"].ae))
    del shapes["bn.running_mean"], shapes["bn.running_var"], shapes["bn.num_batches_tracked"]
    shapes["encoder.conv_out.weight"] = ((32, 512, 3, 3), torch.bfloat16)
    with pytest.raises(CheckpointError, match="FLUX.1 autoencoder"):
        check_ae_shapes(shapes, "dev", "ae.safetensors")


def test_no_temp_files_from_checks(tmp_path, dit_file):
    load_dit(dit_file, TINY)
    assert sorted(os.listdir(tmp_path)) == ["flux2-tiny.safetensors"]
