"""Reading and writing safetensors files defensively: checkpoints come from users and the internet.

The format: an 8-byte little-endian header length N, N bytes of JSON describing every tensor (dtype, shape,
[begin, end) byte offsets into the data that follows), then the tensor data. `read_header` parses and checks
that header itself before anything else touches the file, so a truncated download, an HTML error page or a
pickle renamed to .safetensors fails with a message that names the file and says what to do. Nothing is ever
unpickled, and no allocation is sized by a number that has not been checked against the file's real size.
Imports only torch and safetensors.
"""
from __future__ import annotations

import errno
import json
import math
import os
import secrets
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

MAX_HEADER_BYTES = 100_000_000  # real headers are kilobytes to a few MB; a bigger length means garbage

# safetensors dtype name -> torch dtype (those this torch build has), with their sizes in bytes.
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in [
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
        ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"),
        ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("U8", "uint8"),
        ("BOOL", "bool"), ("C64", "complex64"),
    ]
    if hasattr(torch, attr)
}

Shape = tuple[int, ...]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file, the problem and the fix."""


def human_bytes(n: int) -> str:
    """1_020_000_000 -> '1.02 GB' (decimal units, as download pages show them)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def _not_safetensors(path: Path, first: bytes) -> str | None:
    """If the first bytes reveal a different kind of file, say which and what to do instead."""
    if first.startswith(b"PK\x03\x04") or first[:1] == b"\x80":
        return (f"{path} is a PyTorch pickle checkpoint (.pt/.ckpt/.bin), not safetensors; pickles can run code, "
                "so this tool never opens them: download the .safetensors version of the model")
    if first.startswith(b"version "):
        return (f"{path} is a Git LFS pointer file, not the weights: run `git lfs pull` in that repository or "
                "download the file itself")
    if first.lstrip().startswith(b"<"):
        return (f"{path} is an HTML page (probably a login or error page saved instead of the file): download it "
                "again, logged in to Hugging Face if the model is gated")
    if first.lstrip().startswith((b"{", b"[")):
        return (f"{path} is a JSON file, not safetensors (an index such as model.safetensors.index.json?): pass a "
                ".safetensors file")
    if first.startswith(b"GGUF"):
        return f"{path} is a GGUF file, which this tool does not load: use the .safetensors release of the model"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in first):
        return f"{path} is a text file, not safetensors: check the file name, or download the file again"
    return None


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Parse and validate the header of a safetensors file.

    Returns (header, data_offset): the header dict as stored (tensor entries and the optional `__metadata__`)
    and the file position where tensor data starts. Raises CheckpointError for anything malformed.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass the single .safetensors file (a diffusers-style model "
                              "folder is not supported: use the BFL single-file checkpoint)")
    try:
        file_size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    if file_size < 8:
        what = "is empty (0 bytes)" if file_size == 0 else f"is only {file_size} bytes"
        raise CheckpointError(f"{path} {what}, not a safetensors file; download it again")

    with open(path, "rb") as f:
        first = f.read(8)
        header_len = int.from_bytes(first, "little")
        if header_len > MAX_HEADER_BYTES or header_len + 8 > file_size or header_len < 2:
            reason = _not_safetensors(path, first)
            if reason:
                raise CheckpointError(reason)
            if header_len > MAX_HEADER_BYTES or header_len < 2:
                raise CheckpointError(f"{path} is not a safetensors file: its first 8 bytes give a header length of "
                                      f"{header_len} bytes, which is impossible; the file is damaged or of "
                                      "another kind")
            raise CheckpointError(f"{path} is truncated: its header needs {human_bytes(header_len + 8)} but the "
                                  f"file holds {human_bytes(file_size)}; download it again")
        raw = f.read(header_len)  # header_len checked against the file size above
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # deep nesting: RecursionError
        reason = _not_safetensors(path, first)
        raise CheckpointError(reason or f"{path} is not a safetensors file: its header is not valid JSON ({e}); "
                              "the file is damaged or of another kind") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file: its header is JSON but not an object")

    data_offset = 8 + header_len
    _check_entries(path, header, file_size - data_offset)
    return header, data_offset


