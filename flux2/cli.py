"""`flux2` command line: one subcommand per job, options named as in the seed's scripts."""
from __future__ import annotations

import argparse
import json
import os
import sys

from flux2.variants import VARIANTS

QUANT_CHOICES = ["none", "fp8", "nf4", "int8"]  # flux2.quantize.MODES (not imported here: the CLI starts fast)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show every option's default in --help."""


# musubi-tuner options that mean nothing here, accepted so that its commands run as written: name -> (takes a
# value, why it means nothing). A run that gets any says so once.
ATTENTION = "attention is always PyTorch's scaled_dot_product_attention, which picks flash / memory-efficient " \
            "kernels itself"
LOADER = "batches are read from the caches, with no data-loader workers"
IGNORED_TRAIN_OPTIONS = {
    "sdpa": (False, ATTENTION), "flash_attn": (False, ATTENTION), "flash3": (False, ATTENTION),
    "sage_attn": (False, ATTENTION), "xformers": (False, ATTENTION),
    "max_data_loader_n_workers": (True, LOADER), "persistent_data_loader_workers": (False, LOADER),
}
IGNORED_CACHE_OPTIONS = {
    "skip_existing": (False, "the cache is content-addressed: entries already in it are always reused"),
    "keep_cache": (False, "the cache holds what the manifest needs: entries no item uses are always dropped"),
}
IGNORED_TEXT_OPTIONS = {**IGNORED_CACHE_OPTIONS, "num_workers": (True, "prompts need no decoding threads")}


def add_ignored_options(p: argparse.ArgumentParser, options: dict[str, tuple[bool, str]]) -> None:
    """The musubi-tuner options of `options`, accepted and ignored (see note_ignored_options)."""
    g = p.add_argument_group("musubi-tuner options that mean nothing here (accepted, ignored, and said so)")
    for name, (takes_value, why) in options.items():
        kw = {"metavar": "N"} if takes_value else {"action": "store_true"}
        g.add_argument(f"--{name}", dest=f"ignored_{name}", default=None, help=f"ignored: {why}", **kw)


def note_ignored_options(args: argparse.Namespace, options: dict[str, tuple[bool, str]]) -> None:
    """One line naming the ignored options that were given (on the main process only)."""
    given = [name for name in options if getattr(args, f"ignored_{name}", None) not in (None, False)]
    if given and os.environ.get("RANK", "0") == "0":
        reasons = list(dict.fromkeys(options[name][1] for name in given))
        print(f"note: ignoring {', '.join('--' + n for n in given)}: they mean nothing here ({'; '.join(reasons)})")


