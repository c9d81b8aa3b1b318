"""Frozen weights in fewer bytes, quantised as they stream in from the checkpoint file.

The modes (`model.quantize`, `model.text_encoder_quantize`, `--quantize`, ...):

| mode | format | bytes per weight | module |
|---|---|---|---|
| none | the model dtype (bf16 / fp32) | 2 / 4 | nn.Linear |
| fp8 | block-wise scaled e4m3 (64 weights per bf16 scale) | 1.03 | flux2.fp8.Fp8Linear |
| nf4 | bitsandbytes NF4, double-quantised absmax | 0.516 | flux2.bnb_linear.Nf4Linear |
| int8 | bitsandbytes LLM.int8 storage, row-wise absmax | 1 + 4 per row | flux2.bnb_linear.Int8Linear |

`stream_linear` builds one quantised Linear from a file: it reads the weight a chunk of rows at a time with plain
reads (flux2.safetensors_io.TensorFile, nothing memory-mapped, read ahead by two threads) and quantises each chunk
as it arrives (on the CPU, one chunk per core at once: `work_buffers`), so loading holds the quantised model plus a
few chunks, never the model (or one whole weight) in bf16. `read_weight` copies a
tensor that stays unquantised into fresh memory, so the source file's pages are never part of the process.

Pre-quantised files as users download them are read here too (`prequantized_layout`): ComfyUI's `scaled_fp8`
files (e4m3 weights, a per-layer `scale_weight`, optional `scale_input`, and a `scaled_fp8` marker tensor) and
its newer mixed-precision files (a per-layer `comfy_quant` uint8 tensor holding JSON such as
{"format": "float8_e4m3fn"}, with `weight_scale` and optional `input_scale`; or the same per-layer formats in
the `_quantization_metadata` JSON of the file's metadata). A weight is its fp8 values times its scale (one per
tensor, per row or per block); the activation scales are only for fp8 matrix products and are not needed.
"""
from __future__ import annotations

import json
import math
import queue
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flux2.fp8 import Fp8Builder, Fp8Linear, fp8_bytes, rows_per_chunk
from flux2.safetensors_io import CheckpointError, Shape, TensorFile

MODES = ("none", "fp8", "nf4", "int8")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
COMFY_FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI scaled_fp8 / mixed-precision names
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
SCALED_FP8_MARKER = "scaled_fp8"
QUANT_METADATA_KEY = "_quantization_metadata"


def check_mode(mode: str, what: str = "quantize") -> str:
    if mode not in MODES:
        raise ValueError(f"{what} {mode!r}: use one of {', '.join(MODES)}")
    return mode


def builder(mode: str, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device | str):
    """The row-chunk builder of `mode`'s quantised Linear: `add(first_row, rows)` per chunk, then `finish(bias)`."""
    if mode == "fp8":
        return Fp8Builder(out_features, in_features, dtype, device)
    from flux2 import bnb_linear  # imports bitsandbytes: only when asked for

    if mode == "nf4":
        return bnb_linear.Nf4Builder(out_features, in_features, dtype, device)
    if mode == "int8":
        return bnb_linear.Int8Builder(out_features, in_features, device)
    raise ValueError(f"no quantised Linear for mode {mode!r}")


def linear_bytes(mode: str, out_features: int, in_features: int, dtype_itemsize: int = 2) -> int:
    """Exact resident bytes of one quantised Linear weight (without bias), as `stream_linear` builds it."""
    if mode == "none":
        return out_features * in_features * dtype_itemsize
    if mode == "fp8":
        return fp8_bytes(out_features, in_features, dtype_itemsize)
    from flux2 import bnb_linear

    if mode == "nf4":
        return bnb_linear.nf4_bytes(out_features, in_features)
    if mode == "int8":
        return bnb_linear.int8_bytes(out_features, in_features)
    raise ValueError(f"unknown quantisation mode {mode!r}")


