"""Speed switches of training: no host reads between logged steps (the non-finite skip decided on the device,
exactly), checkpointing of only some blocks, and the params.yaml schema of the speed options (train.compile:
auto | true | false, the YAML bool or the word). Compiling through the CLI: tests/test_compile.py."""
from __future__ import annotations

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from flux2.model import Flux2Transformer
from flux2.params import ParamsError, load_params, parse_params
from flux2.train import finish, optimizer_step, resume, setup, train_step
from flux2.variants import VARIANTS
from tests.conftest import dit_inputs

HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy}


# The data pipeline reads its own host tensors (shuffles, cache offsets): those never live on the GPU.
HOST_SIDE = ("flux2/train_data.py", "flux2/cache_store.py")


class CountHostReads(TorchFunctionMode):
    """Counts the calls that copy a tensor's value to Python (on a GPU each waits for all queued work), except
    those of the data pipeline on its host tensors."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            ours = [f.filename for f in traceback.extract_stack() if "/flux2/" in f.filename]
            if not (ours and ours[-1].endswith(HOST_SIDE)):
                self.reads.append(f"{func.__name__} in {ours[-1] if ours else '?'}")
        return func(*args, **(kwargs or {}))


def test_training_reads_the_device_only_when_it_logs(pipeline):
    p = load_params(pipeline / "params.yaml")
    p.train.log_every_n_steps, p.train.save_every_n_steps, p.train.max_train_steps = 4, 0, 8
    tr = setup(p, pipeline)
    prog = resume(tr)
    after_each = []
    with CountHostReads() as counter:
        for _ in range(8):
            train_step(tr, prog)
            after_each.append(len(counter.reads))
    # Step 4 reads steps 1-3 in one transfer (the newest is left queued), step 8 reads 4-7; finish reads step 8.
    assert after_each == [0, 0, 0, 1, 1, 1, 1, 2], counter.reads
    assert [s for s, _, _ in prog.state.history] == [1, 2, 3, 4, 5, 6, 7]
    result = finish(tr, prog)
    history = prog.state.history
    assert [s for s, _, _ in history] == list(range(1, 9)) and result.final_loss == history[-1][1]


@pytest.mark.parametrize("fused", [True, False], ids=["fused_on_device", "host_flag"])
def test_a_non_finite_step_leaves_weights_and_optimizer_state_untouched(fused):
    w = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([w], lr=0.1, fused=fused)
    w.grad = torch.ones(4)
    optimizer_step([w], optimizer, torch.tensor(1.0), 1.0)  # a good step: state exists
    before = w.detach().clone(), {k: v.clone() for k, v in optimizer.state[w].items()}
    for bad in (float("nan"), float("inf")):
        w.grad = torch.full((4,), bad)
        values, stepped = optimizer_step([w], optimizer, torch.tensor(2.0), 1.0)
        assert not stepped and not torch.isfinite(values).all()
        assert torch.equal(w.detach(), before[0]) and w.grad is None
        assert all(torch.equal(optimizer.state[w][k], v) for k, v in before[1].items())  # the step count too
    w.grad = torch.ones(4)
    optimizer_step([w], optimizer, torch.tensor(1.0), 1.0)
    assert float(optimizer.state[w]["step"]) == 2 and not torch.equal(w.detach(), before[0])


def test_checkpointing_some_blocks_recomputes_only_those_with_equal_gradients():
    variant = VARIANTS["tiny"]
    args = dit_inputs(variant, seed=1)
    grads, calls = {}, {}
    for blocks in ("off", None, 1, 3):
        torch.manual_seed(0)
        model = Flux2Transformer(variant).train()
        model.gradient_checkpointing, model.checkpoint_blocks = blocks != "off", None if blocks == "off" else blocks
        counts = [0] * 4
        for i, block in enumerate([*model.double_blocks, *model.single_blocks]):
            block.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
        model(*args).square().mean().backward()
        grads[blocks] = [p.grad for p in model.parameters()]
        calls[blocks] = counts
    assert calls == {"off": [1, 1, 1, 1], None: [2, 2, 2, 2], 1: [2, 1, 1, 1], 3: [2, 2, 2, 1]}
    for blocks in (None, 1, 3):
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads[blocks], grads["off"]))


def minimal(train: dict) -> dict:
    return {"dataset": {"sources": [{"image_directory": "x"}]}, "train": train}


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), ("auto", "auto"), ("true", True),
                                            ("False", False)])
def test_compile_takes_the_yaml_bool_or_the_word(value, expected):
    assert parse_params(minimal({"compile": value})).train.compile == expected


def test_speed_options_are_validated_naming_the_key():
    with pytest.raises(ParamsError, match=r"train.compile: 'yes' is not one of auto, true, false"):
        parse_params(minimal({"compile": "yes"}))
    with pytest.raises(ParamsError, match=r"train.gradient_checkpointing_blocks: 5 is outside 0..4 \(the tiny DiT"):
        parse_params(minimal({"gradient_checkpointing_blocks": 5}))
    assert parse_params(minimal({"gradient_checkpointing_blocks": 2})).train.gradient_checkpointing_blocks == 2


def test_an_attention_backend_gives_the_same_outputs_and_gradients():
    """model.attention_backend picks one SDPA kernel for every block (on a CPU: flash or math); tolerance rel 1e-5
    (float32), with gradient checkpointing, so the recompute uses the same kernel."""
    variant = VARIANTS["tiny"]
    args = dit_inputs(variant, seed=2)
    results = {}
    for backend in ("auto", "math", "flash"):
        torch.manual_seed(0)
        model = Flux2Transformer(variant).train()
        model.gradient_checkpointing = True
        model.set_attention_backend(backend)
        out = model(*args)
        out.square().mean().backward()
        results[backend] = out.detach(), model.single_blocks[0].linear1.weight.grad
    for backend in ("math", "flash"):
        for a, b in zip(results[backend], results["auto"]):
            assert ((a - b).norm() / b.norm()) < 1e-5
    with pytest.raises(ValueError, match="model.attention_backend: 'fast' is not one of auto, flash, cudnn"):
        model.set_attention_backend("fast")
    with pytest.raises(ParamsError, match="model.attention_backend: 'fast' is not one of"):
        parse_params({**minimal({}), "model": {"attention_backend": "fast"}})