def add_model_args(p: argparse.ArgumentParser, need_dit: bool = True, need_codecs: bool = True) -> None:
    """The model files. need_codecs=False: --vae and --text_encoder may be left out (generate's
    --save_merged_model only needs the DiT; generate itself says when they are missing)."""
    p.add_argument("--model_version", required=True, choices=list(VARIANTS), help="FLUX.2 variant")
    if need_dit:
        p.add_argument("--dit", required=True, help="DiT weights: BFL single file (flux2-*.safetensors)")
    unless = "" if need_codecs else " (not needed with --save_merged_model)"
    p.add_argument("--vae", required=need_codecs, help="autoencoder weights (ae.safetensors)" + unless)
    p.add_argument("--text_encoder", required=need_codecs,
                   help="text encoder: a Hugging Face folder or the first file of a split set (...-00001-of-0000N)"
                   + unless)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: beside the text encoder)")
    p.add_argument("--fp8_text_encoder", action="store_true", help="text encoder Linear weights in fp8")
    p.add_argument("--text_encoder_quantize", choices=QUANT_CHOICES, default="none",
                   help="text encoder Linear weights: fp8 (= --fp8_text_encoder), nf4 or int8 (bitsandbytes), "
                        "quantised as they load")


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images (text-to-image or editing with reference images)",
                       formatter_class=HelpFormatter)
    add_model_args(p, need_codecs=False)
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="the prompt (or --from_file)")
    prompt.add_argument("--from_file", default=None,
                        help="prompt file: one prompt per line, each with optional --w --h --d --s --g --n --ci --fs "
                             "(width, height, seed, steps, guidance, negative prompt, control image, flow shift)")
    p.add_argument("--negative_prompt", default="", help="negative prompt for true CFG (base variants)")
    sizes = sorted({f"{v.sample_size[0]} {v.sample_size[1]}" for v in VARIANTS.values()}, reverse=True)
    p.add_argument("--image_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help=f"height and width, multiples of 16 (default: the variant's, {' or '.join(sizes)})")
    p.add_argument("--infer_steps", type=int, default=None, help="steps (default: 4 distilled klein, else 50)")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="true CFG scale for base variants (default 4.0; ignored by distilled variants)")
    p.add_argument("--embedded_cfg_scale", type=float, default=4.0, help="dev's embedded (distilled) guidance")
    p.add_argument("--flow_shift", type=float, default=None, help="constant schedule shift instead of empirical mu")
    p.add_argument("--seed", type=int, default=None, help="noise seed (random when unset)")
    p.add_argument("--control_image_path", nargs="*", default=[], help="reference image(s) for editing")
    p.add_argument("--no_resize_control", action="store_true", help="keep reference images at their size")
    p.add_argument("--fp8_scaled", action="store_true", help="DiT block weights in block-wise scaled fp8")
    p.add_argument("--fp8_matmul", action="store_true",
                   help="DiT block weights in row-wise fp8, multiplied in fp8 (GPUs with fp8 tensor cores: L4, L40S, "
                        "H100, H200, B200)")
    p.add_argument("--compile", choices=["auto", "true", "false"], default="auto",
                   help="compile the DiT blocks with torch.compile (auto: on CUDA); the first image pays the compile")
    p.add_argument("--quantize", choices=QUANT_CHOICES, default="none",
                   help="DiT block Linear weights: fp8 (= --fp8_scaled), nf4 or int8 (bitsandbytes), quantised as "
                        "they load; LoRAs are then applied as a side path, not merged")
    p.add_argument("--blocks_to_swap", type=int, default=0, help="DiT blocks kept in CPU memory (CUDA only)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="DiT compute dtype (default: bfloat16; float32 for the tiny variant on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--save_path", default="outputs", help="output folder")
    p.add_argument("--output_type", choices=["images", "latent", "latent_images"], default="images")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_weight", nargs="*", default=[],
                   help="LoRA file(s): kohya (musubi-tuner), ComfyUI/BFL or diffusers/PEFT layout, detected per file; "
                        "LyCORIS LoKr / LoHa files too, mixed with LoRAs as you like")
    g.add_argument("--lora_multiplier", type=float, nargs="*", default=[1.0],
                   help="strength per LoRA file (one value for all)")
    g.add_argument("--include_patterns", nargs="*", default=None,
                   help="per LoRA file: a regex; only its modules whose path or name in the file matches are applied")
    g.add_argument("--exclude_patterns", nargs="*", default=None,
                   help="per LoRA file: a regex; its modules whose path or name in the file matches are left out")
    g.add_argument("--lora_merge", action=argparse.BooleanOptionalAction, default=True,
                   help="merge the LoRAs into the DiT weights (--no-lora_merge: apply them as a side path; same "
                        "images)")
    g.add_argument("--save_merged_model", default=None,
                   help="write the DiT with the LoRAs merged (BFL layout) to this path and generate nothing")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> None:
    from flux2.generate import GenerateOptions, generate

    opts = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    opts["image_size"] = tuple(opts["image_size"]) if opts["image_size"] else None
    generate(GenerateOptions(**opts))


def add_make_tiny_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny-model", help="write the tiny FLUX.2-shaped model files (random weights)",
                       formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_make_tiny_model)


def run_make_tiny_model(args: argparse.Namespace) -> None:
    from flux2.tiny import make_tiny_model

    paths = make_tiny_model(args.out, seed=args.seed)
    print("wrote " + ", ".join(f"{k}: {v}" for k, v in paths.items()))


def add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="check and decode every dataset item once; write the manifest and a report",
                       formatter_class=HelpFormatter, argument_default=argparse.SUPPRESS)  # unset: from params
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--params", help="params.yaml: its dataset group, eval.holdout_fraction and "
                                         "eval.holdout_min_items")
    source.add_argument("--dataset_config", help="a musubi-tuner dataset TOML alone (defaults for the rest)")
    p.add_argument("--out", help="manifest path (default: dataset.manifest, data/manifest.parquet)")
    p.add_argument("--report", help="report path (default: dataset.report, reports/ingest.json)")
    p.add_argument("--holdout_fraction", type=float,
                   help="fraction held out for evaluation (default: eval.holdout_fraction, 0.1)")
    p.add_argument("--holdout_min_items", type=int,
                   help="a dataset of fewer distinct images holds none out (default: eval.holdout_min_items, 20)")
    p.add_argument("--on_error", choices=["skip", "fail"],
                   help="skip bad items and report them, or stop at the first (default: dataset.on_error, skip)")
    p.set_defaults(func=run_ingest)


