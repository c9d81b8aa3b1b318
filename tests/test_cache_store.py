"""The cache store: shards + index, incremental builds, checksums, GC, compatibility checks, prompt files.

No models here: a deterministic stand-in encoder (a tensor computed from the payload) exercises build_cache.
"""
import dataclasses
import pickle

import pyarrow.parquet as pq
import pytest
import torch

from flux2.cache_store import (COMPACT_BELOW, INDEX_FILE, SHARD_DIR, CacheCorruptError, CacheError, CacheReader,
                               Job, ShardWriter, build_cache, check_cache_compatible, content_key, read_index,
                               verify_entries, write_index)
from flux2.prompts import PromptFileError, SamplePrompt, parse_prompt_line, read_prompt_file
from flux2.text_encoder import TEMPLATE_VERSION
from flux2.variants import VARIANTS

META = {"kind": "latents", "variant": "tiny", "latent_channels": "128", "downscale": "16", "ae_fingerprint": "f"}


def value(payload: int, dtype=torch.float32) -> torch.Tensor:
    """The stand-in encoder's output for a payload: distinct, deterministic, 64 KB in float32."""
    g = torch.Generator().manual_seed(payload)
    return torch.randn(16, 32, 32, generator=g).to(dtype)


def jobs_for(payloads, tag="v1"):
    return [Job(content_key({"p": p, "tag": tag}), p, group=p % 2, label=f"item{p}") for p in payloads]


class Encoder:
    """Records what it was asked to encode."""

    def __init__(self, dtype=torch.float32):
        self.seen, self.dtype = [], dtype

    def load(self, batch):
        return [job.payload for job in batch]

    def __call__(self, payloads):
        self.seen += payloads
        return torch.stack([value(p, self.dtype) for p in payloads])


def build(tmp_path, jobs, enc=None, shard_mb=1, batch_size=3, meta=META):
    enc = enc or Encoder()
    stats = build_cache(tmp_path / "c", jobs, meta, enc.load, enc, batch_size=batch_size, shard_mb=shard_mb,
                        progress=False)
    return stats, enc


def shard_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "c" / SHARD_DIR).iterdir())


def test_content_key_is_stable_and_covers_every_field():
    a = content_key({"image": "ab", "w": 64, "h": 48})
    assert a == content_key({"h": 48, "w": 64, "image": "ab"}) and len(a) == 32
    assert a != content_key({"image": "ab", "w": 48, "h": 64})
    assert a != content_key({"image": "ab", "w": 64, "h": 48, "dtype": "bfloat16"})


def test_shards_are_bounded_and_index_describes_every_tensor(tmp_path):
    w = ShardWriter(tmp_path, META, shard_mb=1, prefix="t")
    tensors = {f"k{i}": value(i) for i in range(20)}  # 64 KB each -> 15 per 1 MB shard
    for k, t in tensors.items():
        w.add(k, t)
    rows = w.rows()
    write_index(tmp_path, rows, META)
    assert len({r["shard"] for r in rows}) == 2
    for shard in {r["shard"] for r in rows}:
        assert (tmp_path / shard).stat().st_size <= 1_000_000 + 4096
    reader = CacheReader(tmp_path)
    assert sorted(reader.keys()) == sorted(tensors) and len(reader) == 20 and "k3" in reader and "x" not in reader
    assert reader.meta["ae_fingerprint"] == "f"
    for k, t in tensors.items():
        assert torch.equal(reader.get(k), t)
    with pytest.raises(KeyError, match="not in the cache"):
        reader.get("missing")
    # Picklable for DataLoader workers: open handles are dropped, reopened on demand.
    clone = pickle.loads(pickle.dumps(reader))
    assert torch.equal(clone.get("k7"), tensors["k7"])


def test_bfloat16_round_trip_is_exact(tmp_path):
    stats, _ = build(tmp_path, jobs_for(range(4)), Encoder(torch.bfloat16))
    reader = CacheReader(tmp_path / "c")
    rows, _ = read_index(tmp_path / "c")
    assert {r["dtype"] for r in rows} == {"BF16"}
    for job in jobs_for(range(4)):
        got = reader.get(job.key)
        assert got.dtype == torch.bfloat16 and torch.equal(got, value(job.payload, torch.bfloat16))