def is_quantized_linear(module: nn.Module) -> bool:
    """A frozen Linear whose weight is stored quantised (it has dequantized_weight / set_weight)."""
    return hasattr(module, "dequantized_weight") and hasattr(module, "set_weight")


def dequantized_weight(module: nn.Module, dtype: torch.dtype) -> Tensor:
    """The weight of any of our Linears in `dtype`."""
    return module.dequantized_weight(dtype) if is_quantized_linear(module) else module.weight.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Pre-quantised (fp8) files


@dataclass(frozen=True)
class Fp8Layer:
    """One Linear of a pre-quantised file: fp8 values in `weight_key`, times the scale in `scale_key` (none: 1)."""

    weight_key: str
    scale_key: str | None
    dtype: torch.dtype


@dataclass
class PrequantizedLayout:
    """What a file's header says about its pre-quantised layers (keys without the model prefix)."""

    layers: dict[str, Fp8Layer] = field(default_factory=dict)  # module path -> its fp8 weight
    extra_keys: set[str] = field(default_factory=set)  # scales, markers and formats: not model weights
    kind: str = ""  # "ComfyUI scaled_fp8", "ComfyUI mixed precision", "plain fp8" or ""
    format_keys: dict[str, str] = field(default_factory=dict)  # module path -> its comfy_quant key

    def describe(self) -> str:
        return f"{self.kind} ({len(self.layers)} fp8 layers)"

    def file_layers(self, key_map: dict[str, str]) -> dict[str, Fp8Layer]:
        """The layers with the file's own keys (model key -> file key, e.g. with ComfyUI's prefix)."""
        return {module: Fp8Layer(key_map[layer.weight_key], layer.scale_key and key_map[layer.scale_key],
                                 layer.dtype) for module, layer in self.layers.items()}


def prequantized_layout(shapes: dict[str, tuple[Shape, torch.dtype]], metadata: dict[str, str],
                        path: object = "checkpoint") -> PrequantizedLayout:
    """The fp8 layers of a file from its header (keys prefix-stripped): ComfyUI scaled_fp8 and mixed-precision
    files, and plain fp8 weights (scale 1). CheckpointError for a quantised format this tool cannot read."""
    layout = PrequantizedLayout()
    if SCALED_FP8_MARKER in shapes:
        layout.extra_keys.add(SCALED_FP8_MARKER)
        layout.kind = "ComfyUI scaled_fp8"
    for key, (shape, dtype) in shapes.items():
        if key.endswith(".weight_scale_2") or (key.endswith(".weight") and dtype in (torch.uint8, torch.int8)):
            raise CheckpointError(f"{path} stores {key} in a 4-bit or int8 ComfyUI format (nvfp4 / int8), which this "
                                  "tool does not read: use the bf16 or fp8 file of the model and --quantize nf4 / "
                                  "int8 to quantise it at load time")
        if key.endswith(INPUT_SCALE_SUFFIXES):
            layout.extra_keys.add(key)
        elif key.endswith(".comfy_quant"):
            layout.extra_keys.add(key)
            layout.format_keys[key.removesuffix(".comfy_quant")] = key
            layout.kind = layout.kind or "ComfyUI mixed precision"
    for key, (shape, dtype) in shapes.items():
        module = next((key.removesuffix(s) for s in WEIGHT_SCALE_SUFFIXES if key.endswith(s)), None)
        if module is not None:
            layout.extra_keys.add(key)
            layout.kind = layout.kind or "ComfyUI scaled_fp8"
            weight = shapes.get(f"{module}.weight")
            if weight is None or weight[1] not in FP8_DTYPES:
                found = "no weight" if weight is None else f"a {str(weight[1]).removeprefix('torch.')} weight"
                raise CheckpointError(f"{path} has the fp8 scale {key} but {found} for it; the file is damaged or "
                                      "of an unknown quantised layout: use the bf16 file")
            _check_scale_shape(shape, weight[0], key, path)
            layout.layers[module] = Fp8Layer(f"{module}.weight", key, weight[1])
    for key, (shape, dtype) in shapes.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and dtype in FP8_DTYPES and module not in layout.layers:
            layout.layers[module] = Fp8Layer(key, None, dtype)
            layout.kind = layout.kind or "plain fp8"
    _check_metadata_formats(metadata, path)
    return layout


