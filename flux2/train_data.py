"""Training batches from the caches: which items, in which order, with which noise - all from the seed.

Items (manifest rows of the train split, repeated `num_repeats` times) are grouped by batch size (their source's
`batch_size`, else train.batch_size) and shape: bucket size and the shapes of their control latents, so a batch
stacks. Each epoch's order is a permutation drawn from (seed, epoch). One optimizer step consumes a global batch
of `batch_size * world_size * accumulation` items of one group; each process takes its slice of each of its
micro-batches. Items with a loss mask carry it (1, h, w) into the batch; the others weigh 1 everywhere. Noise,
timesteps and caption dropout of a sample are drawn from a generator seeded by (seed, step, position in the
global batch), so a resumed run, a multi-process run and a run with gradient accumulation see exactly what an
uninterrupted single-process run with the whole batch sees.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flux2.cache_latents import read_item_map
from flux2.cache_store import CacheError, CacheReader, check_cache_compatible
from flux2.cache_text import read_prompt_map
from flux2.ingest import read_manifest
from flux2.params import ModelParams
from flux2.variants import Variant

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant for mixing seeds


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (order matters)."""
    h = 0
    for v in values:
        h = (h * _MIX + v + 1) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def model_fingerprints(model: ModelParams, base: Path) -> tuple[str, str]:
    """(autoencoder, text encoder) fingerprints of the files `model` names (relative to `base`), to hold the
    caches against: a cache made by other weights of the same shapes is refused."""
    from flux2.cache_latents import ae_fingerprint
    from flux2.cache_text import text_fingerprint

    tokenizer = base / model.tokenizer if model.tokenizer else None
    return ae_fingerprint(base / model.vae), text_fingerprint(base / model.text_encoder, tokenizer)


@dataclass(frozen=True)
class Item:
    id: str
    latent_key: str
    control_keys: tuple[str, ...]
    caption_key: str
    group: tuple  # (batch size, shapes): items of one group stack into a batch
    mask_key: str | None = None


@dataclass
class Batch:
    latents: Tensor  # (B, 128, h, w)
    ctx: Tensor  # (B, L, C)
    controls: list[Tensor]  # per reference image k: (B, 128, h_k, w_k)
    noise: Tensor  # (B, 128, h, w)
    normal: Tensor  # (B,) standard normal draws for the timestep sampler
    uniform: Tensor  # (B,) uniform draws for the timestep sampler
    ids: list[str]
    masks: Tensor | None = None  # (B, 1, h, w) loss weights in [0, 1]; None: no item of the batch has a mask


class TrainData:
    """The training split of a manifest, readable batch by batch from the latent and text caches."""

    def __init__(self, manifest: str | Path, latents_dir: str | Path, text_dir: str | Path, variant: Variant,
                 batch_size: int, world_size: int = 1, seed: int = 0, caption_dropout_rate: float = 0.0,
                 accumulation: int = 1, ae_fingerprint: str | None = None, text_fingerprint: str | None = None,
                 masked_loss: bool = True):
        self.latents = CacheReader(latents_dir)
        self.text = CacheReader(text_dir)
        # The fingerprints of the model files this run names: a cache made by other weights of the same shapes
        # would train on embeddings the model at inference never produces.
        check_cache_compatible(self.latents, variant, "latents", fingerprint=ae_fingerprint)
        check_cache_compatible(self.text, variant, "text", fingerprint=text_fingerprint)
        item_map = read_item_map(latents_dir)
        prompt_map = read_prompt_map(text_dir)
        if "" not in prompt_map:
            raise CacheError(f"{text_dir} has no empty-caption embedding: rerun cache_text")
        self.empty_key = prompt_map[""]
        self.items: list[Item] = []
        for row in read_manifest(manifest):
            if row["split"] != "train":
                continue
            lat = item_map.get(row["id"])
            key = prompt_map.get(row["caption"])
            if lat is None or key is None:
                missing = "cache_latents" if lat is None else "cache_text"
                raise CacheError(f"manifest item {row['id']} ({row['image_path']}) is not in the caches: rerun "
                                 f"{missing} (dvc repro)")
            size = int(row.get("batch_size") or batch_size)
            group = (size, self.latents.shape(lat.latent_key)) + tuple(self.latents.shape(k)
                                                                      for k in lat.control_keys)
            item = Item(row["id"], lat.latent_key, tuple(lat.control_keys), key, group,
                        lat.mask_key if masked_loss else None)
            self.items += [item] * int(row["num_repeats"])
        if not self.items:
            raise CacheError(f"{manifest} has no training items (all in the hold-out split?): lower "
                             f"eval.holdout_fraction or add images")
        self.world_size = world_size
        self.accumulation = accumulation
        self.seed = seed
        self.caption_dropout_rate = caption_dropout_rate
        self._epoch: tuple[int, list[list[int]]] | None = None
        self.batches_per_epoch = len(self.epoch_batches(0))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Global batches (lists of item indices) of one epoch, one per optimizer step, in order."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(self.items):
            groups.setdefault(item.group, []).append(i)
        batches = []
        for key in sorted(groups):
            members = groups[key]
            order = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
            size = key[0] * self.world_size * self.accumulation
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                # A short last batch is filled up from the group's start, so every batch is full (equal
                # per-process batches keep multi-process gradients equal to single-process ones).
                while len(chunk) < size:
                    chunk.append(order[(len(chunk) - len(order[start:])) % len(order)])
                batches.append(chunk)
        return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]

    def micro_batch(self, step: int, micro: int = 0, rank: int = 0) -> Batch:
        """This process's slice of micro-batch `micro` of optimizer step `step` (epochs run on)."""
        epoch, pos = divmod(step, self.batches_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.epoch_batches(epoch))
        global_items = self._epoch[1][pos]
        size = len(global_items) // (self.world_size * self.accumulation)  # this group's batch size
        lo = (micro * self.world_size + rank) * size
        mine = global_items[lo : lo + size]
        latents, ctx, noise, normal, uniform, masks = [], [], [], [], [], []
        controls: list[list[Tensor]] = [[] for _ in self.items[mine[0]].control_keys]
        masked = any(self.items[i].mask_key for i in mine)  # a batch without masks carries none
        for j, item_index in enumerate(mine):
            item = self.items[item_index]
            g = torch.Generator().manual_seed(mix_seed(self.seed, step, lo + j))
            x0 = self.latents.get(item.latent_key).float()
            latents.append(x0)
            noise.append(torch.randn(x0.shape, generator=g))
            normal.append(torch.randn((), generator=g))
            uniform.append(torch.rand((), generator=g))
            drop = torch.rand((), generator=g).item() < self.caption_dropout_rate
            ctx.append(self.text.get(self.empty_key if drop else item.caption_key))
            for k, key in enumerate(item.control_keys):
                controls[k].append(self.latents.get(key).float())
            if masked:
                masks.append(self.latents.get(item.mask_key).float() if item.mask_key else torch.ones(1, *x0.shape[1:]))
        return Batch(torch.stack(latents), torch.stack(ctx), [torch.stack(c) for c in controls], torch.stack(noise),
                     torch.stack(normal), torch.stack(uniform), [self.items[i].id for i in mine],
                     torch.stack(masks) if masked else None)