def test_rerun_encodes_only_missing_and_drops_unreferenced(tmp_path):
    stats, enc = build(tmp_path, jobs_for(range(10)))
    assert (stats.encoded, stats.reused, stats.dropped) == (10, 0, 0) and sorted(enc.seen) == list(range(10))
    assert sorted(stats.encoded_labels) == sorted(f"item{i}" for i in range(10))
    index_bytes = (tmp_path / "c" / INDEX_FILE).read_bytes()

    stats, enc = build(tmp_path, jobs_for(range(10)))
    assert (stats.encoded, stats.reused, stats.dropped) == (0, 10, 0) and enc.seen == []
    assert (tmp_path / "c" / INDEX_FILE).read_bytes() == index_bytes  # same content -> same bytes (DVC hash)

    # Two items changed (new keys), one removed, one added; duplicates are encoded once.
    jobs = jobs_for(range(2, 9)) + jobs_for([0, 1], tag="v2") + jobs_for([20, 20])
    stats, enc = build(tmp_path, jobs)
    assert (stats.encoded, stats.reused, stats.dropped) == (3, 7, 3) and sorted(enc.seen) == [0, 1, 20]
    reader = CacheReader(tmp_path / "c")
    assert sorted(reader.keys()) == sorted({j.key for j in jobs})
    for job in jobs:
        assert torch.equal(reader.get(job.key), value(job.payload))


def test_gc_deletes_dead_shards_and_compacts_sparse_ones(tmp_path):
    build(tmp_path, jobs_for(range(10)), shard_mb=1)  # 64 KB tensors: one shard of 10
    first = shard_files(tmp_path)
    assert len(first) == 1
    # 6 of 10 live: kept as it is.
    stats, _ = build(tmp_path, jobs_for(range(6)))
    assert stats.shards_compacted == 0 and shard_files(tmp_path) == first
    # 4 of 10 live (< COMPACT_BELOW): its entries move into a new shard, the old one is deleted.
    assert 4 / 10 < COMPACT_BELOW
    stats, enc = build(tmp_path, jobs_for(range(4)))
    assert stats.shards_compacted == 1 and enc.seen == [] and shard_files(tmp_path) != first
    reader = CacheReader(tmp_path / "c")
    for job in jobs_for(range(4)):
        assert torch.equal(reader.get(job.key), value(job.payload))
    # Nothing live: the shard is deleted.
    stats, _ = build(tmp_path, jobs_for([30]))
    assert stats.shards_deleted == 1 and len(shard_files(tmp_path)) == 1


def test_leftovers_of_a_crashed_run_are_removed(tmp_path):
    build(tmp_path, jobs_for(range(3)))
    c = tmp_path / "c"
    (c / SHARD_DIR / "latents-dead-r0-0000.safetensors").write_bytes(b"orphan")
    (c / SHARD_DIR / "notes.safetensors").write_bytes(b"not ours: never deleted")
    (c / SHARD_DIR / ".latents-x.safetensors.abc.tmp").write_bytes(b"half")
    write_index(c, [], META, name="index.part-r1.parquet")
    stats, enc = build(tmp_path, jobs_for(range(3)))
    assert enc.seen == [] and stats.reused == 3
    assert len(shard_files(tmp_path)) == 2 and not (c / "index.part-r1.parquet").exists()
    assert (c / SHARD_DIR / "notes.safetensors").exists()


def test_a_run_that_dies_is_resumed_from_the_shards_it_wrote(tmp_path):
    class Crash(Exception):
        pass

    class Dying(Encoder):
        def __call__(self, payloads):
            if len(self.seen) >= 18:
                raise Crash()
            return super().__call__(payloads)

    jobs = jobs_for(range(30))  # 64 KB each: a 1 MB shard is written after 15
    with pytest.raises(Crash):
        build(tmp_path, jobs, Dying(), batch_size=3)
    assert not (tmp_path / "c" / INDEX_FILE).exists() and len(shard_files(tmp_path)) == 1
    stats, enc = build(tmp_path, jobs)
    assert (stats.encoded, stats.reused, stats.recovered) == (15, 15, 15) and len(enc.seen) == 15
    reader = CacheReader(tmp_path / "c")
    for job in jobs:
        assert torch.equal(reader.get(job.key), value(job.payload))


