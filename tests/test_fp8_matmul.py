"""model.fp8_matmul (flux2/fp8_matmul.py): the block Linears multiply in fp8 with torch._scaled_mm (row-wise
scales), forward and input gradient, beside a LoRA in float32. torch._scaled_mm runs on a CPU, so the numbers are
checked here against the bf16 path (the same block with bf16 weights and activations).

Stated tolerances (relative L2 error), measured on the tiny DiT's default-initialised blocks:
- one product, forward and input gradient: < 5% (measured 3.7% and 3.6%: e4m3's 3 mantissa bits);
- a block's output, residual included: < 1% of the bf16 path's (measured 0.46% double, 0.34% single block);
- the input gradient through a block: < 2% (measured 0.77% and 0.59%).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from flux2 import sampling
from flux2.cli import main
from flux2.fp8 import FP8_DTYPE, dit_block_linear, quantize_linears
from flux2.fp8_matmul import Fp8MatmulLinear, use_fp8_matmuls
from flux2.lora import LoRAModule, add_to_weight
from flux2.model import Flux2Transformer
from flux2.variants import VARIANTS
from tests.conftest import rel_err
from tests.test_quantize import quantised

PRODUCT_REL, BLOCK_REL, BLOCK_GRAD_REL = 0.05, 0.01, 0.02


def test_one_product_and_its_input_gradient():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 384, bias=False)
    fp8 = Fp8MatmulLinear(linear.weight, None)
    assert fp8.weight.dtype == FP8_DTYPE and fp8.scale_weight.dtype == torch.float32
    assert fp8.scale_weight.shape == (384, 1, 1)  # one scale per output row
    x = torch.randn(2, 10, 128, requires_grad=True)
    g = torch.randn(2, 10, 384)
    (dx,) = torch.autograd.grad(fp8(x), x, g)
    (dx_ref,) = torch.autograd.grad(linear(x), x, g)
    assert rel_err(fp8(x), linear(x)) < PRODUCT_REL and rel_err(dx, dx_ref) < PRODUCT_REL
    assert not fp8.weight.requires_grad


def block_inputs(dit, dtype):
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(2, 16, 128, generator=g), torch.randn(2, 8, 128, generator=g)
    pe = dit.pe_embedder(torch.cat([sampling.text_ids(2, 8), sampling.latent_ids(2, 4, 4)], 1))
    with torch.no_grad():
        vec = torch.randn(2, 128, generator=g)
        mods = [dit.double_stream_modulation_img(vec), dit.double_stream_modulation_txt(vec),
                dit.single_stream_modulation(vec)]
    mods = [[tuple(t.to(dtype) for t in m) for m in mod] for mod in mods]
    leaf = lambda t: t.to(dtype).requires_grad_()  # noqa: E731
    return {"double": (leaf(img), leaf(txt), pe, mods[0], mods[1]), "single": (leaf(torch.cat([txt, img], 1)), pe,
                                                                              mods[2])}


@pytest.mark.parametrize("kind", ["double", "single"])
def test_a_block_stays_within_one_percent_of_the_bf16_path(kind):
    torch.manual_seed(0)
    dit = Flux2Transformer(VARIANTS["tiny"]).requires_grad_(False)
    block = (dit.double_blocks if kind == "double" else dit.single_blocks)[0].to(torch.bfloat16)
    fp8_block = copy.deepcopy(block)
    assert use_fp8_matmuls(fp8_block, lambda name, m: True) == (8 if kind == "double" else 2)
    results = []
    for b in (block, fp8_block):
        args = block_inputs(dit, torch.bfloat16)[kind]
        out = b(*args)
        out = out[0] if kind == "double" else out
        out.float().square().sum().backward()
        results.append((out.detach(), args[0].grad))
    (out, grad), (out8, grad8) = results
    assert out8.dtype == torch.bfloat16
    assert rel_err(out8, out) < BLOCK_REL and rel_err(grad8, grad) < BLOCK_GRAD_REL


def test_lora_beside_the_fp8_product_trains_and_merges():
    torch.manual_seed(0)
    fp8 = Fp8MatmulLinear(torch.randn(64, 32) * 0.1, None)
    lora = LoRAModule("x", 32, 64, rank=4, alpha=4)
    torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
    lora.attach(fp8)
    x = torch.randn(3, 32)
    out = fp8(x)
    out.square().sum().backward()
    assert lora.lora_down.weight.grad is not None and lora.lora_down.weight.dtype == torch.float32
    lora.remove()
    add_to_weight(fp8, lora.weight_delta())  # re-quantised with its row-wise block size
    assert fp8.scale_weight.shape == (64, 1, 1) and rel_err(fp8(x), out.detach()) < PRODUCT_REL


def test_training_with_fp8_matmuls_through_the_cli(pipeline):
    assert main(["train", "--params", str(pipeline / "params.yaml"), "--fp8_matmul", "--max_train_steps", "3",
                 "--save_every_n_steps", "0"]) == 0
    summary = json.loads((pipeline / "metrics" / "train.json").read_text())
    assert summary["steps"] == 3 and summary["bad_steps"] == 0
    assert 0 < summary["final_loss"] < 10


def test_the_dit_block_linears_are_replaced():
    dit = Flux2Transformer(VARIANTS["tiny"])
    n = use_fp8_matmuls(dit, dit_block_linear)
    assert n == 2 * 8 + 2 * 2
    assert isinstance(dit.single_blocks[1].linear2, Fp8MatmulLinear) and type(dit.img_in) is torch.nn.Linear


@pytest.mark.parametrize("mode", ["nf4", "int8", "fp8"])
def test_a_linear_stored_quantised_is_not_replaced_again(mode):
    """Both replacements take plain nn.Linears only: bitsandbytes' NF4 and int8 layers are nn.Linear subclasses
    whose packed weights must not be quantised again (fp8 layers are no nn.Linear at all)."""
    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 0.1
    for replace, made in ((quantize_linears, "Fp8Linear"), (use_fp8_matmuls, "Fp8MatmulLinear")):
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), quantised(mode, weight))
        stored = model[1]
        assert replace(model, lambda name, m: True) == 1
        assert type(model[0]).__name__ == made and model[1] is stored