def run_ingest(args: argparse.Namespace) -> None:
    import dataclasses
    from pathlib import Path

    from flux2.ingest import ingest
    from flux2.params import DatasetParams, EvalParams, load_params

    opts = vars(args)
    if "params" in opts:
        params = load_params(opts["params"], check_paths=False)
        dataset, evals, base = params.dataset, params.eval, Path(opts["params"]).parent
    else:
        dataset = DatasetParams(toml=str(Path(opts["dataset_config"]).absolute()))
        evals, base = EvalParams(), Path.cwd()
    changes = {key: str(Path(opts[arg]).absolute()) for key, arg in (("manifest", "out"), ("report", "report"))
               if arg in opts}
    if "on_error" in opts:
        changes["on_error"] = opts["on_error"]
    ingest(dataclasses.replace(dataset, **changes), opts.get("holdout_fraction", evals.holdout_fraction), base,
           holdout_min_items=opts.get("holdout_min_items", evals.holdout_min_items))


def add_convert_lora(sub: argparse._SubParsersAction) -> None:
    from flux2.lora_formats import FORMATS

    p = sub.add_parser("convert-lora", help="convert a FLUX.2 LoRA between the kohya, comfy and diffusers layouts "
                       "(LoKr / LoHa: kohya and comfy)", formatter_class=HelpFormatter)
    p.add_argument("--input", required=True, help="LoRA file in any supported layout (detected from its keys)")
    p.add_argument("--output", required=True, help="output .safetensors")
    p.add_argument("--target", required=True, choices=list(FORMATS),
                   help="kohya: lora_unet_* with alpha (musubi-tuner, ComfyUI, diffusers; LyCORIS' lokr_* / hada_* "
                        "names); comfy: diffusion_model.*.lora_A/B (LoKr: the layout diffusers reads); diffusers: "
                        "transformer.*.lora_A/B (PEFT, LoRA only)")
    p.set_defaults(func=run_convert_lora)


def run_convert_lora(args: argparse.Namespace) -> None:
    from flux2.lora_formats import convert_lora

    lora = convert_lora(args.input, args.output, args.target)
    print(f"wrote {args.output}: {len(lora.modules)} modules, {lora.format} layout -> {args.target}")


def add_cache_latents(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache-latents", help="encode every dataset image (and control) with the autoencoder once; "
                       "incremental, content-addressed", formatter_class=HelpFormatter)
    p.add_argument("--params", default=None, help="params.yaml (model, dataset.manifest, cache groups); options "
                                                  "given here override it")
    p.add_argument("--dataset_config", default=None,
                   help="a musubi-tuner dataset TOML as the dataset: ingested first into --manifest (with --params: "
                        "in place of its dataset.sources)")
    p.add_argument("--manifest", default=None, help="manifest from ingest (default: dataset.manifest, "
                                                    "data/manifest.parquet)")
    p.add_argument("--vae", default=None, help="autoencoder weights (ae.safetensors)")
    p.add_argument("--model_version", default=None, help="FLUX.2 variant (default: model.model_version)")
    p.add_argument("--vae_dtype", choices=["float32", "bfloat16"], default=None,
                   help="AE compute and storage dtype (default: model.vae_dtype, float32)")
    p.add_argument("--batch_size", type=int, default=None, help="images per AE batch (default: cache.batch_size)")
    p.add_argument("--cache_dir", default=None, help="output folder (default: cache.latents_dir)")
    p.add_argument("--shard_mb", type=int, default=None, help="shard size limit in MB (default: cache.shard_mb)")
    p.add_argument("--num_workers", type=int, default=2, help="image decoding threads")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: model.device, auto)")
    p.add_argument("--report", default=None, help="JSON report (default: reports/cache_latents.json)")
    add_ignored_options(p, IGNORED_CACHE_OPTIONS)
    p.add_argument("--store", default=None, help="shared cache store folder, or off (default: cache.store, else "
                   "$FLUX2_CACHE_STORE, else ~/.cache/flux2/store; docs/caching.md)")
    p.set_defaults(func=run_cache_latents)