def _check_entries(path: Path, header: dict, data_size: int) -> None:
    """Every tensor entry well formed, and the entries tile the data section exactly."""
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise CheckpointError(f"{path} has a malformed header: __metadata__ must map strings to strings")

    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path} has a malformed header: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} is not described by an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise CheckpointError(f"{where} has unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{where} has shape {shape!r}; expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where} has data_offsets {offsets!r}; expected [begin, end] with "
                                  "0 <= begin <= end")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(f"{where} has shape {shape} {dtype} ({nbytes} bytes) but data_offsets "
                                  f"{offsets} span {offsets[1] - offsets[0]} bytes")
        ranges.append((offsets[0], offsets[1], name))

    data_end = max((end for _, end, _ in ranges), default=0)
    if data_end > data_size:
        raise CheckpointError(f"{path} is truncated: its header says {human_bytes(data_end)} of tensor data but "
                              f"the file holds {human_bytes(max(data_size, 0))}; download it again")
    expected_begin = 0
    for begin, end, name in sorted(ranges):
        if begin != expected_begin:
            problem = "overlaps another tensor" if begin < expected_begin else "leaves a gap before it"
            raise CheckpointError(f"{path} is damaged: the data of tensor {name!r} {problem}; download it again")
        expected_begin = end
    if data_end < data_size:
        raise CheckpointError(f"{path} is damaged: it has {human_bytes(data_size - data_end)} after the last "
                              "tensor that its header does not describe; download it again")


def non_finite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an inf (fp8 ones widened to check: torch has
    no isfinite for them)."""
    return [k for k, t in tensors.items() if t.is_floating_point()
            and not torch.isfinite(t if t.element_size() > 1 else t.to(torch.float16)).all()]


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[Shape, torch.dtype]]:
    """name -> (shape, dtype) of every tensor, from the checked header alone (no tensor data is read)."""
    header, _ = read_header(path)
    return {name: (tuple(e["shape"]), DTYPES[e["dtype"]]) for name, e in header.items() if name != "__metadata__"}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's `__metadata__` (string -> string), empty when it has none."""
    header, _ = read_header(path)
    return dict(header.get("__metadata__", {}))