def flip_byte(path, offset_from_end=100):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_bit_flip_is_named_on_read_and_reencoded_on_the_next_run(tmp_path):
    jobs = jobs_for(range(5))
    build(tmp_path, jobs)
    rows, _ = read_index(tmp_path / "c")
    shard = tmp_path / "c" / rows[0]["shard"]
    flip_byte(shard)  # inside the last tensor's data
    reader = CacheReader(tmp_path / "c")
    damaged = []
    for job in jobs:
        try:
            reader.get(job.key)
        except CacheCorruptError as e:
            damaged.append(job)
            assert str(shard) in str(e) and job.key in str(e) and "checksum" in str(e)
            assert "rerun cache_latents" in str(e)
    assert len(damaged) == 1
    good, problems = verify_entries(tmp_path / "c", rows)
    assert len(good) == 4 and len(problems) == 1 and damaged[0].key in problems[0]

    stats, enc = build(tmp_path, jobs)
    assert (stats.encoded, stats.reused, stats.damaged) == (1, 4, 1) and enc.seen == [damaged[0].payload]
    reader = CacheReader(tmp_path / "c")
    for job in jobs:
        assert torch.equal(reader.get(job.key), value(job.payload))


def test_shards_of_the_store_are_linked_in_and_verified_like_the_folders_own(tmp_path):
    store, enc = tmp_path / "store", Encoder()
    build_cache(tmp_path / "a", jobs_for(range(5)), META, enc.load, enc, batch_size=3, shard_mb=1, progress=False,
                store=store)
    (shard,) = (store / "latents").iterdir()
    flip_byte(shard)  # inside the last tensor's data
    jobs, enc = jobs_for(range(6)), Encoder()
    stats = build_cache(tmp_path / "c", jobs, META, enc.load, enc, batch_size=3, shard_mb=1, progress=False,
                        store=store)
    assert (stats.from_store, stats.damaged, stats.encoded, stats.recovered) == (4, 1, 2, 0) and 5 in enc.seen
    assert (tmp_path / "c" / SHARD_DIR / shard.name).samefile(shard)  # a hard link, not a copy
    reader = CacheReader(tmp_path / "c")
    for job in jobs:
        assert torch.equal(reader.get(job.key), value(job.payload))


def test_truncated_shard_is_named_and_its_entries_reencoded(tmp_path):
    jobs = jobs_for(range(5))
    build(tmp_path, jobs)
    rows, _ = read_index(tmp_path / "c")
    shard = tmp_path / "c" / rows[0]["shard"]
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CacheCorruptError, match="truncated") as e:
        CacheReader(tmp_path / "c").get(jobs[0].key)
    assert str(shard) in str(e.value) and "rerun cache_latents" in str(e.value)
    stats, enc = build(tmp_path, jobs)
    assert (stats.encoded, stats.damaged) == (5, 5) and sorted(enc.seen) == list(range(5))
    assert not shard.exists()


def test_one_folder_for_both_kinds_is_refused(tmp_path):
    build(tmp_path, jobs_for(range(2)))
    with pytest.raises(CacheError, match="holds a latents cache; the text cache needs a folder of its own"):
        build(tmp_path, jobs_for(range(2)), meta={**META, "kind": "text"})
    assert len(CacheReader(tmp_path / "c")) == 2


def test_missing_or_foreign_index(tmp_path):
    with pytest.raises(CacheError, match="no cache index"):
        CacheReader(tmp_path)
    (tmp_path / INDEX_FILE).write_bytes(b"not parquet")
    with pytest.raises(CacheCorruptError, match="cannot be read"):
        CacheReader(tmp_path)


def text_meta(variant):
    v = VARIANTS[variant]
    return {"kind": "text", "format_version": "flux2-cache-1", "variant": v.name, "text_encoder": v.text_encoder,
            "text_layers": ",".join(map(str, v.text_layers)), "context_dim": str(v.context_in_dim),
            "max_text_tokens": str(v.max_text_tokens), "template_version": TEMPLATE_VERSION,
            "text_fingerprint": "abc"}


