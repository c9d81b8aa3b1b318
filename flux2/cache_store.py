"""Content-addressed tensor caches: safetensors shards of bounded size plus one Parquet index.

A cache folder holds
    index.parquet             one row per entry: key, shard, tensor, shape, dtype, nbytes, crc32;
                              the schema metadata `flux2.cache` holds the fingerprints (`meta`) as JSON
    shards/*.safetensors      the tensors, named by their key; each file's __metadata__ holds the same meta
An entry's key is a hash of everything that decides its value (`content_key`), so a key that is already in the
index never needs computing again, and a changed input is a new key. `build_cache` makes a folder hold exactly
a wanted set of keys: it checks the entries it keeps (checksums), encodes the missing ones (split over the
processes of a distributed run, each writing its own shards), merges one index and deletes what is no longer
referenced. `CacheReader` reads entries one at a time from memory-mapped shards and checks each checksum.

Partly-live shards (some entries dropped, some still wanted) are kept as they are while at least half their
bytes are live; below that, their live entries are copied into new shards and the old shard is deleted.

The shared store (`resolve_store`: cache.store, $FLUX2_CACHE_STORE, else ~/.cache/flux2/store) lets every
workspace on a machine reuse what any of them encoded: a build hard-links the store's shards that hold entries
it lacks into its own folder before encoding, and hard-links its own shards into the store afterwards. Shards
are immutable once written, so a hard link costs no disk and no copy, and deleting either name leaves the other.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from torch import Tensor

from flux2.atomic import atomic_path, remove_temporaries
from flux2.locks import LOCK_FILE, FolderLockedError, folder_lock  # noqa: F401  (LOCK_FILE re-exported)
from flux2.safetensors_io import DTYPES, CheckpointError, read_header, save_file_atomic
from flux2.user_files import one_line
from flux2.variants import Variant, get_variant

# Goes into every key: bump it when the layout of entries or the meaning of a key field changes.
FORMAT_VERSION = "flux2-cache-1"
INDEX_FILE = "index.parquet"
SHARD_DIR = "shards"
META_KEY = b"flux2.cache"
ROWS_SHA_KEY = b"flux2.rows_sha256"  # mapping files: sha256 of their rows
CRC_META = "crc32"  # shard metadata: JSON {key: crc32} of its tensors
COMPACT_BELOW = 0.5  # a shard whose live bytes fall under this share of its data is rewritten
_PART_RE = re.compile(r"^index\.part-r\d+\.parquet$")
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),  # relative to the cache folder, e.g. shards/latents-1a2b3c4d-r0-0000.safetensors
    ("tensor", pa.string()),  # the tensor's name inside the shard
    ("shape", pa.list_(pa.int64())),
    ("dtype", pa.string()),  # safetensors name: F32, BF16, ...
    ("nbytes", pa.int64()),
    ("crc32", pa.int64()),  # zlib.crc32 of the tensor's bytes as stored
])


class CacheError(ValueError):
    """A cache that is missing, incompatible with the model, or cannot be built; the message says what to run."""


class CacheCorruptError(CacheError):
    """A damaged shard (truncated, bit-flipped, missing); the message names the shard and the entry."""


def content_key(fields: dict[str, Any]) -> str:
    """32 hex digits of sha256 over the canonical JSON of `fields` (plus the cache format version)."""
    payload = json.dumps({"format": FORMAT_VERSION, **fields}, sort_keys=True, ensure_ascii=False,
                         separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def tensor_bytes(t: Tensor) -> memoryview:
    """The bytes of a CPU tensor as safetensors stores them (row-major, native little-endian)."""
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def tensor_crc32(t: Tensor) -> int:
    return zlib.crc32(tensor_bytes(t))


def stage_name(meta: dict[str, str]) -> str:
    """The stage that rebuilds a cache of this meta: cache_latents or cache_text."""
    return f"cache_{meta.get('kind', 'latents')}"


# ----------------------------------------------------------------------------------------------------------
# The index


def read_index(cache_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(rows, meta) of a cache folder's index; CacheError if there is none or it cannot be read."""
    path = Path(cache_dir) / INDEX_FILE
    if not path.is_file():
        raise CacheError(f"{cache_dir}: no cache index ({INDEX_FILE}); run the caching stage first "
                         f"(dvc repro, or flux2 cache-latents / flux2 cache-text)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise CacheCorruptError(f"{path} cannot be read ({one_line(e)}); rerun the caching stage to "
                                "rebuild it") from None
    missing = [n for n in INDEX_SCHEMA.names if n not in table.column_names]
    raw = (table.schema.metadata or {}).get(META_KEY)
    if missing or raw is None:
        raise CacheCorruptError(f"{path} is not a flux2 cache index (missing {', '.join(missing) or 'its meta'}); "
                                f"delete the folder and rerun the caching stage")
    return table.select(INDEX_SCHEMA.names).to_pylist(), json.loads(raw)