def run_cache_latents(args: argparse.Namespace) -> None:
    from flux2.cache_latents import cache_latents, config_from_args

    note_ignored_options(args, IGNORED_CACHE_OPTIONS)
    cache_latents(config_from_args(args))


def add_cache_text(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache-text", help="encode every caption, the empty prompt and the evaluation / sample "
                       "prompts with the text encoder once; incremental", formatter_class=HelpFormatter)
    p.add_argument("--params", default=None, help="params.yaml (model, dataset.manifest, cache, eval.prompts, "
                                                  "train.sample_prompts); options given here override it")
    p.add_argument("--dataset_config", default=None,
                   help="a musubi-tuner dataset TOML as the dataset: ingested first into --manifest (with --params: "
                        "in place of its dataset.sources)")
    p.add_argument("--manifest", default=None, help="manifest from ingest (default: dataset.manifest)")
    p.add_argument("--text_encoder", default=None, help="text encoder: a Hugging Face folder or the first file of "
                                                        "a split set")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: beside the text encoder)")
    p.add_argument("--model_version", default=None, help="FLUX.2 variant (default: model.model_version)")
    p.add_argument("--fp8_text_encoder", action="store_true", default=None, help="text encoder Linear weights in fp8")
    p.add_argument("--text_encoder_quantize", choices=QUANT_CHOICES, default=None,
                   help="text encoder Linear weights: none, fp8, nf4 or int8 (default: model.text_encoder_quantize, "
                        "none)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
                   help="text encoder compute dtype (default: model.dtype; auto = bfloat16, float32 for the tiny "
                        "variant on CPU)")
    p.add_argument("--text_dtype", choices=["float32", "bfloat16"], default=None,
                   help="stored dtype (default: cache.text_dtype)")
    p.add_argument("--batch_size", type=int, default=None, help="prompts per batch (default: cache.batch_size)")
    p.add_argument("--prompt", action="append", default=None, help="an evaluation prompt to cache (repeatable; "
                                                                   "default: eval.prompts)")
    p.add_argument("--sample_prompts", default=None, help="prompt file whose prompts and negatives to cache "
                                                          "(default: train.sample_prompts)")
    p.add_argument("--cache_dir", default=None, help="output folder (default: cache.text_dir)")
    p.add_argument("--shard_mb", type=int, default=None, help="shard size limit in MB (default: cache.shard_mb)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: model.device, auto)")
    p.add_argument("--report", default=None, help="JSON report (default: reports/cache_text.json)")
    add_ignored_options(p, IGNORED_TEXT_OPTIONS)
    p.add_argument("--store", default=None, help="shared cache store folder, or off (default: cache.store, else "
                   "$FLUX2_CACHE_STORE, else ~/.cache/flux2/store; docs/caching.md)")
    p.set_defaults(func=run_cache_text)


def run_cache_text(args: argparse.Namespace) -> None:
    from flux2.cache_text import cache_text, config_from_args

    note_ignored_options(args, IGNORED_TEXT_OPTIONS)
    cache_text(config_from_args(args))


def optional(kind: type):
    """An argparse type for an `X | None` option: `null` or `none` give None."""
    def convert(value: str):
        return None if value.lower() in ("null", "none") else kind(value)
    convert.__name__ = kind.__name__  # argparse names the type in its error messages
    return convert