def _check_scale_shape(scale: Shape, weight: Shape, key: str, path: object) -> None:
    numel, out_features = math.prod(scale), weight[0]
    in_features = weight[1] if len(weight) == 2 else 0
    blocks = scale[1] if len(scale) >= 2 else 1
    ok = numel == 1 or tuple(scale) in ((out_features,), (out_features, 1)) or (
        len(scale) in (2, 3) and scale[0] == out_features and in_features % blocks == 0
        and (len(scale) == 2 or scale[2] == 1))
    if len(weight) != 2 or not ok:
        raise CheckpointError(f"{path}: the fp8 scale {key} has shape {list(scale)}, which fits no scaling of its "
                              f"{list(weight)} weight (one per tensor, per row or per block)")


def _check_formats(formats: dict[str, str], path: object) -> None:
    unknown = sorted({f for f in formats.values() if f not in COMFY_FP8_FORMATS})
    if unknown:
        layers = [name for name, f in formats.items() if f in unknown]
        raise CheckpointError(f"{path} quantises {len(layers)} layers ({', '.join(layers[:3])}) as "
                              f"{', '.join(unknown)}; this tool reads the fp8 formats "
                              f"({', '.join(COMFY_FP8_FORMATS)}): use the bf16 or fp8 file of the model")


def _check_metadata_formats(metadata: dict[str, str], path: object) -> None:
    if QUANT_METADATA_KEY not in metadata:
        return
    try:
        layers = json.loads(metadata[QUANT_METADATA_KEY])["layers"]
        formats = {name: conf.get("format") for name, conf in layers.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path}: its {QUANT_METADATA_KEY} metadata is not the JSON ComfyUI writes "
                              '({"layers": {name: {"format": ...}}})') from None
    _check_formats(formats, path)


def check_layer_formats(file: TensorFile, layout: PrequantizedLayout, key_map: dict[str, str]) -> None:
    """Read the (tiny) comfy_quant tensors and refuse formats other than fp8 (nvfp4, int8, ...)."""
    formats = {}
    for module, key in layout.format_keys.items():
        raw = file.read(key_map[key])
        try:
            formats[module] = json.loads(bytes(raw.numpy().tobytes()).decode()).get("format")
        except (ValueError, UnicodeDecodeError, AttributeError):
            raise CheckpointError(f"{file.path}: {key_map[key]} is not the JSON of a ComfyUI layer format") from None
    _check_formats(formats, file.path)


def fp8_scale(file: TensorFile, layer: Fp8Layer, out_features: int, in_features: int) -> Tensor:
    """The layer's scale as float32 (S, blocks, 1) with S = 1 (per tensor) or out_features."""
    if layer.scale_key is None:
        return torch.ones((1, 1, 1), dtype=torch.float32)
    scale = file.read(layer.scale_key).float()
    if scale.numel() == 1:
        return scale.reshape(1, 1, 1)
    return scale.reshape(out_features, -1, 1)


def dequantize_fp8_rows(rows: Tensor, scale: Tensor, start: int, dtype: torch.dtype) -> Tensor:
    """fp8 rows [start, start + len) of a weight times their scale, in `dtype` (computed in float32)."""
    r, in_features = rows.shape
    if scale.shape[0] != 1:
        scale = scale[start:start + r]
    blocks = rows.to(torch.float32).reshape(r, scale.shape[1], -1)
    return (blocks * scale.to(rows.device)).reshape(r, in_features).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Streaming


