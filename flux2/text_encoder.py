"""FLUX.2 text conditioning: a frozen language model whose hidden states become the DiT's context.

klein uses Qwen3 (4B / 8B), dev uses the text decoder of Mistral-Small-3.x (24B). A prompt goes through the
model's chat template, is padded to `variant.max_text_tokens`, and runs through the model with its attention
mask; the hidden states after decoder layers `variant.text_layers` (index 0 = the embedding output) are
concatenated per token, layer-major: ctx (B, L, len(layers) * D) = (B, L, variant.context_in_dim). Padding
positions are kept: the DiT attends to all L tokens.

Loading reads only safetensors (nothing is unpickled), builds the decoder on the meta device and assigns the
tensors layer by layer, so memory is never doubled. With a quantisation mode (fp8, nf4, int8: flux2.quantize)
the shards are read with plain reads, not mapped: each decoder Linear is quantised a chunk of rows at a time as
it arrives and the rest is copied, so the process holds the quantised layers and one chunk. Only the decoder layers up to the deepest one we read are
loaded (e.g. 31 of Mistral's 40): the later layers cannot change the earlier hidden states.
Imports only torch, safetensors and (inside functions, since they cost seconds) transformers / tokenizers.
"""
from __future__ import annotations

import hashlib
import itertools
import re
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn
from tqdm import tqdm

from flux2.quantize import check_mode, load_streaming
from flux2.safetensors_io import TensorFile, read_header
from flux2.user_files import one_line, read_json
from flux2.variants import TextEncoderConfig, Variant

# Goes into cache keys: bump it whenever the templates or the tokenisation below change.
TEMPLATE_VERSION = "flux2-text-1"

# BFL flux2 system_messages.py, verbatim, with its newline after "object".
SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)

KIND_NAMES = {"qwen3": "Qwen3", "mistral3": "Mistral3"}
# (kind, hidden size) -> the official text encoder with that width, for error messages.
KNOWN_ENCODERS = {("qwen3", 2560): "Qwen3-4B", ("qwen3", 4096): "Qwen3-8B", ("mistral3", 5120): "Mistral-Small-3.x-24B"}

# Built-in configs for the official encoders, used when no config.json lies beside the weights
# (ComfyUI-style single files). Keys are transformers Qwen3Config / MistralConfig fields.
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643,
                eos_token_id=151645)
QWEN3_8B = dict(QWEN3_4B, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)
MISTRAL_SMALL_3 = dict(vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                       rope_theta=1e9, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "vocab.json", "chat_template.json", "tekken.json")
MAX_JSON_BYTES = 500_000_000  # the biggest tokenizer.json files are tens of MB
_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<index>\d+)-of-(?P<total>\d+)\.safetensors$")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


# ----------------------------------------------------------------------------------------------------------
# Prompt templates


