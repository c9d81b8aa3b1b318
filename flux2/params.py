"""`params.yaml`: the typed settings of every stage, validated before any work starts.

Each top-level group is a dataclass; a stage reads its group (`load_params().train`). Validation reports the
first problem as one line naming the key: unknown keys (with the nearest valid name), wrong types, bad choices,
paths that do not exist, a text encoder that does not fit the variant.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flux2.network_config import NetworkConfigError, network_options
from flux2.variants import VARIANTS


class ParamsError(ValueError):
    """A params.yaml problem, one line naming the key."""


@dataclass
class ModelParams:
    model_version: str = "tiny"  # the FLUX.2 variant
    dit: str = "models/tiny/dit.safetensors"  # the DiT file (BFL or ComfyUI layout, bf16 or fp8)
    vae: str = "models/tiny/ae.safetensors"  # the autoencoder file (ae.safetensors)
    text_encoder: str = "models/tiny/text_encoder"  # its folder, or the first file of a split set
    tokenizer: str | None = None  # the tokenizer folder when it is not beside the text encoder
    dtype: str = "auto"  # frozen base weights: auto (bf16; fp32 for tiny on CPU) | bfloat16 | float32
    vae_dtype: str = "float32"  # the autoencoder's dtype
    fp8_base: bool = False  # DiT block Linears in block-wise scaled fp8 (= quantize: fp8)
    fp8_scaled: bool = False  # with fp8_base: the seed's name for the same scaled fp8
    fp8_text_encoder: bool = False  # text encoder Linears in fp8 (= text_encoder_quantize: fp8)
    fp8_matmul: bool = False  # block Linears in row-wise fp8, multiplied in fp8 (torch._scaled_mm; flux2/fp8_matmul.py)
    attention_backend: str = "auto"  # auto | flash | cudnn | efficient | math: the blocks' SDPA kernel
    quantize: str = "none"  # DiT block Linears: none | fp8 (= fp8_base) | nf4 | int8 (bitsandbytes; QLoRA)
    text_encoder_quantize: str = "none"  # text encoder Linears: none | fp8 (= fp8_text_encoder) | nf4 | int8
    blocks_to_swap: int = 0  # DiT blocks kept in pinned CPU memory and streamed in (CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class SourceParams:
    """One dataset source: a folder of images with captions, or a manifest (JSONL / CSV / Parquet)."""

    image_directory: str | None = None
    manifest: str | None = None  # .jsonl / .csv / .parquet with image_path, caption[, control_path[_N]]
    image_jsonl_file: str | None = None  # musubi-tuner's name for a JSONL manifest
    control_directory: str | None = None
    root: str | None = None  # manifest paths must stay inside this folder (default: the manifest's folder)
    caption_extension: str = ".txt"
    resolution: int | list[int] = 1024  # one side (square area) or [width, height]
    num_repeats: int = 1
    enable_bucket: bool = True
    bucket_no_upscale: bool = False
    batch_size: int | None = None  # items per batch from this source (null: train.batch_size)
    # Reference (control) images: by default brought to their item's bucket. no_resize_control: kept at their own
    # size (floored to multiples of 16); control_resolution: the nearest-aspect bucket at that area; both: that
    # area is a maximum (musubi-tuner's rules; official FLUX.2 editing: no_resize_control + [2024, 2024]).
    no_resize_control: bool = False
    control_resolution: int | list[int] | None = None
    # Masked loss: a mask per image (white = learn, black = ignore), from `<stem>.*` in mask_directory or from the
    # image's own alpha channel (alpha_mask); the loss is weighted by it (train.masked_loss).
    mask_directory: str | None = None
    alpha_mask: bool = False


@dataclass
class DatasetParams:
    sources: list[SourceParams] = field(default_factory=list)
    toml: str | None = None  # a musubi-tuner dataset config, accepted as-is instead of / besides `sources`
    on_error: str = "skip"  # skip bad items and report them | fail on the first
    min_side: int = 64
    max_pixels: int = 64_000_000
    manifest: str = "data/manifest.parquet"
    report: str = "reports/ingest.json"


@dataclass
class CacheParams:
    latents_dir: str = "cache/latents"
    text_dir: str = "cache/text"
    shard_mb: int = 256
    batch_size: int = 8
    text_dtype: str = "bfloat16"
    store: str | bool | None = None  # shared entry store: null = $FLUX2_CACHE_STORE or ~/.cache/flux2/store; false


@dataclass
class TrainParams:
    output_dir: str = "outputs/lora"  # where the LoRA file goes
    output_name: str = "lora"
    checkpoint_dir: str = "checkpoints"  # resumable checkpoints, one folder per configuration
    network_dim: int = 32  # the adapter's rank
    network_alpha: float = 1.0  # the update is scaled by alpha / rank
    network_type: str = "lora"  # lora | lokr | loha (LyCORIS); docs/adapters.md
    network_args: dict[str, Any] = field(default_factory=dict)  # LoKr factor, per-block ranks / rates (network_config)
    network_dropout: float = 0.0  # dropout of the adapter's inner activations
    rank_dropout: float = 0.0  # dropout of whole ranks
    module_dropout: float = 0.0  # skip a whole module's update with this probability
    include_patterns: list[str] = field(default_factory=list)  # regexes of module names to adapt
    exclude_patterns: list[str] = field(default_factory=list)  # regexes of module names to leave out
    network_module: str = "networks.lora_flux_2"  # musubi-tuner's module name for the FLUX.2 LoRA
    network_weights: str | None = None  # start from this LoRA file (kohya, ComfyUI/BFL or diffusers layout)
    optimizer_type: str = "adamw"  # adamw | adamw8bit | adafactor | module.Class
    optimizer_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the optimizer
    learning_rate: float = 1e-4
    loraplus_lr_ratio: float | None = None  # LoRA+: the up weights learn at ratio x learning_rate (null: off)
    lr_scheduler: str = "constant"  # the learning-rate schedule
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    max_grad_norm: float = 1.0  # gradient clipping (0: off)
    batch_size: int = 1  # items per step and process, for sources without a batch_size
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "bf16"  # autocast of the forward in bf16, or no
    gradient_checkpointing: bool = True  # recompute block activations in backward: less memory
    gradient_checkpointing_blocks: int | None = None  # recompute only the first N blocks (None: all)
    compile: bool | str = "auto"  # auto (on for CUDA) | true | false: regional torch.compile (flux2/compile.py)
    fsdp: bool = False  # shard the frozen DiT over the processes (accelerate launch), e.g. dev on 80 GB cards
    max_train_steps: int | None = 1000
    max_train_epochs: int | None = None  # when set, it decides the run length instead of max_train_steps
    seed: int = 42  # decides batches, noise and timesteps
    timestep_sampling: str = "flux2_shift"  # flux2_shift | sigmoid | uniform | shift | logit_normal
    discrete_flow_shift: float = 1.0
    sigmoid_scale: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    weighting_scheme: str = "none"  # none | sigma_sqrt | cosmap
    guidance: float = 1.0  # dev's embedded guidance input during training
    caption_dropout_rate: float = 0.0  # share of items trained with the empty caption
    masked_loss: bool = True  # weight the loss by the dataset's masks where it has them (false: ignore masks)
    ema_decay: float | None = None  # EMA of the LoRA weights, saved beside it as <output_name>_ema; null/0: off
    sample_prompts: str | None = None  # a prompt file (seed format) sampled during and after training
    sample_every_n_steps: int = 0
    sample_every_n_epochs: int = 0
    save_every_n_steps: int = 100  # checkpoints (resumable state)
    save_every_n_epochs: int = 0  # LoRA files <output_name>-<epoch:06d>.safetensors (not after the last epoch)
    max_bad_steps: int = 10  # stop after this many non-finite steps in a row
    log_every_n_steps: int = 1  # how often the loss is read and logged


@dataclass
class ConceptParams:
    """The concept a LoRA teaches, measured in its samples (flux2/concept.py): pixels near `colour`."""

    colour: list[int] = field(default_factory=lambda: [128, 0, 128])  # 8-bit RGB
    tolerance: float = 60.0  # Euclidean distance in RGB
    min_fraction: float = 0.02  # a sample shows the concept when this share of its pixels does
    word: str | None = None  # only prompts containing it are scored (None: all)


@dataclass
class EvalParams:
    holdout_fraction: float = 0.1
    holdout_min_items: int = 20  # a dataset of fewer distinct images holds none out (validation on training items)
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    timesteps: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    noise_seed: int = 1234
    image_size: list[int] | None = None  # [height, width]; default: the variant's sample size (1024^2; tiny 128^2)
    infer_steps: int | None = None
    guidance_scale: float | None = None
    clip_model: str | None = None
    concept: ConceptParams | None = None
    output_dir: str = "outputs/eval"


@dataclass
class TrackingParams:
    tracking_uri: str | None = None  # default: sqlite file mlflow.db at the repository root (absolute)
    experiment: str = "flux2"


@dataclass
class Params:
    model: ModelParams = field(default_factory=ModelParams)
    dataset: DatasetParams = field(default_factory=DatasetParams)
    cache: CacheParams = field(default_factory=CacheParams)
    train: TrainParams = field(default_factory=TrainParams)
    eval: EvalParams = field(default_factory=EvalParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)


# train.optimizer_type: these names, or `module.Class` in one of these packages (see flux2/optim.py). Naming a
# class imports its module, which runs the module's code: only packages that exist to provide optimizers qualify.
OPTIMIZER_NAMES = ("adamw", "adamw8bit", "adafactor")  # any case, as in musubi-tuner
OPTIMIZER_PACKAGES = ("torch.optim", "bitsandbytes.optim", "transformers.optimization", "prodigyopt",
                      "lion_pytorch", "dadaptation", "schedulefree", "came_pytorch", "pytorch_optimizer",
                      "torchao.optim", "optimi")


def optimizer_type_problem(optimizer_type: str) -> str | None:
    """Why `optimizer_type` may not be loaded (decided without importing anything), or None when it may."""
    if optimizer_type.lower() in OPTIMIZER_NAMES:
        return None
    module_name, _, class_name = optimizer_type.rpartition(".")
    allowed = any(module_name == p or module_name.startswith(p + ".") for p in OPTIMIZER_PACKAGES)
    if module_name and class_name.isidentifier() and allowed:
        return None
    return (f"{optimizer_type!r} is not an optimizer this trainer loads; use {', '.join(OPTIMIZER_NAMES)} or a "
            f"class of {', '.join(OPTIMIZER_PACKAGES)} (e.g. torch.optim.SGD, prodigyopt.Prodigy)")


def field_notes(cls: type) -> dict[str, str]:
    """The comment after each field of a params dataclass (`dtype: str = "auto"  # frozen base weights ...`),
    by field name: what `flux2 train --help` says of the option."""
    import inspect
    import io
    import tokenize

    notes: dict[str, str] = {}
    field, line = None, -1
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] != line:
            field, line = tok.string, tok.start[0]
        elif tok.type == tokenize.COMMENT and tok.start[0] == line and field:
            notes[field] = tok.string.lstrip("# ").strip()
    return notes


CHOICES = {
    "model.model_version": list(VARIANTS),
    "model.dtype": ["auto", "bfloat16", "float32"],
    "model.quantize": ["none", "fp8", "nf4", "int8"],
    "model.text_encoder_quantize": ["none", "fp8", "nf4", "int8"],
    "model.vae_dtype": ["bfloat16", "float32"],
    "model.attention_backend": ["auto", "flash", "cudnn", "efficient", "math"],
    "dataset.on_error": ["skip", "fail"],
    "cache.text_dtype": ["bfloat16", "float32"],
    "train.mixed_precision": ["bf16", "no"],
    "train.lr_scheduler": ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                           "polynomial"],
    "train.timestep_sampling": ["flux2_shift", "sigmoid", "uniform", "shift", "logit_normal"],
    "train.weighting_scheme": ["none", "sigma_sqrt", "cosmap"],
}


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (after int -> float widening); returns the value to store."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if dataclasses.is_dataclass(option) and isinstance(value, dict):
                return _convert(value, option, key)  # a mapping is meant as this group: report its own error
            try:
                return _convert(value, option, key)
            except ParamsError:
                continue
        raise ParamsError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ParamsError(f"{key}: expected null, got {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}, "
                              f"got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML's .nan / .inf: no setting means that
                raise ParamsError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ParamsError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


# What YAML 1.1 (PyYAML) reads as a bool. `dvc exp run -S` writes values back unquoted, so a choice such as
# `mixed_precision: "no"` comes back as `no`, which is False: the word is recovered from the bool.
YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _yaml_word(value: bool, choices: list) -> Any:
    """The choice that YAML turned into `value` (e.g. "no" for False), or `value` unchanged (then an error)."""
    return next((w for w in YAML_BOOL_WORDS[value] if w in choices), value)


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{near[0]}?" if near else \
                f"; valid keys: {', '.join(names)}"
            raise ParamsError(f"{full}: unknown key{hint}")
        choices = CHOICES.get(full)
        if choices is not None and isinstance(value, bool):
            value = _yaml_word(value, choices)
            if isinstance(value, bool):
                raise ParamsError(f"{full}: {value!r} is not one of {', '.join(map(str, choices))}")
        kwargs[key] = _convert(value, hints[key], full)
        if choices is not None and kwargs[key] not in choices:
            raise ParamsError(f"{full}: {kwargs[key]!r} is not one of {', '.join(map(str, choices))}")
    return cls(**kwargs)


def parse_params(data: dict | None, source: str = "params.yaml") -> Params:
    """Typed Params from a parsed YAML mapping; ParamsError (prefixed by `source`) on the first problem."""
    try:
        params = _build(Params, data or {}, "")
        params.train.compile = parse_auto_bool(params.train.compile, "train.compile")
        check_semantics(params)
        return params
    except ParamsError as e:
        raise ParamsError(f"{source}: {e}") from None


MAX_PARAMS_BYTES = 10_000_000


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping (plain YAML keeps the last one, so a
    pasted block silently overrides a setting above it). Merge keys (`<<: *base`) may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key} is given twice (lines {first} and {key_node.start_mark.line + 1}); keep one",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_params_file(path: str | Path) -> dict:
    """The mapping in a params.yaml (safe YAML, no duplicate keys, size-limited); ParamsError naming the file and
    the line otherwise."""
    from flux2.user_files import UserFileError, read_limited

    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the repository root or pass --params PATH")
    try:
        loader = _UniqueKeyLoader(read_limited(path, MAX_PARAMS_BYTES, "params.yaml").decode("utf-8"))
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except UserFileError as e:
        raise ParamsError(str(e)) from None
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        what = " ".join(f"{getattr(e, 'context', '') or ''} {getattr(e, 'problem', '') or e}".split())
        if isinstance(e, yaml.constructor.ConstructorError) and "tag" in what:
            what += "; params.yaml holds plain values only, no !!python or other tags"
        elif not isinstance(e, yaml.constructor.ConstructorError):
            what = f"not valid YAML ({what}); fix the syntax there"
        raise ParamsError(f"{path}{where}: {what}") from None
    except RecursionError:
        raise ParamsError(f"{path}: nested too deeply to be a params file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of groups (model, dataset, ...), got {type(data).__name__}")
    return data


def load_params(path: str | Path = "params.yaml", check_paths: bool = True) -> Params:
    """Read and validate params.yaml. Relative paths in it are relative to the file's folder."""
    path = Path(path)
    params = parse_params(read_params_file(path), str(path))
    if check_paths:
        check_model_paths(params, path.parent, str(path))
    return params