def stream_linear(file: TensorFile, key: str, mode: str, dtype: torch.dtype, device: torch.device | str,
                  bias: Tensor | None = None, fp8_layer: Fp8Layer | None = None,
                  work: list[Tensor] | None = None) -> nn.Module:
    """The Linear whose weight is `key` in `file`, quantised in `mode` (not "none") chunk by chunk on `device`.

    Each chunk is cast to `dtype` first (the precision the model holds its weights in), so a bf16 file and its
    fp32 twin give the same result. A pre-quantised fp8 layer (`fp8_layer`) is dequantised per chunk, except in
    fp8 mode, where its values and scale are kept exactly. `work`: float32 buffers of a chunk each
    (work_buffers), one per thread quantising chunks at once (none: one chunk at a time, in this thread)."""
    out_features, in_features = file.shape(key)
    if fp8_layer is not None and mode == "fp8":
        scale = fp8_scale(file, fp8_layer, out_features, in_features)
        return Fp8Linear.from_quantized(file.read(key).to(device), scale.to(device), bias)
    build = builder(mode, out_features, in_features, dtype, device)
    scale = fp8_scale(file, fp8_layer, out_features, in_features) if fp8_layer is not None else None
    step = rows_per_chunk(in_features)

    def add(start: int, rows: Tensor, buffer: Tensor | None = None) -> None:
        rows = rows.to(device)
        build.add(start, rows.to(dtype) if scale is None else dequantize_fp8_rows(rows, scale, start, dtype), buffer)

    if not work:
        for start, rows in file.iter_rows(key, step):
            add(start, rows)
        return build.finish(bias)

    free = queue.SimpleQueue()  # the buffers not in use: never empty while at most len(work) chunks are in flight
    for buffer in work:
        free.put(buffer)

    def add_in_a_free_buffer(start: int, rows: Tensor) -> None:
        buffer = free.get()
        try:
            add(start, rows, buffer)
        finally:
            free.put(buffer)

    workers = len(work)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        # A chunk stays valid until the (workers + 1)-th next one is asked for, and at most `workers` are being
        # quantised when the next is asked for: the reader never refills a buffer still being quantised.
        for start, rows in file.iter_rows(key, step, keep=workers + 1):
            if len(pending) == workers:
                pending.popleft().result()
            pending.append(pool.submit(add_in_a_free_buffer, start, rows))
        for future in pending:
            future.result()
    return build.finish(bias)


MAX_QUANTISING_THREADS = 4  # each holds a chunk and its float32 buffer (24 MB)


def work_buffers(shapes: list[Shape], device: torch.device | str, workers: int | None = None) -> list[Tensor]:
    """float32 buffers for quantising the (out, in) weights `shapes` chunk by chunk, one per thread that
    quantises chunks at once: one per core torch would use on the CPU, up to MAX_QUANTISING_THREADS (each chunk's
    operations then run on one core, with no lock-step between cores, which the threads reading the file would
    otherwise stall); none on a GPU, whose kernels run asynchronously anyway (one chunk at a time). `workers`
    overrides the count. Allocated once per load: fresh memory for each weight's buffer cost a page fault per 4 KB
    written."""
    if workers is None:
        workers = min(torch.get_num_threads(), MAX_QUANTISING_THREADS) if torch.device(device).type == "cpu" else 0
    if workers < 2 or not shapes:
        return []
    elements = max(min(rows_per_chunk(in_features), out_features) * in_features for out_features, in_features in shapes)
    return [torch.empty(elements, dtype=torch.float32) for _ in range(workers)]