def qwen3_chat_text(tokenizer, prompt: str) -> str:
    """klein: one user message, generation prompt on, thinking off (an empty <think></think> block)."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def mistral3_conversation(prompt: str) -> list[dict]:
    """dev: the system message and one user message, content as text parts; "[IMG]" is removed from the prompt
    because the Pixtral processor counts image tokens and fails when truncation changes the count."""
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
        {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]},
    ]


def tokenize_prompts(tokenizer, kind: str, prompts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
    """input_ids and attention_mask (B, max_length) exactly as BFL / diffusers build them for `kind`."""
    if kind == "qwen3":
        texts = [qwen3_chat_text(tokenizer, p) for p in prompts]
        # One call for the batch equals one call per prompt: every row is padded to max_length on its own.
        out = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    elif kind == "mistral3":
        out = tokenizer.apply_chat_template([mistral3_conversation(p) for p in prompts], add_generation_prompt=False,
                                            tokenize=True, padding="max_length", truncation=True,
                                            max_length=max_length, return_dict=True, return_tensors="pt")
    else:
        raise ValueError(f"unknown text encoder kind {kind!r}; expected 'qwen3' or 'mistral3'")
    return out["input_ids"], out["attention_mask"]


# ----------------------------------------------------------------------------------------------------------
# The encoder


class TextEncoder:
    """A tokenizer and a frozen language model that turn prompts into FLUX.2 context for `variant`.

    `model` is any transformers decoder of the variant's kind (Qwen3Model, Qwen3ForCausalLM, MistralModel,
    Mistral3ForConditionalGeneration, ...). `fingerprint` names the weights (load_text_encoder computes it from
    the files); without one it is hashed from a sample of the model's tensors.
    """

    def __init__(self, tokenizer, model: nn.Module, variant: Variant, fingerprint: str | None = None,
                 fp8: bool = False, quantize: str = "none"):
        text_config = model.config.get_text_config()
        _check_variant_fit(variant, kind=_kind_of_config(text_config), hidden=text_config.hidden_size,
                           num_layers=text_config.num_hidden_layers, source=type(model).__name__)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"the tokenizer for {variant.name} has no chat template; FLUX.2 needs the "
                             f"{KIND_NAMES[variant.text_encoder]} chat template (chat_template.jinja)")
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.variant = variant
        self.kind = variant.text_encoder
        self.layers = tuple(variant.text_layers)
        self.max_length = variant.max_text_tokens
        self.fp8 = fp8 or quantize == "fp8"
        self.quantize = "fp8" if self.fp8 else quantize
        self._fingerprint = fingerprint

    @property
    def fingerprint(self) -> str:
        """A short hash naming the weights and tokenizer (see `load_text_encoder` for what it covers)."""
        if self._fingerprint is None:
            self._fingerprint = _model_fingerprint(self.model)
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def identity(self) -> dict[str, str]:
        """Everything that decides the embeddings, as strings, for cache keys and metadata."""
        return encoder_identity(self.kind, self.fingerprint, self.variant, self.dtype, self.quantize)

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """input_ids and attention_mask (B, max_text_tokens) of `prompts`."""
        return tokenize_prompts(self.tokenizer, self.kind, prompts, self.max_length)

    # no_grad rather than inference_mode: inference tensors cannot be saved for backward, and training uses
    # freshly encoded prompts as inputs to the DiT.
    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int | None = None) -> Tensor:
        """Context (B, max_text_tokens, context_in_dim) in the model's dtype, padding positions included."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts; wrap a single prompt as [prompt]")
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        batch_size = batch_size or len(prompts)
        chunks = [self._encode_batch(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]

    def _encode_batch(self, prompts: list[str]) -> Tensor:
        input_ids, attention_mask = self.tokenize(prompts)
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                         output_hidden_states=True, use_cache=False)
        hidden = torch.stack([out.hidden_states[k] for k in self.layers], dim=2)  # (B, L, n_layers, D)
        return hidden.reshape(hidden.shape[0], hidden.shape[1], -1)


def encoder_identity(kind: str, fingerprint: str, variant: Variant, dtype: torch.dtype, quantize: str = "none"
                     ) -> dict[str, str]:
    """What decides a text encoder's embeddings, as strings (TextEncoder.identity, flux2.cache_text's keys).
    NF4 / int8 add a `quantize` entry (fp8 has its own, older `fp8` entry), so unquantised keys stay as they were."""
    identity = {"text_encoder": kind, "fingerprint": fingerprint,
                "text_layers": ",".join(map(str, variant.text_layers)), "max_text_tokens": str(variant.max_text_tokens),
                "template_version": TEMPLATE_VERSION, "dtype": str(dtype).removeprefix("torch."),
                "fp8": str(quantize == "fp8").lower()}
    if quantize in ("nf4", "int8"):
        identity["quantize"] = quantize
    return identity


def text_encoder_quantize_mode(fp8: bool = False, quantize: str = "none") -> str:
    """The one quantisation mode of the text encoder from --fp8_text_encoder and --text_encoder_quantize."""
    check_mode(quantize, "text_encoder_quantize")
    if fp8 and quantize not in ("none", "fp8"):
        raise ValueError(f"--fp8_text_encoder and --text_encoder_quantize {quantize} both quantise the text encoder: "
                         "choose one")
    return "fp8" if fp8 else quantize


# ----------------------------------------------------------------------------------------------------------
# Checks shared by the loader and TextEncoder


def _kind_of_config(text_config) -> str:
    model_type = getattr(text_config, "model_type", "")
    return {"qwen3": "qwen3", "mistral": "mistral3", "mistral3": "mistral3"}.get(model_type, model_type)