def check_semantics(p: Params) -> None:
    """Cross-field rules that types cannot express."""
    t = p.train
    if t.fsdp and p.model.blocks_to_swap:
        raise ParamsError("train.fsdp: cannot be combined with model.blocks_to_swap (both decide where the "
                          "weights live); use one")
    _check_speed_options(p)
    if p.model.fp8_scaled and not p.model.fp8_base:
        raise ParamsError("model.fp8_scaled: needs model.fp8_base: true (scaled fp8 is a form of fp8 base)")
    m = p.model
    if m.fp8_base and m.quantize not in ("none", "fp8"):
        raise ParamsError(f"model.quantize: {m.quantize} and model.fp8_base both quantise the DiT; choose one")
    if m.fp8_text_encoder and m.text_encoder_quantize not in ("none", "fp8"):
        raise ParamsError(f"model.text_encoder_quantize: {m.text_encoder_quantize} and model.fp8_text_encoder both "
                          "quantise the text encoder; choose one")
    if m.fp8_matmul and (m.fp8_base or m.quantize != "none"):
        other = "model.fp8_base" if m.fp8_base else f"model.quantize: {m.quantize}"
        raise ParamsError(f"model.fp8_matmul: stores the block Linears in an fp8 of its own (row-wise scales), so it "
                          f"cannot be combined with {other}; choose one")
    if m.quantize in ("nf4", "int8") and (m.blocks_to_swap or t.fsdp):
        other = "model.blocks_to_swap" if m.blocks_to_swap else "train.fsdp"
        raise ParamsError(f"model.quantize: {m.quantize} cannot be combined with {other} (bitsandbytes' quantisation "
                          "state does not move with swapped or sharded blocks); use fp8 with it, or drop it: a "
                          f"{m.quantize} DiT needs a quarter to half of the bf16 memory")
    try:
        network_options(t, VARIANTS[p.model.model_version])
    except NetworkConfigError as e:
        raise ParamsError(str(e)) from None
    if p.model.blocks_to_swap < 0 or p.model.blocks_to_swap > VARIANTS[p.model.model_version].max_blocks_to_swap:
        raise ParamsError(f"model.blocks_to_swap: {p.model.blocks_to_swap} is outside 0.."
                          f"{VARIANTS[p.model.model_version].max_blocks_to_swap} for {p.model.model_version}")
    for key, value in (("train.save_every_n_epochs", t.save_every_n_epochs),
                       ("train.sample_every_n_epochs", t.sample_every_n_epochs)):
        if value < 0:
            raise ParamsError(f"{key}: must be 0 (off) or a number of epochs, got {value}")
    if t.sample_every_n_epochs and not t.sample_prompts:
        raise ParamsError(f"train.sample_every_n_epochs: {t.sample_every_n_epochs}, but train.sample_prompts is not "
                          "set; name a prompt file there, or set 0")
    if t.ema_decay is not None and not 0.0 <= t.ema_decay < 1.0:
        raise ParamsError(f"train.ema_decay: must be in (0, 1), e.g. 0.999 (null or 0: no EMA), got {t.ema_decay}")
    if t.max_train_steps is None and t.max_train_epochs is None:
        raise ParamsError("train.max_train_steps: set it or train.max_train_epochs")
    for key, value in (("train.caption_dropout_rate", t.caption_dropout_rate),
                       ("eval.holdout_fraction", p.eval.holdout_fraction), ("train.network_dropout", t.network_dropout),
                       ("train.rank_dropout", t.rank_dropout), ("train.module_dropout", t.module_dropout)):
        if not 0.0 <= value < 1.0:
            raise ParamsError(f"{key}: must be in [0, 1), got {value}")
    if not all(0.0 < x < 1.0 for x in p.eval.timesteps):
        raise ParamsError(f"eval.timesteps: each must be in (0, 1), got {p.eval.timesteps}")
    if p.eval.image_size is not None and (len(p.eval.image_size) != 2
                                          or any(s % 16 or s <= 0 for s in p.eval.image_size)):
        raise ParamsError(f"eval.image_size: [height, width], multiples of 16, got {p.eval.image_size}")
    for i, s in enumerate(p.dataset.sources):
        key = f"dataset.sources[{i}]"
        given = [k for k in ("image_directory", "manifest", "image_jsonl_file") if getattr(s, k)]
        if len(given) != 1:
            raise ParamsError(f"{key}: give exactly one of image_directory, manifest, image_jsonl_file "
                              f"(got {', '.join(given) or 'none'})")
        for name in ("resolution", "control_resolution"):
            value = getattr(s, name)
            res = [value] if isinstance(value, int) else value
            if res is not None and (len(res) not in (1, 2) or any(r < 16 for r in res)):
                raise ParamsError(f"{key}.{name}: an int or [width, height], each at least 16, got {value}")
        if s.num_repeats < 1:
            raise ParamsError(f"{key}.num_repeats: must be at least 1, got {s.num_repeats}")
        if s.batch_size is not None and s.batch_size < 1:
            raise ParamsError(f"{key}.batch_size: must be at least 1 (or null for train.batch_size), got "
                              f"{s.batch_size}")
        if s.mask_directory and s.alpha_mask:
            raise ParamsError(f"{key}.alpha_mask: give mask_directory or alpha_mask, not both")
    if not p.dataset.sources and not p.dataset.toml:
        raise ParamsError("dataset.sources: empty; list at least one source or set dataset.toml")
    check_ranges(p)


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_ranges(p: Params) -> None:
    """Counts, step intervals and rates within what they can mean, the device and optimizer named in forms that
    can load, and resolutions that fit dataset.max_pixels: each refused by its key before any work starts."""
    t, d = p.train, p.dataset
    at_least = [
        ("train.network_dim", t.network_dim, 1),
        ("train.batch_size", t.batch_size, 1),
        ("train.gradient_accumulation_steps", t.gradient_accumulation_steps, 1),
        ("train.max_bad_steps", t.max_bad_steps, 1),
        ("train.max_train_steps", t.max_train_steps, 1),  # None (use max_train_epochs) is fine
        ("train.max_train_epochs", t.max_train_epochs, 1),
        ("train.log_every_n_steps", t.log_every_n_steps, 1),
        ("train.lr_scheduler_num_cycles", t.lr_scheduler_num_cycles, 1),
        ("train.save_every_n_steps", t.save_every_n_steps, 0),  # 0: never
        ("train.sample_every_n_steps", t.sample_every_n_steps, 0),
        ("train.lr_warmup_steps", t.lr_warmup_steps, 0),
        ("train.learning_rate", t.learning_rate, 0),
        ("train.max_grad_norm", t.max_grad_norm, 0),  # 0: no clipping
        ("dataset.min_side", d.min_side, 1),
        ("dataset.max_pixels", d.max_pixels, 1),
        ("cache.shard_mb", p.cache.shard_mb, 1),
        ("cache.batch_size", p.cache.batch_size, 1),
        ("eval.infer_steps", p.eval.infer_steps, 1),
        ("eval.holdout_min_items", p.eval.holdout_min_items, 0),
    ]
    for key, value, low in at_least:
        if value is not None and value < low:
            raise ParamsError(f"{key}: must be at least {low}, got {value}")
    for key, value in (("train.network_alpha", t.network_alpha), ("train.discrete_flow_shift",
                                                                  t.discrete_flow_shift)):
        if value <= 0:
            raise ParamsError(f"{key}: must be above 0, got {value}")
    if not DEVICE.fullmatch(p.model.device):
        raise ParamsError(f"model.device: {p.model.device!r} is not a device; use auto, cpu, cuda or cuda:N")
    problem = optimizer_type_problem(t.optimizer_type)
    if problem:
        raise ParamsError(f"train.optimizer_type: {problem}")
    for i, s in enumerate(d.sources):
        res = [s.resolution] * 2 if isinstance(s.resolution, int) else s.resolution
        if len(res) == 2 and res[0] * res[1] > d.max_pixels:
            raise ParamsError(f"dataset.sources[{i}].resolution: {s.resolution} ({res[0]}x{res[1]} = "
                              f"{res[0] * res[1]:,} pixels) is over dataset.max_pixels ({d.max_pixels:,}); FLUX.2 "
                              "trains at 256 to 2048 (a typo?)")