def write_index(cache_dir: str | Path, rows: list[dict[str, Any]], meta: dict[str, str],
                name: str = INDEX_FILE) -> Path:
    """Write rows (sorted by key, so the same content gives the same bytes) and meta, atomically."""
    rows = sorted(rows, key=lambda r: r["key"])
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA.with_metadata(
        {META_KEY: json.dumps(meta, sort_keys=True).encode()}))
    path = Path(cache_dir) / name
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def write_mapping(path: str | Path, rows: list[dict[str, Any]], schema: pa.Schema, meta: dict[str, str]) -> None:
    """A small Parquet lookup table (item -> keys, text -> key) beside an index, written atomically, with the
    sha256 of its rows in the schema metadata (`read_mapping` checks it: Parquet itself lets many bit flips
    through as different values)."""
    table = pa.Table.from_pylist(rows, schema=schema.with_metadata(
        {META_KEY: json.dumps(meta, sort_keys=True).encode()}))
    table = table.replace_schema_metadata({**table.schema.metadata,
                                           ROWS_SHA_KEY: _rows_sha256(table.to_pylist()).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_mapping(path: str | Path, stage: str) -> list[dict[str, Any]]:
    """The rows of a mapping file written by `write_mapping`; CacheCorruptError naming the file and the stage
    that rebuilds it when the file cannot be read or its rows differ from what was written."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{path} not found; run {stage} (dvc repro {stage})")
    try:
        table = pq.read_table(path)
        rows = table.to_pylist()
        digest = _rows_sha256(rows)
    except (pa.ArrowException, OSError, ValueError, TypeError) as e:  # a flipped bit may break the UTF-8 or a type
        raise CacheCorruptError(f"{path} cannot be read ({one_line(e)}); rerun {stage} to rebuild "
                                "it") from None
    expected = (table.schema.metadata or {}).get(ROWS_SHA_KEY)
    if expected is not None and expected.decode(errors="replace") != digest:
        raise CacheCorruptError(f"{path} is damaged (its rows do not match their checksum); rerun {stage} to "
                                "rebuild it")
    return rows


def _rows_sha256(rows: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Writing shards


class ShardWriter:
    """Collects tensors and writes them as safetensors shards of at most `shard_mb` MB (one bigger tensor
    gets a shard of its own). `rows()` are the index rows of everything written so far."""

    def __init__(self, cache_dir: str | Path, meta: dict[str, str], shard_mb: int, prefix: str):
        self.cache_dir = Path(cache_dir)
        (self.cache_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self.meta = {**meta, "format_version": FORMAT_VERSION}
        self.limit = shard_mb * 1_000_000
        self.prefix = prefix
        self._pending: dict[str, Tensor] = {}
        self._pending_bytes = 0
        self._rows: list[dict[str, Any]] = []
        self._count = 0

    def add(self, key: str, tensor: Tensor) -> None:
        # A copy: a slice of a batch shares its storage, which safetensors refuses (and would keep it alive).
        tensor = tensor.detach().to("cpu", copy=True).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.limit:
            self.flush()
        self._pending[key] = tensor
        self._pending_bytes += nbytes

    def flush(self) -> None:
        if not self._pending:
            return
        shard = f"{SHARD_DIR}/{self.prefix}-{self._count:04d}.safetensors"
        rows = [{"key": key, "shard": shard, "tensor": key, "shape": list(t.shape), "dtype": _DTYPE_NAMES[t.dtype],
                 "nbytes": t.numel() * t.element_size(), "crc32": tensor_crc32(t)} for key, t in self._pending.items()]
        # The checksums also go into the shard itself, so a run that dies before its index is merged can be
        # resumed: the next run recovers the shard's entries (recover_rows) instead of encoding them again.
        checksums = json.dumps({r["key"]: r["crc32"] for r in rows}, separators=(",", ":"))
        save_file_atomic(self._pending, self.cache_dir / shard, metadata={**self.meta, CRC_META: checksums})
        self._rows += rows
        self._count += 1
        self._pending, self._pending_bytes = {}, 0

    def rows(self) -> list[dict[str, Any]]:
        self.flush()
        return list(self._rows)


def recover_rows(cache_dir: str | Path, known_shards: set[str], kind: str) -> list[dict[str, Any]]:
    """Index rows for the shards of `kind` that no index lists (written by a run that died before merging),
    from their headers and stored checksums. Unreadable shards are skipped (they are deleted at the end of
    the run); the rows are verified like any other before use."""
    folder = Path(cache_dir) / SHARD_DIR
    rows: list[dict[str, Any]] = []
    if not folder.is_dir():
        return rows
    for path in sorted(folder.glob("*.safetensors")):
        shard = f"{SHARD_DIR}/{path.name}"
        if shard not in known_shards:
            rows += _shard_rows(path, shard, kind)
    return rows


def _shard_rows(path: Path, shard: str, kind: str) -> list[dict[str, Any]]:
    """The index rows of the shard at `path` (named `shard` in the index), from its header and stored checksums;
    none when it cannot be read or is not a shard of `kind` in this cache format."""
    try:
        header, _ = read_header(path)
        meta = header.get("__metadata__", {})
        checksums = json.loads(meta.get(CRC_META, "{}"))
    except (CheckpointError, OSError, ValueError):
        return []
    if meta.get("kind") != kind or meta.get("format_version") != FORMAT_VERSION:
        return []
    rows = []
    for name, entry in header.items():
        if name != "__metadata__" and name in checksums:
            begin, end = entry["data_offsets"]
            rows.append({"key": name, "shard": shard, "tensor": name, "shape": list(entry["shape"]),
                         "dtype": entry["dtype"], "nbytes": end - begin, "crc32": int(checksums[name])})
    return rows


# ----------------------------------------------------------------------------------------------------------
# Checking entries


def verify_entries(cache_dir: str | Path, rows: list[dict[str, Any]]) -> tuple[list[dict], list[str]]:
    """(good rows, problems): each row's shard must exist with a valid header that holds the tensor with the
    indexed shape and dtype, and the tensor's bytes must match the checksum. Reads the data once, shard by shard,
    without building tensors."""
    cache_dir = Path(cache_dir)
    by_shard: dict[str, list[dict]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    good, problems = [], []
    for shard, shard_rows in sorted(by_shard.items()):
        path = cache_dir / shard
        try:
            header, data_offset = read_header(path)
        except (CheckpointError, OSError) as e:
            problems.append(f"{path}: {e}" if isinstance(e, OSError) else str(e))
            continue
        with open(path, "rb") as f:
            for row in shard_rows:
                entry = header.get(row["tensor"])
                if not isinstance(entry, dict) or entry.get("dtype") != row["dtype"] or \
                        list(entry.get("shape", [])) != list(row["shape"]):
                    problems.append(f"{path}: entry {row['key']} is missing or has another shape/dtype than the index")
                    continue
                begin, end = entry["data_offsets"]
                f.seek(data_offset + begin)
                if zlib.crc32(f.read(end - begin)) != row["crc32"]:
                    problems.append(f"{path}: entry {row['key']} fails its checksum (the shard is damaged)")
                    continue
                good.append(row)
    return good, problems


# ----------------------------------------------------------------------------------------------------------
# Reading


class CacheReader:
    """Entries of a cache folder by key, read one at a time from memory-mapped shards (safe_open).

    `verify` checks every tensor read against the index checksum; a damaged shard raises CacheCorruptError
    naming the shard, the entry and the stage to rerun (which then re-encodes the damaged entries).
    Picklable (open shard handles are dropped), so it can live in DataLoader workers.
    """

    def __init__(self, cache_dir: str | Path, verify: bool = True, max_open: int = 32):
        self.cache_dir = Path(cache_dir)
        rows, self.meta = read_index(self.cache_dir)
        self._entries = {r["key"]: (r["shard"], r["tensor"], tuple(r["shape"]), r["dtype"], r["crc32"])
                         for r in rows}
        self.verify = verify
        self.max_open = max_open
        self._handles: OrderedDict[str, Any] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[2]

    def get(self, key: str) -> Tensor:
        """The tensor stored under `key`, on the CPU, read from the memory-mapped shard (no copy of the shard)."""
        shard, name, shape, dtype, crc = self._entry(key)
        path = self.cache_dir / shard
        try:
            tensor = self._open(shard).get_tensor(name)
        except CacheCorruptError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise self._damaged(path, key, f"cannot be read ({e})") from None
        if tuple(tensor.shape) != shape or _DTYPE_NAMES.get(tensor.dtype) != dtype:
            raise self._damaged(path, key, f"is {_DTYPE_NAMES.get(tensor.dtype)} {tuple(tensor.shape)}, the index "
                                           f"says {dtype} {shape}")
        if self.verify and tensor_crc32(tensor) != crc:
            raise self._damaged(path, key, f"fails its checksum (crc32 {tensor_crc32(tensor):08x}, index "
                                           f"{crc:08x})")
        return tensor

    def close(self) -> None:
        self._handles.clear()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        return state

    def _entry(self, key: str) -> tuple:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in the cache {self.cache_dir} ({len(self)} entries); rerun "
                           f"{stage_name(self.meta)} for the current dataset") from None

    def _damaged(self, path: Path, key: str, what: str) -> CacheCorruptError:
        return CacheCorruptError(f"{path}: entry {key} {what}: the shard is damaged; rerun "
                                 f"{stage_name(self.meta)} (it re-encodes damaged entries)")

    def _open(self, shard: str):
        handle = self._handles.get(shard)
        if handle is not None:
            self._handles.move_to_end(shard)
            return handle
        path = self.cache_dir / shard
        try:
            read_header(path)  # names truncation and garbage clearly, before safetensors sees the file
        except CheckpointError as e:
            raise CacheCorruptError(f"{e}. It is a shard of the cache {self.cache_dir}; rerun "
                                    f"{stage_name(self.meta)} (it re-encodes damaged entries)") from None
        except OSError as e:
            raise CacheCorruptError(f"{path}: shard missing or unreadable ({e.strerror or e}); rerun "
                                    f"{stage_name(self.meta)}") from None
        handle = safe_open(str(path), framework="pt")
        self._handles[shard] = handle
        if len(self._handles) > self.max_open:
            self._handles.popitem(last=False)
        return handle


# ----------------------------------------------------------------------------------------------------------
# Compatibility with the model that reads a cache


def check_cache_compatible(reader: CacheReader | dict[str, str], variant: Variant | str, kind: str,
                           fingerprint: str | None = None, where: str | None = None) -> None:
    """Refuse (CacheError) a cache made for another model than `variant` needs.

    kind "latents": the autoencoder's latent layout (channels, downscale) must fit; kind "text": the text
    encoder kind, its layers, the context width, the token count and the template version must fit. A given
    `fingerprint` (of the AE / text encoder files the caller uses) must equal the cache's.
    """
    from flux2.text_encoder import TEMPLATE_VERSION

    if kind not in ("latents", "text"):
        raise ValueError(f"kind must be 'latents' or 'text', got {kind!r}")
    variant = get_variant(variant) if isinstance(variant, str) else variant
    meta = reader.meta if isinstance(reader, CacheReader) else reader
    where = where or (str(reader.cache_dir) if isinstance(reader, CacheReader) else "the cache")
    made_for = meta.get("variant", "?")
    if meta.get("kind") != kind:
        raise CacheError(f"{where} is a {meta.get('kind', 'unknown')} cache, not a {kind} cache; point "
                         f"cache.{'latents_dir' if kind == 'latents' else 'text_dir'} at the output of cache_{kind}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{where} has cache format {meta.get('format_version')!r}, this version reads "
                         f"{FORMAT_VERSION!r}: rerun cache_{kind}")
    if kind == "latents":
        have = (int(meta["latent_channels"]), int(meta["downscale"]))
        want = (variant.ae.latent_channels, variant.ae.downscale)
        if have != want:
            raise CacheError(f"{where} was made with an autoencoder of {have[0]} latent channels at 1/{have[1]} "
                             f"scale for {made_for}; {variant.name} needs {want[0]} channels at 1/{want[1]}: "
                             f"rerun cache_latents with the autoencoder of {variant.name}")
        if fingerprint is not None and fingerprint != meta.get("ae_fingerprint"):
            raise CacheError(f"{where} was made with another autoencoder file (fingerprint "
                             f"{meta.get('ae_fingerprint')}, yours is {fingerprint}): rerun cache_latents")
        return
    have_layers = tuple(int(x) for x in meta["text_layers"].split(",") if x)
    have_kind = meta["text_encoder"]
    want_layers = tuple(variant.text_layers)
    if have_kind != variant.text_encoder or have_layers != want_layers:
        raise CacheError(f"{where} was made with layers {have_layers} of a {have_kind} encoder for {made_for}; "
                         f"{variant.name} needs {variant.text_encoder} layers {want_layers}: rerun cache_text")
    if int(meta["context_dim"]) != variant.context_in_dim:
        raise CacheError(f"{where} holds {meta['context_dim']}-wide context from the {have_kind} encoder of "
                         f"{made_for}; {variant.name} needs {variant.context_in_dim}: rerun cache_text with the "
                         f"text encoder of {variant.name}")
    if int(meta["max_text_tokens"]) != variant.max_text_tokens:
        raise CacheError(f"{where} holds {meta['max_text_tokens']} tokens per prompt; {variant.name} uses "
                         f"{variant.max_text_tokens}: rerun cache_text")
    if meta.get("template_version") != TEMPLATE_VERSION:
        raise CacheError(f"{where} was made with prompt template {meta.get('template_version')!r}; this version "
                         f"uses {TEMPLATE_VERSION!r}: rerun cache_text")
    if fingerprint is not None and fingerprint != meta.get("text_fingerprint"):
        raise CacheError(f"{where} was made with other text encoder weights (fingerprint "
                         f"{meta.get('text_fingerprint')}, yours is {fingerprint}): rerun cache_text")


# ----------------------------------------------------------------------------------------------------------
# Processes


class Dist:
    """Rank, world size, barrier and object gathering: accelerate's PartialState when the process was started by
    `accelerate launch` / torchrun (WORLD_SIZE > 1), else a single process (no accelerate import)."""

    def __init__(self) -> None:
        self.state = None
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            # cpu=True makes a CPU-only run (torchrun, `accelerate launch --multi_gpu`) a gloo group instead of
            # a single process.
            self.state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.world = self.state.process_index, self.state.num_processes

    @property
    def device(self) -> torch.device | None:
        """The device accelerate assigned to this process (None when not distributed)."""
        return self.state.device if self.state is not None else None

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def gather(self, obj: Any) -> list[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


# ----------------------------------------------------------------------------------------------------------
# Building a cache


@dataclass
class Job:
    """One entry to make: its key, what the encoder needs, the batch group (same-shape inputs) and a label for
    reports (an item id, a prompt)."""

    key: str
    payload: Any
    group: Any = None
    label: str = ""


@dataclass
class BuildStats:
    wanted: int = 0
    encoded: int = 0
    reused: int = 0
    dropped: int = 0
    damaged: int = 0
    recovered: int = 0  # reused from shards of an interrupted run
    from_store: int = 0  # reused from the shared store's shards (linked in)
    problems: list[str] = field(default_factory=list)
    encoded_labels: list[str] = field(default_factory=list)
    shards: int = 0
    shards_deleted: int = 0
    shards_compacted: int = 0
    bytes: int = 0
    seconds: float = 0.0
    seconds_verify: float = 0.0
    seconds_model_load: float = 0.0  # this rank
    seconds_encode: float = 0.0  # inside the encoder forward (this rank)
    seconds_load: float = 0.0  # waiting for inputs (this rank)


@contextmanager
def cache_lock(cache_dir: str | Path, command: str = "a cache build") -> Iterator[None]:
    """Hold `cache_dir`'s lock file for the block; CacheError at once if another process holds it (naming it).
    An flock (flux2.locks): the kernel drops it when its holder exits, even by kill -9, so a crash never leaves
    a stale lock."""
    try:
        with folder_lock(cache_dir, "being built by another process right now",
                         "wait for it to finish, or give this run another cache folder", command):
            yield
    except FolderLockedError as e:
        raise CacheError(str(e)) from None


def build_cache(cache_dir: str | Path, jobs: Iterable[Job], meta: dict[str, str],
                load: Callable[[list[Job]], Any], encode: Callable[[Any], Tensor | list[Tensor]],
                batch_size: int, shard_mb: int, dist: Dist | None = None, num_workers: int = 2,
                progress: bool = True, desc: str = "cache", prepare: Callable[[], None] | None = None,
                store: Path | None = None) -> BuildStats:
    """Make `cache_dir` hold exactly the entries of `jobs` (deduplicated by key); see _build_cache. With a
    `store` (the shared store folder), entries it holds are linked in instead of encoded, and what is encoded
    is added to it.

    One build per folder at a time: a second process (a second `flux2 cache-latents` on the same folder) is
    refused with a CacheError instead of interleaving its shards, part indexes and deletions with the first's.
    """
    dist = dist or Dist()
    with cache_lock(cache_dir, stage_name(meta)) if dist.rank == 0 else nullcontext():
        return _build_cache(cache_dir, jobs, meta, load, encode, batch_size, shard_mb, dist, num_workers, progress,
                            desc, prepare, store)


def _build_cache(cache_dir: str | Path, jobs: Iterable[Job], meta: dict[str, str],
                 load: Callable[[list[Job]], Any], encode: Callable[[Any], Tensor | list[Tensor]],
                 batch_size: int, shard_mb: int, dist: Dist | None = None, num_workers: int = 2,
                 progress: bool = True, desc: str = "cache", prepare: Callable[[], None] | None = None,
                 store: Path | None = None) -> BuildStats:
    """Make `cache_dir` hold exactly the entries of `jobs` (deduplicated by key).

    Entries already in the index whose checksums pass are reused; the rest are made by `encode(load(batch))`,
    which returns one tensor per job (or a batched tensor). `prepare()` (loading the model) runs first, only on a
    rank that has something to encode, so a rerun with nothing new loads no model. `load` runs in `num_workers`
    threads ahead of the encoder, at most a few batches ahead, so memory holds a bounded number of inputs
    whatever the dataset size.
    With several processes, the missing jobs are split (i-th to rank i % world), each rank writes its own shards
    and rank 0 merges the index after a barrier. Every rank returns the same counts.
    """
    if batch_size < 1 or shard_mb < 1:
        raise ValueError(f"batch_size and shard_mb must be at least 1, got {batch_size} and {shard_mb}")
    t0 = time.perf_counter()
    dist = dist or Dist()
    cache_dir = Path(cache_dir)
    kind = meta.get("kind", "cache")
    meta = {**meta, "format_version": FORMAT_VERSION}
    stats = BuildStats()
    unique: dict[str, Job] = {}
    for job in jobs:
        unique.setdefault(job.key, job)
    stats.wanted = len(unique)

    linked: list[dict] = []  # the rows of the shards linked in from the store (by rank 0)
    old_rows = None
    if dist.rank == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for p in cache_dir.iterdir():  # part indexes of a run that died before merging
            if _PART_RE.match(p.name):
                p.unlink()
        if store is not None:  # linked-in shards are then verified like those of an interrupted run
            old_rows = _read_old_rows(cache_dir, kind)
            linked = take_from_store(cache_dir, store, kind, set(unique) - {r["key"] for r in old_rows})
    # Rank 0's rows to every rank, so all count the same; a barrier too: no rank lists the folder before the links.
    linked = dist.gather(linked)[0]

    if old_rows is None:
        old_rows = _read_old_rows(cache_dir, kind)
    known = {r["shard"] for r in old_rows}
    linked = [r for r in linked if r["shard"] not in known]  # an indexed shard: not recovered, as without a store
    # Listed before the next collective, so no rank sees shards another rank writes in this run.
    recovered = linked + recover_rows(cache_dir, known | {r["shard"] for r in linked}, kind)
    indexed = {r["key"] for r in old_rows}
    pool = old_rows + [r for r in recovered if r["key"] not in indexed]
    candidates = sorted((r for r in pool if r["key"] in unique), key=lambda r: (r["shard"], r["key"]))
    # Verification is split by shard over the ranks; every rank then knows which entries are good.
    shards = sorted({r["shard"] for r in candidates})
    mine = set(shards[dist.rank::dist.world])
    tv = time.perf_counter()
    good, problems = verify_entries(cache_dir, [r for r in candidates if r["shard"] in mine])
    stats.seconds_verify = time.perf_counter() - tv
    gathered = dist.gather(([(r["shard"], r["key"]) for r in good], problems))
    good_entries = {pair for pairs, _ in gathered for pair in pairs}
    stats.problems = [p for _, ps in gathered for p in ps]
    for p in stats.problems:
        print(f"{desc}: warning: {p}; re-encoding it")
    # A key can lie in two shards (recovered from a compaction that died): keep its first good copy.
    kept: list[dict] = []
    good_keys: set[str] = set()
    for r in candidates:
        if (r["shard"], r["key"]) in good_entries and r["key"] not in good_keys:
            kept.append(r)
            good_keys.add(r["key"])
    stats.damaged = len({r["key"] for r in candidates} - good_keys)
    stats.reused = len(kept)
    stats.recovered = len({r["key"] for r in kept} - indexed)
    stats.from_store = len({r["key"] for r in kept} & {r["key"] for r in linked})
    stats.recovered -= stats.from_store
    stats.dropped = len(indexed - set(unique))

    missing = [job for key, job in unique.items() if key not in good_keys]
    stats.encoded = len(missing)
    stats.encoded_labels = [job.label for job in missing]
    my_jobs = missing[dist.rank::dist.world]
    token = secrets.token_hex(4)
    writer = ShardWriter(cache_dir, meta, shard_mb, f"{kind}-{token}-r{dist.rank}")
    if my_jobs:
        if prepare is not None:
            tp = time.perf_counter()
            prepare()
            stats.seconds_model_load = time.perf_counter() - tp
        _encode_jobs(my_jobs, load, encode, writer, batch_size, num_workers, stats,
                     progress=progress and dist.rank == 0,
                     desc=desc if dist.world == 1 else f"{desc} (rank 0 of {dist.world})")
    write_index(cache_dir, writer.rows(), meta, name=f"index.part-r{dist.rank}.parquet")
    dist.barrier()

    if dist.rank == 0:
        new_rows = []
        for r in range(dist.world):
            part = cache_dir / f"index.part-r{r}.parquet"
            new_rows += pq.read_table(part).to_pylist()
        rows = kept + new_rows
        rows, stats.shards_compacted = _compact(cache_dir, rows, meta, shard_mb, token)
        write_index(cache_dir, rows, meta)
        for r in range(dist.world):
            (cache_dir / f"index.part-r{r}.parquet").unlink()
        stats.shards_deleted = _delete_unreferenced(cache_dir, {r["shard"] for r in rows}, kind)
        if store is not None:
            add_to_store(cache_dir, store, kind, {r["shard"] for r in rows})
        stats.shards = len({r["shard"] for r in rows})
        stats.bytes = sum(r["nbytes"] for r in rows)
    summary = dist.gather((stats.shards, stats.shards_deleted, stats.shards_compacted, stats.bytes))[0]
    stats.shards, stats.shards_deleted, stats.shards_compacted, stats.bytes = summary
    dist.barrier()
    stats.seconds = time.perf_counter() - t0
    return stats


# ----------------------------------------------------------------------------------------------------------
# The shared store

STORE_ENV = "FLUX2_CACHE_STORE"


def resolve_store(setting: str | bool | None = None) -> Path | None:
    """The shared store folder: `setting` (params cache.store or --store: a path, relative ones from the
    repository root; false or `off` for none), else $FLUX2_CACHE_STORE (a path or `off`), else
    $XDG_CACHE_HOME/flux2/store (~/.cache/flux2/store)."""
    from flux2.tracking import repo_root

    for value in (setting, os.environ.get(STORE_ENV)):
        if value is False or (isinstance(value, str) and value.strip().lower() in ("", "off", "false", "none")):
            return None
        if isinstance(value, str):
            return repo_root() / value
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flux2" / "store"


def _link(src: Path, dst: Path) -> bool:
    """Hard-link `src` as `dst` (an existing `dst` is kept: names are unique, so it is the same shard); False,
    with a note, where the two folders are on different file systems (the store is then not used: it never
    costs a copy)."""
    try:
        os.link(src, dst)
    except FileExistsError:
        pass
    except OSError as e:
        print(f"note: shared cache store not used: cannot hard-link {src} as {dst} ({e.strerror or e}); put "
              f"cache.store (or ${STORE_ENV}) on the file system of the workspace, or set it to false")
        return False
    return True


def take_from_store(cache_dir: Path, store: Path, kind: str, wanted: set[str]) -> list[dict[str, Any]]:
    """Link into `cache_dir` the store's shards of `kind` that hold any of the `wanted` keys; returns their index
    rows, read from their headers as recover_rows reads a shard. Nothing is trusted: the rows are verified like
    the folder's own."""
    folder, found, rows = store / kind, set(), []
    if not wanted or not folder.is_dir():
        return rows
    own = cache_dir / SHARD_DIR
    for path in sorted(folder.glob(f"{kind}-*.safetensors")):
        if found >= wanted:
            break
        shard_rows = _shard_rows(path, f"{SHARD_DIR}/{path.name}", kind)
        keys = {r["key"] for r in shard_rows} & (wanted - found)
        if keys:
            own.mkdir(parents=True, exist_ok=True)
            if not _link(path, own / path.name):
                break
            found |= keys
            rows += shard_rows
    return rows


def add_to_store(cache_dir: Path, store: Path, kind: str, shards: set[str]) -> None:
    """Hard-link the folder's `shards` into the store (those it lacks)."""
    folder = store / kind
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"note: shared cache store not used: cannot create {folder} ({e.strerror or e})")
        return
    for shard in sorted(shards):
        if not _link(cache_dir / shard, folder / Path(shard).name):
            return


def _read_old_rows(cache_dir: Path, kind: str) -> list[dict]:
    """The previous run's rows; none when there is no index, it is unreadable or of another cache format (its
    shards are then unreferenced and deleted at the end of the run). CacheError if the folder holds the other
    kind of cache: latents and text need folders of their own, or each run would delete the other's shards."""
    if not (cache_dir / INDEX_FILE).is_file():
        return []
    try:
        rows, meta = read_index(cache_dir)
    except CacheCorruptError as e:
        print(f"warning: {e}; starting the cache afresh")
        return []
    if meta.get("kind", kind) != kind:
        raise CacheError(f"{cache_dir} holds a {meta['kind']} cache; the {kind} cache needs a folder of its own "
                         f"(set cache.latents_dir and cache.text_dir to different folders)")
    return rows if meta.get("format_version") == FORMAT_VERSION else []


def _batches(jobs: list[Job], batch_size: int) -> Iterator[list[Job]]:
    """Jobs grouped by `group` (first-seen order), then cut into batches of at most batch_size."""
    groups: dict[Any, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    for members in groups.values():
        for i in range(0, len(members), batch_size):
            yield members[i:i + batch_size]


def _encode_jobs(jobs: list[Job], load: Callable, encode: Callable, writer: ShardWriter, batch_size: int,
                 num_workers: int, stats: BuildStats, progress: bool, desc: str) -> None:
    from tqdm import tqdm

    batches = _batches(jobs, batch_size)
    lookahead = max(1, num_workers) + 1
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool, \
            tqdm(total=len(jobs), desc=desc, unit="item", disable=not progress, dynamic_ncols=True) as bar:
        pending: list[tuple[list[Job], Any]] = []

        def refill() -> None:
            while len(pending) < lookahead:
                batch = next(batches, None)
                if batch is None:
                    return
                pending.append((batch, pool.submit(load, batch)))

        refill()
        while pending:
            batch, future = pending.pop(0)
            tl = time.perf_counter()
            inputs = future.result()
            stats.seconds_load += time.perf_counter() - tl
            refill()
            te = time.perf_counter()
            outputs = encode(inputs)
            if isinstance(outputs, Tensor) and outputs.device.type == "cuda":
                torch.cuda.synchronize(outputs.device)
            stats.seconds_encode += time.perf_counter() - te
            if len(outputs) != len(batch):
                raise RuntimeError(f"the encoder returned {len(outputs)} results for a batch of {len(batch)}")
            for job, out in zip(batch, outputs):
                writer.add(job.key, out)
            del inputs, outputs
            bar.update(len(batch))


def _compact(cache_dir: Path, rows: list[dict], meta: dict[str, str], shard_mb: int, token: str
             ) -> tuple[list[dict], int]:
    """Rewrite shards whose live entries hold under COMPACT_BELOW of their data; returns (rows, count)."""
    live: dict[str, int] = {}
    for r in rows:
        live[r["shard"]] = live.get(r["shard"], 0) + r["nbytes"]
    sparse = []
    for shard, nbytes in sorted(live.items()):
        header, data_offset = read_header(cache_dir / shard)
        data = (cache_dir / shard).stat().st_size - data_offset
        if data and nbytes < COMPACT_BELOW * data:
            sparse.append(shard)
    if not sparse:
        return rows, 0
    writer = ShardWriter(cache_dir, meta, shard_mb, f"{meta.get('kind', 'cache')}-{token}-compact")
    moved = {}
    for shard in sparse:
        with safe_open(str(cache_dir / shard), framework="pt") as f:
            for r in rows:
                if r["shard"] == shard:
                    writer.add(r["key"], f.get_tensor(r["tensor"]))
                    moved[r["key"]] = r
    new_rows = writer.rows()
    for r in new_rows:
        if r["crc32"] != moved[r["key"]]["crc32"]:
            raise CacheCorruptError(f"{cache_dir / moved[r['key']]['shard']}: entry {r['key']} changed while "
                                    f"compacting; rerun {stage_name(meta)}")
    return [r for r in rows if r["key"] not in moved] + new_rows, len(sparse)


def _delete_unreferenced(cache_dir: Path, referenced: set[str], kind: str) -> int:
    """Delete this kind's shards that no index row points at (and temporary files of interrupted writes);
    returns the count. Only files this code names (`<kind>-*.safetensors`) are ever deleted."""
    remove_temporaries(cache_dir)  # of an index or mapping write that was killed
    folder = cache_dir / SHARD_DIR
    if not folder.is_dir():
        return 0
    remove_temporaries(folder)  # of a shard write that was killed
    deleted = 0
    for p in folder.iterdir():
        name = f"{SHARD_DIR}/{p.name}"
        if p.name.startswith(f"{kind}-") and p.suffix == ".safetensors" and name not in referenced:
            p.unlink()
            deleted += 1
        elif p.name.startswith(".") and p.name.endswith(".tmp"):  # any writer's temporary name ending .tmp
            p.unlink()
    return deleted


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (Linux ru_maxrss is in KiB, macOS in bytes)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024