def _check_variant_fit(variant: Variant, kind: str, hidden: int, num_layers: int, source: str) -> None:
    """A clear error unless a `kind` model with this hidden size and depth can condition `variant`."""
    want_kind = variant.text_encoder
    if kind != want_kind:
        raise ValueError(f"{source} is a {KIND_NAMES.get(kind, kind)} text encoder, but --model_version "
                         f"{variant.name} needs {KIND_NAMES[want_kind]}; pass the matching text encoder or choose "
                         f"another --model_version")
    layers = variant.text_layers
    if hidden * len(layers) != variant.context_in_dim:
        want_hidden = variant.context_in_dim // len(layers)
        expected = KNOWN_ENCODERS.get((want_kind, want_hidden), f"hidden size {want_hidden}")
        raise ValueError(f"{source}: {KIND_NAMES[kind]} with hidden {hidden} gives {hidden * len(layers)}-dim "
                         f"context (layers {list(layers)}), but --model_version {variant.name} needs "
                         f"{variant.context_in_dim} ({expected}); pass the matching text encoder or choose "
                         f"another --model_version")
    if num_layers < max(layers):
        raise ValueError(f"{source}: {KIND_NAMES[kind]} with {num_layers} layers, but --model_version "
                         f"{variant.name} reads the hidden states after layers {list(layers)}")


# ----------------------------------------------------------------------------------------------------------
# Finding the files


def resolve_weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a text encoder given as a Hugging Face folder, any file of a split set
    `...-0000k-of-0000N.safetensors`, or a single .safetensors file; each one's header checked (a truncated
    download is named here, before anything is fingerprinted or loaded)."""
    files = _find_weight_files(path)
    for file in files:
        read_header(file)
    return files


def _find_weight_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text encoder not found: {path}")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: only .safetensors text encoders are read (pickled .bin/.pt/.pth "
                             f"checkpoints are never loaded); convert it or pass the safetensors version")
        return _split_set(path) if _SPLIT_RE.match(path.name) else [path]
    files = sorted(path.glob("*.safetensors"))
    if not files and (path / "text_encoder").is_dir():  # a whole pipeline repo: text_encoder/ + tokenizer/
        return _find_weight_files(path / "text_encoder")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, MAX_JSON_BYTES, "a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: no weight_map of tensor names to files; the file is damaged: copy it again")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists weight files missing from {path}: {', '.join(missing)}")
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if len(files) == 1:
        return files
    split = [f for f in files if _SPLIT_RE.match(f.name)]
    if split and len({_SPLIT_RE.match(f.name)["stem"] for f in split}) == 1:
        return _split_set(split[0])
    found = ", ".join(f.name for f in files) or "no .safetensors files"
    raise FileNotFoundError(f"{path}: cannot tell which files hold the text encoder (found {found}); pass the "
                            f"weight file itself, or the first file of a split set")


def _split_set(member: Path) -> list[Path]:
    m = _SPLIT_RE.match(member.name)
    total, width = int(m["total"]), len(m["index"])
    files = [member.with_name(f"{m['stem']}-{k:0{width}d}-of-{m['total']}.safetensors") for k in range(1, total + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{member.name} is part of a {total}-file split set, but {len(missing)} part(s) are "
                                f"missing from {member.parent}: {', '.join(missing)}")
    return files


def find_tokenizer_dir(weight_dir: Path, tokenizer: str | Path | None = None) -> Path:
    """`tokenizer` if given, else the weights' folder, else a sibling `tokenizer/` folder (the HF layout)."""
    candidates = [Path(tokenizer)] if tokenizer is not None else [weight_dir, weight_dir.parent / "tokenizer"]
    for folder in candidates:
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    looked = ", ".join(str(c) for c in candidates)
    if tokenizer is not None:
        raise FileNotFoundError(f"--tokenizer {tokenizer}: no {' or '.join(TOKENIZER_FILES)} there")
    raise FileNotFoundError(f"no tokenizer found for the text encoder in {weight_dir} (looked for "
                            f"{' or '.join(TOKENIZER_FILES)} in {looked}); pass --tokenizer DIR with the "
                            f"tokenizer folder of the model (e.g. the `tokenizer/` folder of the HF repo)")


