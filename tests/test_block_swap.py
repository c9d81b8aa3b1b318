"""--blocks_to_swap: the split of N into double/single blocks, the option's errors, and the hook logic.

The hooks run on CPU here through BlockSwap with a CPU device (synchronous copies, no streams): the same code
that installs the copies, restores the originals and re-fetches under gradient checkpointing. The CUDA stream
path is covered by the test at the end, which only runs where a GPU is present.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from flux2.block_swap import NO_CUDA, BlockSwap, enable_block_swap, max_blocks_to_swap, split_blocks_to_swap
from flux2.model import Flux2Transformer
from flux2.variants import VARIANTS
from tests.conftest import dit_inputs, random_dit

OFFICIAL = ["dev", "klein-4b", "klein-base-4b", "klein-9b", "klein-base-9b"]
# A tiny-width variant with enough blocks to swap some (the real tiny's 2 + 2 blocks allow none).
SWAPPY = replace(VARIANTS["tiny"], name="tiny-deep", depth=4, depth_single_blocks=6, max_blocks_to_swap=4)

# The seed's split (musubi-tuner) at a few N: (variant, N) -> (double, single).
SPLITS = {
    ("dev", 1): (0, 0), ("dev", 3): (1, 6), ("dev", 12): (3, 18), ("dev", 24): (6, 36), ("dev", 29): (6, 44),
    ("klein-4b", 1): (0, 0), ("klein-4b", 2): (1, 4), ("klein-4b", 10): (3, 12), ("klein-4b", 13): (3, 18),
    ("klein-9b", 2): (1, 3), ("klein-9b", 9): (4, 12), ("klein-9b", 16): (6, 18),
    ("klein-base-9b", 16): (6, 18), ("klein-base-4b", 13): (3, 18),
}


@pytest.mark.parametrize("name", OFFICIAL)
def test_maximum_matches_the_variant_table(name):
    v = VARIANTS[name]
    assert max_blocks_to_swap(v.depth, v.depth_single_blocks) == v.max_blocks_to_swap


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_allowed_n_splits_within_bounds(name):
    v = VARIANTS[name]
    maximum = max_blocks_to_swap(v.depth, v.depth_single_blocks)
    previous = (0, 0)
    for n in range(1, maximum + 1):
        double, single = split_blocks_to_swap(n, v)
        assert 0 <= double <= v.depth - 2 and 0 <= single <= v.depth_single_blocks - 2
        assert double + single / 2 >= previous[0] + previous[1] / 2  # more N never streams less
        previous = (double, single)
    with pytest.raises(ValueError, match=f"--blocks_to_swap {maximum + 1} is too many for {name}: at most "
                                         f"{maximum}"):
        split_blocks_to_swap(maximum + 1, v)


@pytest.mark.parametrize("key", list(SPLITS), ids=[f"{k[0]}-{k[1]}" for k in SPLITS])
def test_split_table(key):
    name, n = key
    assert split_blocks_to_swap(n, VARIANTS[name]) == SPLITS[key]


def test_tiny_has_too_few_blocks():
    tiny = VARIANTS["tiny"]
    assert max_blocks_to_swap(tiny.depth, tiny.depth_single_blocks) == 0
    with pytest.raises(ValueError, match="at most 0"):
        split_blocks_to_swap(1, tiny)


@pytest.mark.parametrize("n", [0, -3])
def test_zero_or_negative_is_a_no_op(n):
    model = random_model(SWAPPY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert split_blocks_to_swap(n, VARIANTS["dev"]) == (0, 0)
    assert enable_block_swap(model, n, "cpu") is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(b._forward_pre_hooks for b in model.double_blocks)


def test_n_that_splits_into_nothing_is_a_no_op():
    with torch.device("meta"):
        model = Flux2Transformer(VARIANTS["dev"])
    assert enable_block_swap(model, 2, "cpu") is None  # dev: N = 1, 2 round to (0, 0)


def test_too_many_names_the_maximum():
    with torch.device("meta"):
        model = Flux2Transformer(VARIANTS["klein-4b"])
    with pytest.raises(ValueError, match="too many for klein-4b: at most 13"):
        enable_block_swap(model, 14, "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("device", [None, "cpu", "cuda"])
def test_needs_cuda(device):
    model = random_model(SWAPPY)  # on the CPU
    with pytest.raises(ValueError, match="needs a CUDA GPU; on CPU the whole model is already in RAM, drop the "
                                         "option"):
        enable_block_swap(model, 3, device)
    assert NO_CUDA.startswith("--blocks_to_swap")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("device", [None, "cpu"])
def test_cpu_is_refused_even_with_cuda(device):
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        enable_block_swap(random_model(SWAPPY), 3, device)  # None: where the model is, the CPU


# ------------------------------------------------------------------ the hooks, on CPU


def random_model(variant=SWAPPY) -> Flux2Transformer:
    """A random DiT, frozen: block swap moves the frozen tensors only."""
    return random_dit(variant).requires_grad_(False)


def frozen_tensors(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t for n, t in [*block.named_parameters(), *block.named_buffers()] if not t.requires_grad}


def test_hooks_compute_with_copies_and_restore_originals():
    model, reference = random_model(), random_model()
    swap = BlockSwap(model, 2, 3, torch.device("cpu"))
    assert swap.swapped == [2, 3, 7, 8, 9]
    originals = {pos: frozen_tensors(swap.blocks[pos]) for pos in swap.swapped}
    seen = {}

    def spy(pos):
        def hook(block, args):  # runs after BlockSwap's pre-hook: the block holds its device copies
            seen[pos] = {n: t is originals[pos][n] for n, t in frozen_tensors(block).items()}
        return hook

    for pos in swap.swapped:
        swap.blocks[pos].register_forward_pre_hook(spy(pos))
    with torch.no_grad():
        out = model(*dit_inputs(SWAPPY))
        torch.testing.assert_close(out, reference(*dit_inputs(SWAPPY)), rtol=0, atol=0)
    assert seen.keys() == set(swap.swapped)
    assert not any(any(v.values()) for v in seen.values())  # every frozen tensor was a copy during forward
    for pos in swap.swapped:  # and the very same original objects afterwards
        assert all(t is originals[pos][n] for n, t in frozen_tensors(swap.blocks[pos]).items())
    assert swap.installed == {} and swap.pending == {}

    swap.remove()
    assert not any(b._forward_hooks for b in swap.blocks)
    assert [len(b._forward_pre_hooks) for b in swap.blocks] == [int(pos in swap.swapped) for pos in range(10)]


def watch(swap: BlockSwap) -> list[tuple[int, bool, list[int]]]:
    """Record, as each block starts (after BlockSwap's own pre-hook), its position, whether it holds device
    copies, and which block is being prefetched."""
    log = []
    for pos, block in enumerate(swap.blocks):
        block.register_forward_pre_hook(
            lambda block, args, pos=pos: log.append((pos, pos in swap.installed, sorted(swap.pending))))
    return log


def test_prefetches_the_next_swapped_block():
    model = random_model()
    swap = BlockSwap(model, 2, 3, torch.device("cpu"))
    log = watch(swap)
    with torch.no_grad():
        model(*dit_inputs(SWAPPY))
    assert log == [(0, False, [2]), (1, False, [2]), (2, True, [3]), (3, True, [7]), (4, False, [7]),
                   (5, False, [7]), (6, False, [7]), (7, True, [8]), (8, True, [9]), (9, True, [])]


def test_forward_error_restores_originals():
    model = random_model()
    swap = BlockSwap(model, 1, 1, torch.device("cpu"))
    block = model.single_blocks[-1]
    before = frozen_tensors(block)
    with pytest.raises(Exception):
        block(torch.zeros(1, 3, 7), None, None)
    assert all(t is before[n] for n, t in frozen_tensors(block).items())
    assert swap.installed == {}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_gradients_match(checkpointing):
    """A trainable weight inside swapped blocks (as LoRA would be) gets the same gradient; with gradient
    checkpointing the recompute in the backward pass re-fetches the swapped blocks."""
    model, reference = random_model(), random_model()
    for m in (model, reference):
        m.gradient_checkpointing = checkpointing
        m.single_blocks[-1].linear2.weight.requires_grad_(True)
        m.double_blocks[-1].img_attn.proj.weight.requires_grad_(True)
    swap = BlockSwap(model, 2, 3, torch.device("cpu"))
    log = watch(swap)

    x, x_ids, t, ctx, ctx_ids = dit_inputs(SWAPPY)
    model(x, x_ids, t, ctx, ctx_ids).square().mean().backward()
    reference(x, x_ids, t, ctx, ctx_ids).square().mean().backward()
    for name in ("single_blocks.5.linear2.weight", "double_blocks.3.img_attn.proj.weight"):
        a, b = model.get_parameter(name), reference.get_parameter(name)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    forward = [(pos, pos in swap.swapped) for pos in range(10)]
    assert [(pos, installed) for pos, installed, _ in log[:10]] == forward
    if checkpointing:
        # The recompute runs the blocks in reverse, down to the first with a trainable weight (double block 3),
        # each swapped block fetched again; the prefetch follows the reverse order.
        assert log[10:] == [(9, True, [8]), (8, True, [7]), (7, True, [3]), (6, False, [3]), (5, False, [3]),
                            (4, False, [3]), (3, True, [2])]
    else:
        assert len(log) == 10
    assert swap.installed == {}


def test_trainable_parameter_on_another_device_is_reported():
    model = random_model()
    BlockSwap(model, 1, 1, torch.device("cpu"))
    # e.g. a LoRA weight added afterwards and left somewhere else (the meta device stands in for "elsewhere")
    model.single_blocks[-1].linear1.weight = torch.nn.Parameter(torch.empty(1, device="meta"))
    with pytest.raises(RuntimeError, match="trainable parameter single_blocks.5.linear1.weight is on meta, not "
                                           "cpu; enable block swap after adding LoRA layers"):
        model.single_blocks[-1](None, None, None)


# ------------------------------------------------------------------ CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_cuda_streaming_matches_resident_model(checkpointing):
    device = torch.device("cuda")
    reference = random_model().to(device)
    model = random_model()  # loaded on the CPU, as with a model too big for the GPU
    for m in (model, reference):
        m.gradient_checkpointing = checkpointing
        m.single_blocks[-1].linear2.weight.requires_grad_(True)
    swap = enable_block_swap(model, 3, device)
    assert swap is not None and (len(swap.swapped)) == sum(split_blocks_to_swap(3, SWAPPY))
    assert model.single_blocks[-1].linear1.weight.device.type == "cpu"
    assert model.single_blocks[-1].linear1.weight.is_pinned()
    assert model.single_blocks[-1].linear2.weight.device == reference.img_in.weight.device  # trainable: on GPU
    assert model.img_in.weight.device.type == "cuda"
    args = [a.to(device) for a in dit_inputs(SWAPPY, batch=2, h=8, w=8)]
    for _ in range(2):  # twice: the second forward starts from the state the first left
        with torch.no_grad():
            torch.testing.assert_close(model(*args), reference(*args), rtol=1e-5, atol=1e-5)
    model(*args).square().mean().backward()
    reference(*args).square().mean().backward()
    torch.testing.assert_close(model.single_blocks[-1].linear2.weight.grad,
                               reference.single_blocks[-1].linear2.weight.grad, rtol=1e-4, atol=1e-6)
    torch.cuda.synchronize()