def test_compatibility_refusals_say_what_differs():
    dev = text_meta("dev")
    with pytest.raises(CacheError) as e:
        check_cache_compatible(dev, "klein-base-4b", "text", where="cache/text")
    assert str(e.value) == ("cache/text was made with layers (10, 20, 30) of a mistral3 encoder for dev; "
                            "klein-base-4b needs qwen3 layers (9, 18, 27): rerun cache_text")
    # Distilled and base klein share the text encoder: compatible. 4B and 9B differ in width.
    check_cache_compatible(text_meta("klein-4b"), "klein-base-4b", "text")
    with pytest.raises(CacheError, match="7680-wide context .* klein-base-9b needs 12288"):
        check_cache_compatible(text_meta("klein-4b"), "klein-base-9b", "text")
    with pytest.raises(CacheError, match="template"):
        check_cache_compatible({**dev, "template_version": "old"}, "dev", "text")
    with pytest.raises(CacheError, match="other text encoder weights"):
        check_cache_compatible(dev, "dev", "text", fingerprint="zzz")
    with pytest.raises(CacheError, match="is a text cache, not a latents cache"):
        check_cache_compatible(dev, "dev", "latents")

    latents = {**META, "format_version": "flux2-cache-1"}
    check_cache_compatible(latents, "klein-4b", "latents")  # one autoencoder serves every variant
    with pytest.raises(CacheError, match="another autoencoder file"):
        check_cache_compatible(latents, "klein-4b", "latents", fingerprint="g")
    odd = dataclasses.replace(VARIANTS["tiny"], ae=dataclasses.replace(VARIANTS["tiny"].ae, z_channels=16))
    with pytest.raises(CacheError, match="128 latent channels .* needs 64 channels"):
        check_cache_compatible(latents, odd, "latents")
    with pytest.raises(CacheError, match="cache format"):
        check_cache_compatible({**latents, "format_version": "flux2-cache-0"}, "tiny", "latents")


def test_index_is_sorted_parquet_with_checksums(tmp_path):
    build(tmp_path, jobs_for(range(6)))
    table = pq.read_table(tmp_path / "c" / INDEX_FILE)
    assert table.column_names == ["key", "shard", "tensor", "shape", "dtype", "nbytes", "crc32"]
    keys = table.column("key").to_pylist()
    assert keys == sorted(keys) and table.column("shape").to_pylist()[0] == [16, 32, 32]


# ---------------------------------------------------------------------------------------------- prompt files


def test_prompt_lines():
    p = parse_prompt_line("a red circle --w 512 --h 256 --s 20 --d 42 --g 3.5 --n blurry, low quality --ci a.png "
                          "--ci b.png --fs 2")
    assert p == SamplePrompt("a red circle", negative_prompt="blurry, low quality", width=512, height=256, steps=20,
                             seed=42, guidance=3.5, flow_shift=2.0, control_images=["a.png", "b.png"])
    assert parse_prompt_line("  # a comment") is None and parse_prompt_line("   ") is None
    assert parse_prompt_line("well--known shapes --l 5") == SamplePrompt("well--known shapes", guidance=5.0)
    assert parse_prompt_line("empty negative --n") == SamplePrompt("empty negative", negative_prompt="")
    with pytest.raises(PromptFileError, match="p.txt:3: unknown option --x"):
        parse_prompt_line("a --x 1", "p.txt:3")
    with pytest.raises(PromptFileError, match="--w 500 is not a positive multiple of 16; use 496"):
        parse_prompt_line("a --w 500")
    with pytest.raises(PromptFileError, match="--d expects an integer"):
        parse_prompt_line("a --d seven")


def test_prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# samples\n\na cat --d 1\na dog --n ugly\n", encoding="utf-8")
    assert read_prompt_file(f) == [SamplePrompt("a cat", seed=1), SamplePrompt("a dog", negative_prompt="ugly")]
    f.write_text("a cat\n--w 64\n")
    with pytest.raises(PromptFileError, match=r"prompts.txt:2: no prompt text"):
        read_prompt_file(f)
    with pytest.raises(PromptFileError, match="not found"):
        read_prompt_file(tmp_path / "nope.txt")
