"""Text-conditioning oracles: diffusers' own FLUX.2 prompt encoders run on tiny random models, and builders for
the files they read (a tiny Mistral3 with a Mistral-style tokenizer, hand-made shard sets).

diffusers is the reference here; flux2/ never imports it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MISTRAL_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]

# Mistral-Small-3.x's template reduced to text: bos, the system prompt, then [INST]...[/INST] per user turn; a
# list of content parts is joined from its text parts.
MISTRAL_TEMPLATE = (
    "{%- macro text(content) -%}{%- if content is string -%}{{ content }}{%- else -%}"
    "{{ content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') }}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set loop_messages = messages[1:] %}"
    "{{- '[SYSTEM_PROMPT]' + text(messages[0]['content']) + '[/SYSTEM_PROMPT]' }}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{{- '[INST]' + text(message['content']) + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- text(message['content']) + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def qwen3_reference_embeds(model_dir: Path, prompts: list[str], layers: tuple[int, ...], max_length: int,
                           tokenizer_dir: Path | None = None) -> torch.Tensor:
    """diffusers Flux2KleinPipeline._get_qwen3_prompt_embeds on the Qwen3ForCausalLM in `model_dir` (fp32)."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
    with torch.no_grad():
        return Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder=model, tokenizer=tokenizer, prompt=prompts, dtype=torch.float32, device=torch.device("cpu"),
            max_sequence_length=max_length, hidden_states_layers=list(layers))


def mistral3_reference_embeds(model_dir: Path, prompts: list[str], layers: tuple[int, ...],
                              max_length: int) -> torch.Tensor:
    """diffusers Flux2Pipeline._get_mistral_3_small_prompt_embeds on the Mistral3ForConditionalGeneration in
    `model_dir` (fp32). diffusers passes an AutoProcessor (Pixtral) but only calls its apply_chat_template; the
    Pixtral processor needs torchvision, which the test venv lacks, so the tokenizer itself stands in. Both render
    the same template and neither adds special tokens when the template starts with bos."""
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
    from transformers import AutoTokenizer, Mistral3ForConditionalGeneration

    model = Mistral3ForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    with torch.no_grad():
        return Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            text_encoder=model, tokenizer=tokenizer, prompt=prompts, dtype=torch.float32, device=torch.device("cpu"),
            max_sequence_length=max_length, hidden_states_layers=list(layers))


def _mistral_corpus() -> list[str]:
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    colours = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]
    shapes = ["circle", "square", "triangle", "star", "ring", "cross"]
    places = ["on the left", "on the right", "at the top", "at the bottom", "in the middle"]
    lines = [SYSTEM_MESSAGE] * 20
    for i in range(400):
        lines.append(f"a {colours[i % 8]} {shapes[(i * 5) % 6]} {places[(i * 3) % 5]} of a {colours[(i * 7 + 3) % 8]} "
                     f"{shapes[(i + 2) % 6]}, plain background")
    return lines


def write_tiny_mistral3(out_dir: Path, num_layers: int = 40, hidden: int = 64, vocab: int = 512, seed: int = 0,
                        padding_side: str = "left") -> Path:
    """A random Mistral3ForConditionalGeneration (tiny Pixtral tower) plus a trained byte-level BPE tokenizer with
    Mistral's control tokens and a Mistral-style chat template, saved in Hugging Face layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig,
                              PreTrainedTokenizerFast)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_mistral_corpus(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=MISTRAL_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", chat_template=MISTRAL_TEMPLATE, padding_side=padding_side,
                                        model_max_length=131072)
    text = MistralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         rope_theta=1e9, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=64, patch_size=16, head_dim=16)
    config = Mistral3Config(text_config=text, vision_config=vision, tie_word_embeddings=False,
                            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"))
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def write_shards(tensors: dict[str, torch.Tensor], out_dir: Path, stem: str, parts: int,
                 index_name: str | None = None) -> list[Path]:
    """Split `tensors` (in key order) over `parts` files `{stem}-0000k-of-0000N.safetensors`, plus an HF index
    `index_name` when given."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    files, weight_map = [], {}
    for k in range(parts):
        name = f"{stem}-{k + 1:05d}-of-{parts:05d}.safetensors"
        chunk = keys[k::parts]
        save_file({key: tensors[key].contiguous() for key in chunk}, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in chunk})
        files.append(out_dir / name)
    if index_name:
        (out_dir / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return files


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())
