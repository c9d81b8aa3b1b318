"""Prompt files for sampling during training and for generation, in the seed's format.

One prompt per line; blank lines and lines starting with `#` are skipped. Options follow the prompt, each as
` --flag value`:
    --w WIDTH  --h HEIGHT  (multiples of 16)   --s STEPS   --d SEED   --g GUIDANCE (--l is the same)
    --n NEGATIVE PROMPT   --ci CONTROL_IMAGE (repeatable)   --fs FLOW_SHIFT
e.g. `a red circle on a blue background --w 512 --h 256 --d 42 --n blurry, low quality`.
Options not given stay None: the caller applies its defaults (size, steps, guidance of the variant; negative "").
In a prompt file, `--ci` paths are relative to the file's folder and must stay inside it (`read_prompt_file` makes
them absolute), so a prompt file cannot make a run read images from anywhere else.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

# " --flag" where flag is a word followed by a space or the end: "well--known" or "--" inside a word stays text.
_FLAG_RE = re.compile(r"\s--([A-Za-z]+)(?=\s|$)")
FLAGS = {"w": "width", "h": "height", "s": "steps", "d": "seed", "g": "guidance", "l": "guidance",
         "n": "negative_prompt", "ci": "control_images", "fs": "flow_shift"}


class PromptFileError(ValueError):
    """A prompt line that cannot be parsed; the message names the file and line."""


@dataclass
class SamplePrompt:
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seed: int | None = None
    guidance: float | None = None
    flow_shift: float | None = None
    control_images: list[str] = field(default_factory=list)


def parse_prompt_line(line: str, where: str = "prompt") -> SamplePrompt | None:
    """One line of a prompt file -> SamplePrompt; None for a blank or `#` comment line."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    parts = _FLAG_RE.split(" " + text)  # [prompt, flag, value, flag, value, ...]
    prompt = SamplePrompt(parts[0].strip())
    if not prompt.prompt:
        raise PromptFileError(f"{where}: no prompt text before the options")
    for flag, value in zip(parts[1::2], parts[2::2]):
        value = value.strip()
        name = FLAGS.get(flag)
        if name is None:
            raise PromptFileError(f"{where}: unknown option --{flag}; known: "
                                  f"{', '.join('--' + f for f in FLAGS)}")
        if name == "negative_prompt":
            prompt.negative_prompt = value
        elif name == "control_images":
            if not value:
                raise PromptFileError(f"{where}: --ci needs an image path")
            prompt.control_images.append(value)
        else:
            setattr(prompt, name, _number(value, flag, float if name in ("guidance", "flow_shift") else int, where))
    for name in ("width", "height"):
        size = getattr(prompt, name)
        if size is not None and (size <= 0 or size % 16):
            nearest = max(16, round(size / 16) * 16)
            raise PromptFileError(f"{where}: --{name[0]} {size} is not a positive multiple of 16; use {nearest}")
    if prompt.steps is not None and prompt.steps < 1:
        raise PromptFileError(f"{where}: --s {prompt.steps}: steps must be at least 1")
    return prompt


def _number(value: str, flag: str, kind: type, where: str) -> int | float:
    try:
        number = kind(value)
    except ValueError:
        number = None
    # `--g nan` / `--fs inf` parse as floats but would silently ruin every sample.
    if number is None or (kind is float and not math.isfinite(number)):
        raise PromptFileError(f"{where}: --{flag} expects {'an integer' if kind is int else 'a finite number'}, "
                              f"got {value!r}")
    return number


def read_prompt_file(path: str | Path) -> list[SamplePrompt]:
    """Every prompt in a `.txt` prompt file (UTF-8), in order."""
    path = Path(path)
    if path.suffix.lower() not in (".txt", ""):
        raise PromptFileError(f"{path}: only .txt prompt files are read (one prompt per line with --w/--h/... "
                              f"options); convert the {path.suffix} file")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise PromptFileError(f"{path}: prompt file not found") from None
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = []
    root = path.parent.resolve()
    for number, line in enumerate(lines, start=1):
        prompt = parse_prompt_line(line, f"{path}:{number}")
        if prompt is not None:
            prompt.control_images = [_control_path(c, root, f"{path}:{number}") for c in prompt.control_images]
            prompts.append(prompt)
    return prompts


def _control_path(value: str, root: Path, where: str) -> str:
    """A `--ci` path of a prompt file, absolute, checked (links resolved) to lie inside the file's folder."""
    try:
        resolved = (root / Path(value).expanduser()).resolve()
    except (ValueError, RuntimeError) as e:  # a NUL byte, a lone surrogate, a symlink loop
        raise PromptFileError(f"{where}: --ci {value!r} is not a usable path ({e})") from None
    if not resolved.is_relative_to(root):
        raise PromptFileError(f"{where}: --ci {value} resolves to {resolved}, outside the prompt file's folder "
                              f"{root}; put the control image in that folder (or below it)")
    return str(resolved)