def load_tokenizer(folder: Path):
    """The tokenizer in `folder`, with its chat template (also read from a processor's chat_template.json)."""
    from transformers import AutoTokenizer

    check_tokenizer_files(folder)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # tokenizers / transformers raise plain Exceptions and OSErrors naming no file
        raise ValueError(f"{folder}: the tokenizer cannot be loaded ({one_line(e)}); copy the "
                         "tokenizer files of the model again") from None
    legacy = folder / "chat_template.json"
    if getattr(tok, "chat_template", None) is None and legacy.is_file():
        template = read_json(legacy, MAX_JSON_BYTES, "a chat template").get("chat_template")
        if not isinstance(template, str):
            raise ValueError(f"{legacy}: no chat_template text in it; copy it again")
        tok.chat_template = template
    if getattr(tok, "chat_template", None) is None:
        raise ValueError(f"the tokenizer in {folder} has no chat template (no chat_template.jinja, "
                         f"chat_template.json or chat_template in tokenizer_config.json); FLUX.2 needs it")
    return tok


def check_tokenizer_files(folder: Path) -> None:
    """Every JSON file of a tokenizer folder parses (a truncated tokenizer.json otherwise fails inside the
    tokenizers library with a message that names no file)."""
    for name in TOKENIZER_JSON_FILES:
        if (folder / name).is_file():
            read_json(folder / name, MAX_JSON_BYTES, f"the tokenizer's {name}")


# ----------------------------------------------------------------------------------------------------------
# Reading the weights


@dataclass
class _Tensors:
    """Where each decoder tensor lies: name without prefix -> (file, full key, shape)."""

    entries: dict[str, tuple[Path, str, tuple[int, ...]]]
    prefix: str
    kind: str
    hidden: int
    vocab: int
    num_layers: int


def _read_decoder_tensors(files: list[Path], source: str) -> _Tensors:
    """Find the language model's tensors in any of the common key layouts by locating `embed_tokens.weight`:
    HF Qwen3ForCausalLM / ComfyUI (`model.`), bare Qwen3Model (``), Mistral3ForConditionalGeneration
    (`language_model.model.` old, `model.language_model.` new). lm_head and the vision tower are ignored."""
    keys: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in keys:
                    raise ValueError(f"tensor {key} is in both {keys[key][0]} and {file}; a split set must not overlap")
                sl = f.get_slice(key)
                keys[key] = (file, tuple(sl.get_shape()), sl.get_dtype())
    quantized = [k for k, (_, _, dt) in keys.items() if dt.startswith("F8")]
    if quantized or any(k.endswith(("scale_weight", "weight_scale", "comfy_quant")) for k in keys):
        raise ValueError(f"{source} holds pre-quantised (fp8) weights, e.g. {(quantized or list(keys))[0]}; load "
                         f"a bf16/fp16/fp32 text encoder and pass --fp8_text_encoder to quantise it on load")
    embeds = [k for k in keys if k.endswith("embed_tokens.weight") and "vision" not in k]
    prefixes = {k[: -len("embed_tokens.weight")] for k in embeds}
    prefixes = {p for p in prefixes if f"{p}layers.0.input_layernorm.weight" in keys}
    if len(prefixes) != 1:
        raise ValueError(f"{source}: cannot find one language model in {len(keys)} tensors (expected "
                         f"[prefix]embed_tokens.weight, [prefix]layers.N.*, [prefix]norm.weight; found "
                         f"{sorted(prefixes) or 'no embed_tokens'}; first keys: {sorted(keys)[:5]})")
    prefix = prefixes.pop()
    entries = {}
    for key, (file, shape, _) in keys.items():
        if key.startswith(prefix):
            name = key[len(prefix):]
            if name.startswith(("layers.", "embed_tokens.", "norm.")):
                entries[name] = (file, key, shape)
    indices = {int(m[1]) for name in entries if (m := _LAYER_RE.match(name))}
    num_layers = max(indices) + 1
    if indices != set(range(num_layers)):
        raise ValueError(f"{source}: decoder layers {sorted(set(range(num_layers)) - indices)} are missing")
    kind = "qwen3" if "layers.0.self_attn.q_norm.weight" in entries else "mistral3"
    vocab, hidden = entries["embed_tokens.weight"][2]
    return _Tensors(entries, prefix, kind, hidden, vocab, num_layers)


def _config_from_dict(kind: str, values: dict):
    from transformers import MistralConfig, Qwen3Config

    return (Qwen3Config if kind == "qwen3" else MistralConfig)(**values)