def iter_tensors(path: str | os.PathLike, keys: Iterable[str] | None = None, device: str | torch.device = "cpu",
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, so a caller can convert or move each before the next is read."""
    header, _ = read_header(path)
    available = [k for k in header if k != "__metadata__"]
    wanted = available if keys is None else list(keys)
    missing = [k for k in wanted if k not in header or k == "__metadata__"]
    if missing:
        raise CheckpointError(f"{path} has no tensor named {', '.join(map(repr, missing[:5]))}"
                              + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    try:
        f = safe_open(str(path), framework="pt", device=str(device))
    except SafetensorError as e:  # what the Rust parser refuses beyond our checks (NaN literals, lone surrogates)
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}); download it again") from None
    with f:
        for key in wanted:
            yield key, f.get_tensor(key)


def load_file(path: str | os.PathLike, device: str | torch.device = "cpu", keys: Iterable[str] | None = None,
              ) -> dict[str, torch.Tensor]:
    """All tensors of a checked safetensors file (or only `keys`), read with safetensors.safe_open."""
    return dict(iter_tensors(path, keys, device))


def save_file_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file so that `path` is either the complete new file or untouched.

    The data goes to a temporary file in the same folder, is fsynced, then renamed over `path`. On any error
    the temporary file is removed and the error raised again naming `path` (an OSError stays an OSError with
    its errno; anything else becomes a ValueError). Tensors must be contiguous and must not share memory.
    The same tensors and metadata give the same bytes on every run (`_canonical_header`).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"could not write {path}: folder {path.parent} does not exist")
    tmp_name = None
    try:
        # A fresh name beside the target (same file system, so the rename is atomic).
        tmp_name = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        save_file(tensors, tmp_name, metadata=metadata)
        _canonical_header(Path(tmp_name))
        # safetensors itself writes through mkstemp (mode 0600): give the file the usual umask permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        with open(tmp_name, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_dir(path.parent)
    except Exception as e:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.remove(tmp_name)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"could not write {path}: {e.strerror or e}") from e
        raise ValueError(f"could not write {path}: {e}") from e
    except BaseException:  # KeyboardInterrupt and the like: clean up, then let it through unchanged
        if tmp_name is not None and os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise


def _canonical_header(path: Path) -> None:
    """Rewrite the header of a file safetensors just wrote with its entries and metadata in sorted order.

    safetensors serialises `__metadata__` from a hash map, so its key order (and the file's bytes, sha256 and
    DVC hash) differ from one process to the next for the same content. The sorted header is the same JSON
    re-ordered, hence (nearly always) the same length: it is written over the old one in place, padded with
    spaces as safetensors pads it; a longer one (other escaping) means copying the data behind a new header."""
    with open(path, "r+b") as f:
        old_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(old_len))
        ordered = {k: (dict(sorted(v.items())) if k == "__metadata__" else v) for k, v in sorted(header.items())}
        raw = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(raw) <= old_len:
            f.seek(8)
            f.write(raw + b" " * (old_len - len(raw)))
            return
        data = f.read()  # rare: the re-encoded header grew; the file is rewritten whole
        raw += b" " * (-len(raw) % 8)
        f.seek(0)
        f.write(len(raw).to_bytes(8, "little") + raw + data)
        f.truncate()


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TensorFile:
    """A checked safetensors file read with plain reads into fresh memory, never memory-mapped: a tensor whole
    (`read`) or a range of its rows at a time (`iter_rows`), so a loader that quantises weights as they arrive
    holds one chunk of the source at a time and none of the file's pages stay mapped in the process.

    Each range read is dropped from the page cache behind the reader (POSIX_FADV_DONTNEED): a loader reads the
    file once, and a page cache growing by the file's size cost more kernel CPU time than the quantisation it
    feeds (measured in docs/performance.md: 5-14 s of system time to read klein-base-4b's 7.75 GB, 0.5-1.2 s
    dropping behind), time the two then fight over on the same cores.

    Use as a context manager (it holds one open file descriptor)."""

    READ_LIMIT = 1 << 30  # bytes per read() call (Linux caps a single read near 2 GiB)
    PREFETCH = 3  # chunks iter_rows reads ahead of its caller
    READERS = 2  # threads reading them: two requests in flight keep a disk busier than one

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.header, self._data_offset = read_header(path)
        self.metadata: dict[str, str] = dict(self.header.get("__metadata__", {}))
        self._fd = os.open(self.path, os.O_RDONLY)
        self._drop_behind = hasattr(os, "posix_fadvise")
        if self._drop_behind:  # read-ahead for the sequential pass a loader makes
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._buffers: list[torch.Tensor] = []  # iter_rows' read buffers, reused for every tensor

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._buffers = []

    def keys(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def _entry(self, key: str) -> dict:
        if key not in self.header or key == "__metadata__":
            raise CheckpointError(f"{self.path} has no tensor named {key!r}")
        return self.header[key]

    def shape(self, key: str) -> Shape:
        return tuple(self._entry(key)["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self._entry(key)["dtype"]]

    def read(self, key: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `key` (or its rows [start, stop) along the first axis), in its stored dtype, on the CPU: in
        fresh memory, or in the front of `out` (a uint8 buffer at least as large)."""
        entry = self._entry(key)
        shape, dtype = list(entry["shape"]), DTYPES[entry["dtype"]]
        begin = self._data_offset + entry["data_offsets"][0]
        if rows is not None:
            start, stop = rows
            if not shape or not 0 <= start <= stop <= shape[0]:
                raise ValueError(f"{self.path}: rows {rows} outside tensor {key!r} of shape {shape}")
            begin += start * math.prod(shape[1:]) * dtype.itemsize
            shape = [stop - start] + shape[1:]
        nbytes = math.prod(shape) * dtype.itemsize
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out[:nbytes]
        view = memoryview(buf.numpy())
        done = 0
        while done < nbytes:
            n = os.preadv(self._fd, [view[done:done + self.READ_LIMIT]], begin + done)
            if n <= 0:
                raise CheckpointError(f"{self.path} ended while reading tensor {key!r}; download it again")
            done += n
        if self._drop_behind:
            os.posix_fadvise(self._fd, begin, nbytes, os.POSIX_FADV_DONTNEED)
        return buf.view(dtype).reshape(shape)

    def iter_rows(self, key: str, rows_per_chunk: int, keep: int = 1) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows) chunks of a tensor, in order, read by READERS threads up to PREFETCH chunks ahead of
        the caller.

        A chunk is valid until the `keep`-th next one is asked for (by default: the next one): the chunks are read
        into PREFETCH + keep buffers the file keeps and reuses for every tensor (fresh memory for each chunk cost
        a page fault per 4 KB read)."""
        from concurrent.futures import ThreadPoolExecutor

        shape = self.shape(key)
        total, step = shape[0], max(rows_per_chunk, 1)
        chunks = [(start, min(start + step, total)) for start in range(0, total, step)]
        nbytes = math.prod(shape[1:]) * self.dtype(key).itemsize * min(step, total)
        count = self.PREFETCH + max(keep, 1)
        if len(self._buffers) < count or self._buffers[0].numel() < nbytes:
            self._buffers = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(count)]
        buffers = self._buffers[:count]
        with ThreadPoolExecutor(max_workers=self.READERS) as pool:
            pending = [pool.submit(self.read, key, rows, buffers[i]) for i, rows in enumerate(chunks[:self.PREFETCH])]
            for i, (start, _) in enumerate(chunks):
                chunk = pending.pop(0).result()
                j = i + self.PREFETCH  # its buffer held chunk j - count = i - keep, which the caller is done with
                if j < len(chunks):
                    pending.append(pool.submit(self.read, key, chunks[j], buffers[j % len(buffers)]))
                yield start, chunk
                del chunk
