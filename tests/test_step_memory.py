"""bench/step_memory.py: the GPU memory of a training step counted on fake tensors. What makes the count right
is checked here at tiny sizes: fake tensors allocate what real ones do, the weights and LoRA counted are the
memory table's exact bytes, the NF4 stand-in allocates and computes what Nf4Linear does, and the CUDA autocast
rule for layer_norm holds only inside the count."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flux2.variants import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import memory  # noqa: E402  (bench/memory.py)
import step_memory  # noqa: E402  (bench/step_memory.py)


@pytest.mark.parametrize("switch", step_memory.SWITCHES)
def test_fake_tensors_count_what_real_ones_allocate(switch):
    fake = step_memory.count_step("tiny", switch, 64, rank=4, fake=True, text_tokens=16)
    real = step_memory.count_step("tiny", switch, 64, rank=4, fake=False, text_tokens=16)
    assert fake == real
    assert fake["weights"] == memory.dit_bytes(VARIANTS["tiny"], switch)
    assert fake["lora"] == memory.lora_bytes(VARIANTS["tiny"], 4)
    assert fake["grads"] == sum(memory.lora_numels(VARIANTS["tiny"], 4)) * 4  # float32 LoRA gradients
    assert fake["peak"] > fake["resident"] == fake["weights"] + fake["lora"] + fake["optimizer_state"]


def test_the_reference_is_counted_the_same_way():
    """diffusers + PEFT (bf16 weights, float32 LoRA), as bench/train_step.py builds it: fake tensors count what
    real ones allocate, and the weights are the same bytes as ours."""
    fake = step_memory.count_step("tiny", "bf16", 64, rank=4, impl="diffusers", fake=True, text_tokens=16)
    real = step_memory.count_step("tiny", "bf16", 64, rank=4, impl="diffusers", fake=False, text_tokens=16)
    assert fake == real and fake["impl"] == "diffusers"
    assert fake["weights"] == memory.dit_bytes(VARIANTS["tiny"], "bf16") and fake["peak"] > fake["resident"]


def test_live_bytes_counts_each_storage_once_while_it_lives():
    counter = step_memory.LiveBytes()
    with counter:
        x = torch.empty(1000)  # 4000 bytes
        view = x[10:]  # the same storage
        y = torch.empty(250, dtype=torch.bfloat16)  # 500 bytes
        assert counter.live == 4500
        del x, y
        assert counter.live == 4000  # the view keeps x's storage
        del view
        assert counter.live == 0
    assert counter.peak == 4500


def test_counted_nf4_linear_is_nf4_linear():
    """The stand-in holds Nf4Linear's tensors, computes its output and input gradient, and allocates the same."""
    from flux2.bnb_linear import Nf4Builder

    torch.manual_seed(0)
    build = Nf4Builder(96, 128, torch.bfloat16, "cpu")
    build.add(0, torch.randn(96, 128, dtype=torch.bfloat16))
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    results = []
    for module in (build.finish(), step_memory.CountedNf4Linear(build.packed, build.quant_state())):
        xi = x.clone().requires_grad_(True)
        counter = step_memory.LiveBytes()
        counter.hold(step_memory.model_tensors(module))
        with counter:
            y = module(xi)
            y.float().square().sum().backward()
        results.append((y.detach(), xi.grad, counter.peak))
    (y1, g1, peak1), (y2, g2, peak2) = results
    assert torch.equal(y1, y2) and torch.equal(g1, g2) and peak1 == peak2


def test_layer_norm_runs_in_float32_only_inside_the_count():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with step_memory.cuda_autocast_layer_norm(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.layer_norm(x, (8,)).dtype == torch.float32  # CUDA autocast's rule
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.layer_norm(x, (8,)).dtype == torch.bfloat16  # the CPU's own again


def test_command_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert step_memory.main(["--variants", "tiny", "--switches", "nf4", "--res", "64", "--rank", "4",
                             "--optimizer", "adamw", "adamw8bit", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(step_memory.HEADER) and "| flux2 | tiny | nf4 | 64^2 | yes | adamw8bit |" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["optimizer"] for r in rows] == ["adamw", "adamw8bit"]
    assert rows[1]["peak"] - rows[0]["peak"] == rows[1]["optimizer_state"] - rows[0]["optimizer_state"] < 0