def builtin_config(variant: Variant):
    """The transformers config of the official text encoder of `variant` (or of its tiny `variant.text`)."""
    t = variant.text
    if (t.kind, t.hidden_size) == ("qwen3", 2560):
        return _config_from_dict("qwen3", QWEN3_4B)
    if (t.kind, t.hidden_size) == ("qwen3", 4096):
        return _config_from_dict("qwen3", QWEN3_8B)
    if (t.kind, t.hidden_size) == ("mistral3", 5120):
        return _config_from_dict("mistral3", MISTRAL_SMALL_3)
    if t.num_heads:
        return _config_from_dict(t.kind, _small_config_values(t))
    raise ValueError(f"no built-in text encoder config for --model_version {variant.name}; put the model's "
                     f"config.json beside the weights")


def _small_config_values(t: TextEncoderConfig) -> dict:
    """Config values of a small model shaped by `t` (the `tiny` variant's text encoder)."""
    return dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                head_dim=t.hidden_size // t.num_heads, max_position_embeddings=2048, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=True)


def _read_config(weight_dir: Path, variant: Variant):
    """config.json beside the weights (its text part for Mistral3), else the built-in config for the variant."""
    if not (weight_dir / "config.json").is_file():
        return builtin_config(variant)
    from transformers import AutoConfig

    if "model_type" not in read_json(weight_dir / "config.json", MAX_JSON_BYTES, "the text encoder's config"):
        raise ValueError(f"{weight_dir / 'config.json'}: no model_type (qwen3 or mistral3); copy the config.json of "
                         "the model again")
    try:
        text_config = AutoConfig.from_pretrained(str(weight_dir)).get_text_config()
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{weight_dir / 'config.json'}: not a usable text encoder config "
                         f"({one_line(e)})") from None
    if _kind_of_config(text_config) != variant.text_encoder:
        raise ValueError(f"{weight_dir / 'config.json'} describes a {text_config.model_type!r} model, but "
                         f"--model_version {variant.name} needs {KIND_NAMES[variant.text_encoder]}")
    return text_config


def _check_config_against_tensors(config, tensors: _Tensors, source: str) -> None:
    c = config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    expected = {
        "embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "layers.0.self_attn.q_proj.weight": (c.num_attention_heads * head_dim, c.hidden_size),
        "layers.0.self_attn.k_proj.weight": (c.num_key_value_heads * head_dim, c.hidden_size),
        "layers.0.mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
    }
    problems = [f"{name} is {tensors.entries[name][2]}, config says {shape}"
                for name, shape in expected.items() if name in tensors.entries and tensors.entries[name][2] != shape]
    if tensors.num_layers != c.num_hidden_layers:
        problems.append(f"{tensors.num_layers} decoder layers, config says {c.num_hidden_layers}")
    if problems:
        raise ValueError(f"{source}: the weights do not match the text encoder config: {'; '.join(problems)}")


def _truncated_config(config, keep: int):
    values = config.to_dict()
    values["num_hidden_layers"] = keep
    if values.get("layer_types"):
        values["layer_types"] = values["layer_types"][:keep]
    return type(config).from_dict(values)


# ----------------------------------------------------------------------------------------------------------
# Fingerprints