@contextmanager
def one_thread_per_op(enabled: bool = True):
    """torch's operations on one thread while chunks are quantised in parallel threads (restored afterwards)."""
    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def read_weight(file: TensorFile, key: str, dtype: torch.dtype, device: torch.device | str,
                fp8_layer: Fp8Layer | None = None) -> Tensor:
    """A tensor that stays unquantised, copied into fresh memory in `dtype` on `device` (an fp8 layer of a
    pre-quantised file is dequantised a chunk of rows at a time)."""
    if fp8_layer is None:
        tensor = file.read(key)
        if not tensor.is_floating_point():
            return tensor.to(device)
        return tensor.to(device=device, dtype=dtype)
    out_features, in_features = file.shape(key)
    scale = fp8_scale(file, fp8_layer, out_features, in_features)
    weight = torch.empty((out_features, in_features), dtype=dtype, device=device)
    for start, rows in file.iter_rows(key, rows_per_chunk(in_features)):
        weight[start:start + rows.shape[0]] = dequantize_fp8_rows(rows.to(device), scale, start, dtype)
    return weight


def _libc():
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


_LIBC = _libc()
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@contextmanager
def loading_heap():
    """While quantising a file: every allocation of 1 MB or more gets its own mapping, given back when freed.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MB), so the chunk temporaries of
    a streaming load (8-32 MB) would land on the heap between long-lived weights and their freed pages would
    stay with the process: measured +10-20% of the model's size after a quantised load, +1.5% with this.
    Afterwards the threshold is left at 32 MB, where glibc's own adjustment ends up anyway."""
    if _LIBC is None:
        yield
        return
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        _LIBC.malloc_trim(0)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at the dotted `path` of `model` (replacing what is there)."""
    parent_name, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def assign_tensor(model: nn.Module, name: str, tensor: Tensor) -> None:
    """Set parameter or buffer `name` (dotted) of `model` to `tensor` (frozen), replacing a meta placeholder."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if leaf in parent._parameters:
        parent._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in parent._buffers:
        parent._buffers[leaf] = tensor
    else:
        raise KeyError(f"{name} is neither a parameter nor a buffer of the model")


def load_streaming(model: nn.Module, locate, quantized: set[str], mode: str, dtype: torch.dtype,
                   device: torch.device | str, fp8_layers: dict[str, Fp8Layer] | None = None,
                   names: list[str] | None = None, desc: str | None = None) -> None:
    """Fill `model` (built on the meta device) from files, tensor by tensor: the Linears named in `quantized`
    become `mode`'s quantised Linears (stream_linear), every other tensor is copied (read_weight).

    `locate(name)` gives the (TensorFile, key) holding the model tensor `name`; `names` orders the reads (default:
    the state_dict order); `fp8_layers` are the pre-quantised layers of the files (module path -> Fp8Layer)."""
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    with loading_heap():
        work = work_buffers([shapes[f"{m}.weight"] for m in quantized if f"{m}.weight" in shapes], device)
        with one_thread_per_op(bool(work)):
            _load_streaming(model, locate, quantized, mode, dtype, device, fp8_layers or {}, names, desc, shapes,
                            work)


def _load_streaming(model, locate, quantized, mode, dtype, device, fp8_layers, names, desc, shapes, work) -> None:
    from tqdm import tqdm

    state = list(shapes)
    for name in tqdm(names or state, desc=desc, unit="tensor", leave=False, disable=None if desc else True):
        file, key = locate(name)
        if tuple(file.shape(key)) != shapes[name]:
            raise CheckpointError(f"{file.path}: {key} has shape {list(file.shape(key))}, the model expects "
                                  f"{list(shapes[name])}")
        module_name, _, leaf = name.rpartition(".")
        fp8_layer = fp8_layers.get(module_name) if leaf == "weight" else None
        if module_name in quantized:
            if leaf == "weight":  # its bias, if any, goes in with it
                bias = None
                if f"{module_name}.bias" in state:
                    bias = read_weight(*locate(f"{module_name}.bias"), dtype, device)
                set_module(model, module_name,
                           stream_linear(*locate(name), mode, dtype, device, bias, fp8_layer, work))
            continue
        assign_tensor(model, name, read_weight(*locate(name), dtype, device, fp8_layer))