def parse_auto_bool(value: bool | str, key: str) -> bool | str:
    """An `auto | true | false` setting from the YAML bool or the words (DVC's `-S key=true` writes a bool):
    "auto", True or False; ParamsError naming `key` otherwise."""
    if isinstance(value, bool):
        return value
    word = {"auto": "auto", "true": True, "false": False}.get(str(value).lower())
    if word is None:
        raise ParamsError(f"{key}: {value!r} is not one of auto, true, false")
    return word


def _check_speed_options(p: Params) -> None:
    t, variant = p.train, VARIANTS[p.model.model_version]
    blocks = variant.depth + variant.depth_single_blocks
    n = t.gradient_checkpointing_blocks
    if n is not None:
        if not 0 <= n <= blocks:
            raise ParamsError(f"train.gradient_checkpointing_blocks: {n} is outside 0..{blocks} (the "
                              f"{p.model.model_version} DiT has {variant.depth} double and "
                              f"{variant.depth_single_blocks} single blocks); null checkpoints all")
        if p.model.blocks_to_swap and n < blocks:
            raise ParamsError("train.gradient_checkpointing_blocks: model.blocks_to_swap needs every block "
                              "checkpointed (set it to null)")


def check_model_paths(p: Params, base: Path, source: str) -> None:
    """The model files exist (relative to `base`) and the text encoder's kind fits the variant."""
    m = p.model
    for key in ("dit", "vae", "text_encoder", "tokenizer"):
        value = getattr(m, key)
        if value is not None and not (base / value).exists():
            raise ParamsError(f"{source}: model.{key}: {value} does not exist")
    if p.dataset.toml and not (base / p.dataset.toml).is_file():
        raise ParamsError(f"{source}: dataset.toml: {p.dataset.toml} does not exist")
    if p.train.network_weights and not (base / p.train.network_weights).is_file():
        raise ParamsError(f"{source}: train.network_weights: {p.train.network_weights} does not exist (a LoRA "
                          "file to start from, or null)")
    config = base / m.text_encoder / "config.json"
    if config.is_file():
        from flux2.user_files import read_json

        try:
            kind = str(read_json(config, MAX_PARAMS_BYTES, "the text encoder's config").get("model_type", ""))
        except ValueError as e:
            raise ParamsError(f"{source}: model.text_encoder: {e}") from None
        want = VARIANTS[m.model_version].text_encoder
        if want not in kind and not (want == "mistral3" and "mistral" in kind):
            raise ParamsError(f"{source}: model.text_encoder: {m.text_encoder} is a {kind!r} model, but "
                              f"{m.model_version} needs {want} (dev: Mistral 3 Small; klein: Qwen3)")


def to_flat_dict(p: Params) -> dict[str, Any]:
    """Flattened `group.key` -> value, for MLflow parameters."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{prefix}.{f.name}" if prefix else f.name, getattr(value, f.name))
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            out[prefix] = value

    walk("", p)
    return out