def files_fingerprint(files: list[Path], extra: list[Path] = (), samples: int = 16, sample_bytes: int = 1 << 16) -> str:
    """sha256 (16 hex digits) over each safetensors file's header (names, dtypes, shapes, offsets), its size,
    and `samples` evenly spaced `sample_bytes` chunks of its data, then the full bytes of the `extra` small files.

    Reads about 1 MiB per file instead of hashing 16-48 GB: two fine-tunes of one architecture differ in the
    sampled bytes, while renaming or moving the files changes nothing.
    """
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            digest.update(f.read(header_len))
            digest.update(str(size).encode())
            data_start, data_len = 8 + header_len, size - 8 - header_len
            for i in range(samples):
                f.seek(data_start + (data_len - sample_bytes) * i // max(samples - 1, 1) if data_len > sample_bytes
                       else data_start)
                digest.update(f.read(sample_bytes))
    for file in extra:
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def _model_fingerprint(model: nn.Module) -> str:
    """For models built in memory: names, shapes, dtypes and the first 64 values of every tensor."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_text_encoder(path: str | Path, variant: Variant, tokenizer: str | Path | None = None,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                      fp8: bool = False, quantize: str = "none") -> TextEncoder:
    """Load the text encoder of `variant` from `path` (HF folder, first file of a split set, or one file).

    The config comes from config.json beside the weights, else from the built-in config of the official
    encoder; the tokenizer from `tokenizer`, else beside the weights, else a sibling `tokenizer/` folder.
    `quantize` (fp8 | nf4 | int8; `fp8=True` is quantize="fp8") stores the decoder layers' Linear weights
    quantised, each as it is read (embeddings and norms stay in `dtype`; compute in `dtype`). The fingerprint covers the weight files (see files_fingerprint) and the
    tokenizer files, so it changes when either does.
    """
    files = resolve_weight_files(path)
    weight_dir = files[0].parent
    source = str(files[0]) if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more files)"
    tensors = _read_decoder_tensors(files, source)
    _check_variant_fit(variant, tensors.kind, tensors.hidden, tensors.num_layers, source)
    config = _read_config(weight_dir, variant)
    _check_config_against_tensors(config, tensors, source)

    tokenizer_dir = find_tokenizer_dir(weight_dir, tokenizer)
    tok = load_tokenizer(tokenizer_dir)
    if len(tok) > config.vocab_size:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has {len(tok)} tokens but the text encoder {source} "
                         f"only embeds {config.vocab_size}; they belong to different models")

    mode = text_encoder_quantize_mode(fp8, quantize)
    model = _build_decoder(config, tensors, variant, device, dtype, mode, source)
    return TextEncoder(tok, model, variant, fingerprint=files_fingerprint(files, tokenizer_files(tokenizer_dir)),
                       quantize=mode)


def tokenizer_files(folder: Path) -> list[Path]:
    """The small files that define a tokenizer (vocab, merges, configs, chat template), not weights or indexes."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".jinja", ".txt", ".model")
                  and not p.name.endswith(".index.json"))


def _build_decoder(config, tensors: _Tensors, variant: Variant, device, dtype: torch.dtype, mode: str,
                   source: str) -> nn.Module:
    """The bare decoder (Qwen3Model / MistralModel) with the layers up to the deepest one read; its layers'
    Linears quantised in `mode` unless it is "none"."""
    from transformers import MistralModel, Qwen3Model

    deepest = max(variant.text_layers)
    # hidden_states[k] is the raw output of layer k for k < num_layers, but the normed output for k = num_layers,
    # so keep one layer past the deepest unless the final (normed) output is itself read.
    keep = config.num_hidden_layers if deepest >= config.num_hidden_layers else deepest + 1
    config = _truncated_config(config, keep)
    with torch.device("meta"):
        model = (Qwen3Model if tensors.kind == "qwen3" else MistralModel)(config)

    used: set[str] = set()

    def missing(full: str) -> ValueError:
        return ValueError(f"{source}: tensor {tensors.prefix}{full} is missing")

    with ExitStack() as stack:
        shard_files = {file for file, _, _ in tensors.entries.values()}
        if mode == "none":
            handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in shard_files}
        else:
            readers = {f: stack.enter_context(TensorFile(f)) for f in shard_files}

        def load(module: nn.Module, prefix: str, quantize: bool = False) -> None:
            names = list(module.state_dict())
            for name in names:
                if prefix + name not in tensors.entries:
                    raise missing(prefix + name)
                used.add(prefix + name)
            if mode != "none":
                linears = {path for path, m in module.named_modules() if isinstance(m, nn.Linear)} if quantize else set()

                def locate(name: str):
                    file, key, _ = tensors.entries[prefix + name]
                    return readers[file], key

                load_streaming(module, locate, linears, mode, dtype, device)
                return
            state = {}
            for name in names:
                file, key, _ = tensors.entries[prefix + name]
                state[name] = handles[file].get_tensor(key).to(device=device, dtype=dtype)
            try:
                module.load_state_dict(state, strict=True, assign=True)
            except RuntimeError as e:
                raise ValueError(f"{source}: cannot load {tensors.prefix}{prefix}*: {e}") from None

        load(model.embed_tokens, "embed_tokens.")
        for i, layer in enumerate(tqdm(model.layers, desc=f"loading the text encoder ({mode})", unit="layer",
                                       leave=False, disable=None if mode != "none" else True)):
            load(layer, f"layers.{i}.", quantize=True)
        load(model.norm, "norm.")

    skipped = {n for n in tensors.entries if (m := _LAYER_RE.match(n)) and int(m[1]) >= keep}
    unused = sorted(set(tensors.entries) - used - skipped)
    if unused:
        raise ValueError(f"{source}: unexpected tensors for a {KIND_NAMES[tensors.kind]} decoder: "
                         f"{', '.join(tensors.prefix + n for n in unused[:8])}")
    # Non-persistent buffers (rotary inv_freq) were created on the meta device: compute them for real.
    model.rotary_emb = type(model.rotary_emb)(config=config).to(device)
    on_meta = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if on_meta:
        raise RuntimeError(f"{source}: tensors left unloaded: {on_meta[:8]}")
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------
# The tiny text encoder (the `tiny` variant's default; written by `flux2 make-tiny-model`)

