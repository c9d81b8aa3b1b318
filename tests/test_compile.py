"""train.compile / generate --compile (flux2/compile.py): one compiled forward per block kind, LoRA hooks traced
into it, no recompiles between steps of one shape, gradient checkpointing (inside the compiled graph, or around it
for blocks with hooks such as block swap's) working with it, and a clear message with an eager fallback when the
compiler fails.

The graphs are compiled with a recording backend that runs the captured graph as it is (what dynamo captures,
guards and reuses is the same for every backend; generating code with inductor costs 78 s cold for the tiny DiT
on this machine, so the inductor build is exercised by bench/train_step.py instead). Tolerance of the compiled
path against eager: rel 1e-5 on outputs and LoRA gradients (float32).
"""
from __future__ import annotations

import pytest
import torch

from flux2.block_swap import BlockSwap
from flux2.compile import compile_blocks, is_compiled, uncompile_blocks
from flux2.lora import create_network
from flux2.model import Flux2Transformer
from tests.conftest import dit_inputs, generate_args, random_dit, rel_err

REL = 1e-5


GRAPHS: list[torch.fx.GraphModule] = []
BACKEND = "flux2_test_recorder"


def record(gm: torch.fx.GraphModule, example_inputs):
    """A torch.compile backend that keeps every graph it is handed and runs it unchanged. One backend for the
    whole module, so compiled code is shared between tests as between blocks (dynamo reuses it for a new model
    of the same shapes)."""
    GRAPHS.append(gm)
    return gm.forward


if BACKEND not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(record, name=BACKEND)


def lora_dit(seed: int = 0) -> tuple[Flux2Transformer, torch.nn.Module]:
    dit = random_dit(seed=seed)
    dit.requires_grad_(False)
    dit.gradient_checkpointing = True
    network = create_network(dit, 4, 4)
    with torch.no_grad():
        for m in network.lora_modules:
            m.lora_up.weight.normal_(0, 0.05)  # non-zero, so every LoRA weight gets a gradient
    network.apply_to(dit)
    return dit.train(), network


def step(dit, network, seed: int):
    out = dit(*dit_inputs(batch=2, seed=seed))
    out.square().mean().backward()
    grads = [p.grad.clone() for p in network.parameters()]
    network.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.fixture(scope="module")
def compiled():
    """The tiny DiT with a LoRA, its eager results for three steps, then compiled (graphs recorded) and run the same
    three steps; shared by the tests below."""
    dit, network = lora_dit()
    eager = [step(dit, network, s) for s in range(3)]
    assert compile_blocks(dit, BACKEND)
    before = len(GRAPHS)
    first = step(dit, network, 0)
    after_first = len(GRAPHS)
    rest = [step(dit, network, s) for s in (1, 2)]
    yield dict(dit=dit, network=network, eager=eager, results=[first, *rest], graphs=GRAPHS[before:],
               after_first=after_first - before)
    uncompile_blocks(dit)


def test_compiled_steps_match_eager_with_gradient_checkpointing(compiled):
    dit = compiled["dit"]
    assert is_compiled(dit) and dit.gradient_checkpointing
    assert all(block.in_graph_checkpoint for block in [*dit.double_blocks, *dit.single_blocks])  # inside the graph
    for (out_e, grads_e), (out_c, grads_c) in zip(compiled["eager"], compiled["results"]):
        assert rel_err(out_c, out_e) < REL
        assert all(rel_err(c, e) < REL for c, e in zip(grads_c, grads_e))


def test_one_graph_cache_per_block_kind_and_no_recompiles_between_steps(compiled):
    # Double blocks: the first one's inputs need no gradient, the second's do (two graphs); single blocks: one.
    # Gradient checkpointing's recompute in the backward pass reuses them. Steps 2 and 3 compile nothing.
    assert compiled["after_first"] == len(compiled["graphs"]) == 3


def test_lora_hooks_are_traced_into_the_block_graphs(compiled):
    for gm in compiled["graphs"]:
        inputs_ = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        assert any("lora_down" in name for name in inputs_), inputs_
        assert any("lora_up" in name for name in inputs_)


def test_block_swap_hooks_stay_outside_the_compiled_forward():
    """Block swap replaces a block's frozen tensors in its pre-hook; the compiled forward computes with them."""
    reference, ref_net = lora_dit()
    dit, network = lora_dit()
    swap = BlockSwap(dit, 1, 1, torch.device("cpu"))
    assert swap.swapped == [1, 3]
    assert compile_blocks(dit, BACKEND)
    assert not any(hasattr(b, "in_graph_checkpoint") for b in swap.blocks)  # checkpointed around the graph
    for seed in (0, 1):
        out_c, grads_c = step(dit, network, seed)
        out_e, grads_e = step(reference, ref_net, seed)
        assert rel_err(out_c, out_e) < REL and all(rel_err(c, e) < REL for c, e in zip(grads_c, grads_e))
    assert swap.installed == {}


def test_a_missing_compiler_is_reported_and_the_model_stays_eager(capsys):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    dit, _ = lora_dit()
    assert not compile_blocks(dit, broken)
    out = capsys.readouterr().out
    assert "torch.compile (backend broken) does not work here, training and sampling eager" in out
    assert "no C++ compiler found" in out and "set compile to false" in out
    assert not is_compiled(dit)


def test_a_block_that_fails_to_compile_runs_eager(capsys):
    def small_graphs_only(gm, example_inputs):
        if len(gm.graph.nodes) > 20:  # the probe passes, the blocks do not
            raise RuntimeError("unsupported operator")
        return gm.forward

    dit, network = lora_dit()
    reference, ref_net = lora_dit()
    assert compile_blocks(dit, small_graphs_only)
    out_c, grads_c = step(dit, network, 0)
    out_e, grads_e = step(reference, ref_net, 0)
    assert torch.equal(out_c, out_e) and all(torch.equal(c, e) for c, e in zip(grads_c, grads_e))
    printed = capsys.readouterr().out
    assert "compiling DoubleStreamBlock failed" in printed and "unsupported operator" in printed
    assert "running it eager" in printed


def test_train_and_generate_compile_through_the_cli(pipeline, tiny_model, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from flux2.cli import main

    monkeypatch.setenv("FLUX2_COMPILE_BACKEND", BACKEND)
    before = len(GRAPHS)
    assert main(["train", "--params", str(pipeline / "params.yaml"), "--compile", "true", "--max_train_steps", "3",
                 "--save_every_n_steps", "0", "--gradient_checkpointing", "--gradient_checkpointing_blocks",
                 "2"]) == 0
    assert len(GRAPHS) > before  # the blocks were compiled
    out = tmp_path / "generated"
    before = len(GRAPHS)
    assert main(generate_args(tiny_model, out, "--prompt", "a red circle", "--image_size", "64", "64", "--infer_steps",
                              "2", "--seed", "1", "--output_type", "latent", "--compile", "true")) == 0
    (path,) = out.glob("*_latent.safetensors")
    assert torch.isfinite(load_file(path)["latent"]).all()
    assert len(GRAPHS) > before  # sampling ran the compiled blocks (no-grad graphs)
    assert "warning" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "--compile COMPILE" in help_text and "default: 'auto'" in help_text
    assert "--gradient_checkpointing_blocks" in help_text