def json_or_word(value: str):
    """An option value for a union-typed field: JSON (`true`, `[512, 768]`, `{"a": 1}`) or else the plain word."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


json_or_word.__name__ = "JSON"


class KeyValues(argparse.Action):
    """`key=value ...` into a dict (musubi-tuner's --network_args / --optimizer_args); each value is read as JSON
    (8, 5e-5, true, [4, 0]) or a Python literal (True), else kept as text. One JSON object also works."""

    def __call__(self, parser, namespace, values, option_string=None):
        import ast

        out = {}
        for item in values:
            if item.lstrip().startswith("{"):
                try:
                    value = json.loads(item)
                except json.JSONDecodeError as e:
                    parser.error(f"{option_string}: {item!r} is not a JSON object ({e})")
                if not isinstance(value, dict):
                    parser.error(f"{option_string}: {item!r} is not a JSON object")
                out.update(value)
                continue
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                parser.error(f"{option_string}: {item!r} is not key=value (e.g. factor=8)")
            for read in (json.loads, ast.literal_eval):
                try:
                    out[key.strip()] = read(raw)
                    break
                except (ValueError, SyntaxError):
                    continue
            else:
                out[key.strip()] = raw
        setattr(namespace, self.dest, out)


def add_group_options(p: argparse.ArgumentParser, cls: type, group: str) -> None:
    """One `--field` option per field of a params dataclass (seed names), default: the params.yaml value."""
    import dataclasses
    import types
    import typing

    from flux2.params import CHOICES, field_notes

    g = p.add_argument_group(f"{group} (override params.yaml's `{group}:` group)")
    hints, notes = typing.get_type_hints(cls), field_notes(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        # `X | None` -> X; a true union (int | list[int]) is read as JSON below.
        base = options[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(options) == 1 \
            else tp
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # SUPPRESS: an option not given leaves no attribute, so `--max_train_steps null` can set None.
        kw: dict = {"default": argparse.SUPPRESS, "dest": f"{group}.{f.name}", "help": (f"{notes[f.name]}; " if f.name in notes else "") + f"default: {default!r}"}
        if f"{group}.{f.name}" in CHOICES:
            kw["help"] += f" (one of: {', '.join(map(str, CHOICES[f'{group}.{f.name}']))})"
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list:
            kw["nargs"] = "*"
            item = typing.get_args(base)[0]
            kw["type"] = item if item in (int, float, str) else str
        elif base in (int, float, str):
            kw["type"] = base if base is tp else optional(base)
        elif typing.get_origin(base) is dict:  # musubi-tuner's `--network_args factor=8 decompose_both=true`
            kw.update(nargs="*", action=KeyValues)
            kw["help"] += " (key=value ... or one JSON object)"
        else:  # unions such as int | list[int] or bool | str
            kw["type"] = json_or_word
            kw["help"] += " (JSON or a word)"
        if base is not bool:
            kw["metavar"] = f.name.upper()
        g.add_argument(f"--{f.name}", **kw)


def params_with_overrides(args: argparse.Namespace):
    """params.yaml with the command line's `group.field` options applied, validated as a whole.

    With `--dataset_config TOML` (train), the TOML is the dataset (dataset.toml, no dataset.sources), and without
    a params.yaml (`--params` not given and none in the current folder) the defaults stand in for it."""
    from pathlib import Path

    from flux2.params import ParamsError, check_model_paths, parse_params, read_params_file

    dataset_config = getattr(args, "dataset_config", None)
    path = Path(args.params or "params.yaml")
    if path.is_file():
        data = read_params_file(path)
    elif args.params is None and dataset_config:
        data = {}  # musubi-tuner style: the command line is the whole configuration
    else:
        raise ParamsError(f"{path}: not found; pass --params PATH" + (
            "" if dataset_config or getattr(args, "command", "") != "train" else
            ", or --dataset_config TOML with the model options (--model_version --dit --vae --text_encoder)"))

    def settings(group: str) -> dict:
        if not isinstance(data.setdefault(group, {}), dict):
            raise ParamsError(f"{path}: {group}: expected a mapping of settings, got {data[group]!r}")
        return data[group]

    if dataset_config:
        settings("dataset").update(toml=str(Path(dataset_config).absolute()), sources=[])
    for dest, value in vars(args).items():
        if "." in dest:
            group, key = dest.split(".", 1)
            settings(group)[key] = value
    params = parse_params(data, str(path))
    check_model_paths(params, path.parent, str(path))
    return params, path.parent


def add_train(sub: argparse._SubParsersAction) -> None:
    from flux2.params import ModelParams, TrainParams

    p = sub.add_parser("train", help="train a LoRA on the cached latents and text embeddings",
                       formatter_class=HelpFormatter,
                       description="musubi-tuner's `accelerate launch ... flux_2_train_network.py OPTIONS` is "
                                   "`accelerate launch ... -m flux2.cli train OPTIONS` (or `flux2 train OPTIONS`): "
                                   "its options are accepted as written.")
    p.add_argument("--params", default=None, help="params.yaml; the options below override it (default: "
                                                  "./params.yaml; with --dataset_config it may be absent)")
    p.add_argument("--dataset_config", default=None,
                   help="a musubi-tuner dataset TOML as the dataset (in place of dataset.sources): ingested into "
                        "dataset.manifest first; its latents and text must be cached (cache-latents / cache-text "
                        "with the same TOML)")
    add_group_options(p, ModelParams, "model")
    add_group_options(p, TrainParams, "train")
    add_ignored_options(p, IGNORED_TRAIN_OPTIONS)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> None:
    from flux2.cache_latents import run_ingest
    from flux2.train import train

    note_ignored_options(args, IGNORED_TRAIN_OPTIONS)
    params, base = params_with_overrides(args)
    if args.dataset_config:
        run_ingest(params.dataset, params.eval, base)
    train(params, base)


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    from flux2.params import EvalParams, ModelParams

    p = sub.add_parser("evaluate", help="validation loss, sample grids (base beside LoRA) and CLIP score of the "
                       "trained LoRA; metrics/eval.json, plots, MLflow", formatter_class=HelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params.yaml; the options below override it")
    add_group_options(p, ModelParams, "model")
    add_group_options(p, EvalParams, "eval")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> None:
    from flux2.evaluate import evaluate

    params, base = params_with_overrides(args)
    evaluate(params, base)


def add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="one picture (and an HTML page) of MLflow runs side by side: the parameters "
                       "that differ, their metrics and their sample grids", formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="MLflow run ids (or run names in --experiment)")
    p.add_argument("--tracking_uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite mlflow.db at the repository root)")
    p.add_argument("--experiment", default="flux2", help="experiment in which run names are looked up")
    p.add_argument("--out", default="reports/compare.png", help="output PNG; the HTML page is written beside it")
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> None:
    from flux2.compare import compare

    compare(args.runs, args.tracking_uri, args.experiment, args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux2", description="FLUX.2 LoRA training pipeline",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_generate, add_make_tiny_model, add_ingest, add_convert_lora, add_cache_latents,
                add_cache_text, add_train, add_evaluate, add_compare):
        add(sub)
    return parser


def close_process_group() -> None:
    """End the process group that `accelerate launch` / torchrun runs made (a no-op in a single process): a gloo
    group left for interpreter exit sometimes aborted a rank there ("terminate called without an active
    exception"), failing a run that had finished."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as e:
        from flux2.train import TrainingError

        # Our errors (ValueError subclasses, OSErrors naming the path, a stopped training) carry a message a user
        # can act on: show it without a traceback (FLUX2_DEBUG=1 for one). Anything else is a bug: raise it.
        if not isinstance(e, (ValueError, OSError, TrainingError)) or os.environ.get("FLUX2_DEBUG"):
            raise
        # An OSError that our code made to name its path (`OSError(errno, "could not write PATH: ...")`) reads
        # better without the "[Errno N]" prefix.
        named = isinstance(e, OSError) and e.errno is not None and e.filename is None and e.strerror
        print(f"error: {e.strerror if named else e}", file=sys.stderr)
        return 2
    finally:
        close_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