_SIZES = ["tiny", "small", "medium", "large", "big", "huge"]
_COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "grey", "brown",
            "cyan", "magenta", "gold", "silver", "dark blue", "light green"]
_SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond", "ring", "cross", "rectangle", "heart",
           "oval", "pentagon", "arrow", "line", "dot"]
_TEXTURES = ["plain", "striped", "dotted", "checkered", "shiny", "matte", "glowing", "outlined", "solid",
             "smooth", "rough", "wooden", "metal"]
_POSITIONS = ["in the center", "on the left", "on the right", "at the top", "at the bottom", "in the top left corner",
              "in the top right corner", "in the bottom left corner", "in the bottom right corner", "near the edge"]
_BACKGROUNDS = ["white", "black", "grey", "blue", "green", "beige", "dark", "light", "gradient", "noisy", "plain"]


def tiny_corpus() -> list[str]:
    """A fixed English corpus about simple coloured shapes (the demo dataset's captions), no randomness."""
    lines = []
    for i in range(1500):
        size, colour = _SIZES[i % len(_SIZES)], _COLOURS[(i * 7) % len(_COLOURS)]
        shape, texture = _SHAPES[(i * 11) % len(_SHAPES)], _TEXTURES[(i * 5) % len(_TEXTURES)]
        position, background = _POSITIONS[(i * 3) % len(_POSITIONS)], _BACKGROUNDS[(i * 13) % len(_BACKGROUNDS)]
        other = f"{_COLOURS[(i * 2 + 1) % len(_COLOURS)]} {_SHAPES[(i * 4 + 3) % len(_SHAPES)]}"
        lines.append(f"a {size} {texture} {colour} {shape} {position} on a {background} background")
        lines.append(f"A {colour} {shape} and a {other}, {position}. The background is {background}.")
        if i % 10 == 0:  # the chat scaffolding around every prompt
            lines.append(f"user\n{lines[-1]}\nassistant\n")
    lines += ["one, two, three, four, five shapes", "there are 2 circles and 3 squares", "an image of a shape",
              "a photo with a single object", "two objects next to each other", "a pattern of small dots"]
    return lines


def _qwen3_style_template() -> str:
    # Qwen3's own template, reduced to plain messages: with add_generation_prompt and enable_thinking=False it
    # opens the assistant turn with an empty think block, exactly as Qwen3's template does.
    return (
        "{%- for message in messages %}"
        "{%- if message['content'] is string %}{%- set content = message['content'] %}"
        "{%- else %}{%- set content = message['content'] | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join('') %}{%- endif %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
        "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
        "{%- endif %}{%- endif %}"
    )


def train_tiny_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on tiny_corpus() with Qwen3's special tokens and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    think = ["<think>", "</think>"]  # single (non-special) tokens in Qwen3 too
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(think), show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tiny_corpus(), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in think])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=_qwen3_style_template(), padding_side="right",
                                   model_max_length=131072)


def write_tiny_text_encoder(out_dir: str | Path, variant: Variant, seed: int = 0) -> Path:
    """Write a random Qwen3ForCausalLM shaped by `variant.text` and a trained tokenizer to `out_dir` in Hugging
    Face layout (config.json, model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja).
    Same seed -> byte-identical files. Returns `out_dir`."""
    from transformers import Qwen3ForCausalLM
    from transformers.utils import logging as hf_logging

    t = variant.text
    if t.kind != "qwen3" or not t.num_heads:
        raise ValueError(f"--model_version {variant.name} has no small Qwen3 text encoder shape; only variants "
                         f"like 'tiny' (text.num_heads set) get a random text encoder")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer(t.vocab_size)
    config = _config_from_dict("qwen3", {**_small_config_values(t), "eos_token_id": tokenizer.eos_token_id,
                                         "pad_token_id": tokenizer.pad_token_id})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar, for a 1 MB file
    try:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return out_dir
