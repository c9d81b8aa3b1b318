"""Pictures the pipeline renders itself, as PNG (DVC's HTML plots load their scripts from the network): labelled
image grids with the prompts written on them, tables of text, the training loss curve and the validation loss
per timestep.

Grids and tables are drawn with PIL (its built-in scalable font); the curves with matplotlib's Agg backend,
without pyplot's global state. Every file is written atomically.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from flux2.atomic import atomic_path

BACKGROUND = (255, 255, 255)
EMPTY_CELL = (235, 235, 235)
TEXT = (20, 20, 20)
MUTED = (110, 110, 110)
PAD = 8


def font(size: int = 15) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at `size` pixels (scalable, so the text stays readable on large grids)."""
    return ImageFont.load_default(size=size)


def wrap(text: str, fnt, width: int, max_lines: int | None = None) -> list[str]:
    """`text` broken into lines at most `width` pixels wide (words longer than a line are cut); with
    `max_lines`, the last shown line ends with an ellipsis when text is left over."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if fnt.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while fnt.getlength(word) > width:  # a word wider than the line: cut it
                cut = max(1, next((i for i in range(len(word), 0, -1) if fnt.getlength(word[:i]) <= width), 1))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    if max_lines is not None and len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and fnt.getlength(last + "...") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "..."]
    return lines


def text_height(fnt, lines: int, spacing: int = 4) -> int:
    return lines * (line_height(fnt) + spacing)


def line_height(fnt) -> int:
    left, top, right, bottom = fnt.getbbox("Ag")
    return bottom - min(top, 0)


def draw_lines(draw: ImageDraw.ImageDraw, xy: tuple[int, int], lines: list[str], fnt, fill=TEXT,
               spacing: int = 4) -> None:
    x, y = xy
    for line in lines:
        draw.text((x, y), line, font=fnt, fill=fill)
        y += line_height(fnt) + spacing


def fit(im: Image.Image, width: int, height: int) -> Image.Image:
    """`im` scaled (up or down, aspect kept) to fit width x height, centred on a light background."""
    scale = min(width / im.width, height / im.height)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    # Upscaled small samples keep their pixels visible (NEAREST); large ones are filtered down.
    resized = im.convert("RGB").resize(size, Image.NEAREST if scale >= 2 else Image.LANCZOS)
    cell = Image.new("RGB", (width, height), EMPTY_CELL)
    cell.paste(resized, ((width - size[0]) // 2, (height - size[1]) // 2))
    return cell


@dataclass
class GridRow:
    """One row of an image grid: its label (e.g. the prompt) and one image per column (None: left empty)."""

    label: str
    cells: list[Image.Image | None]


def image_grid(rows: list[GridRow], columns: list[str], title: str = "", cell: int = 256,
               label_width: int = 260) -> Image.Image:
    """A grid: a title line, a header naming the columns, then per row its label (wrapped) beside its images,
    each fitted into a `cell` x `cell` square."""
    title_font, head_font, label_font = font(20), font(16), font(15)
    title_lines = wrap(title, title_font, label_width + len(columns) * (cell + PAD)) if title else []
    title_h = text_height(title_font, len(title_lines)) + PAD if title else 0
    head_lines = [wrap(c, head_font, cell) for c in columns]
    head_h = text_height(head_font, max((len(h) for h in head_lines), default=1)) + PAD
    width = PAD + label_width + len(columns) * (cell + PAD)
    height = PAD + title_h + head_h + len(rows) * (cell + PAD)
    out = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(out)
    y = PAD
    if title_lines:
        draw_lines(draw, (PAD, y), title_lines, title_font)
        y += title_h
    for j, lines in enumerate(head_lines):
        draw_lines(draw, (PAD + label_width + j * (cell + PAD), y), lines, head_font)
    y += head_h
    max_label_lines = max(1, cell // (line_height(label_font) + 4))
    for row in rows:
        draw_lines(draw, (PAD, y), wrap(row.label, label_font, label_width - 2 * PAD, max_label_lines),
                   label_font)
        for j, im in enumerate(row.cells):
            x = PAD + label_width + j * (cell + PAD)
            if im is None:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=EMPTY_CELL)
            else:
                out.paste(fit(im, cell, cell), (x, y))
        y += cell + PAD
    return out


def text_table(header: list[str], rows: list[list[str]], title: str = "", col_width: int = 260,
               first_width: int = 260) -> Image.Image:
    """A table of text as an image: a title, a bold-ish header row, then the rows, cells wrapped to their
    column width, with light rules between rows."""
    title_font, head_font, cell_font = font(20), font(16), font(15)
    widths = [first_width] + [col_width] * (len(header) - 1)
    width = PAD + sum(w + PAD for w in widths)
    wrapped = [[wrap(str(c), head_font if r == 0 else cell_font, w - PAD) for c, w in zip(row, widths)]
               for r, row in enumerate([header] + rows)]
    heights = [text_height(head_font if r == 0 else cell_font, max(len(c) for c in row)) + PAD
               for r, row in enumerate(wrapped)]
    title_lines = wrap(title, title_font, width - 2 * PAD) if title else []
    title_h = text_height(title_font, len(title_lines)) + PAD if title else 0
    out = Image.new("RGB", (width, PAD + title_h + sum(heights) + PAD), BACKGROUND)
    draw = ImageDraw.Draw(out)
    y = PAD
    if title_lines:
        draw_lines(draw, (PAD, y), title_lines, title_font)
        y += title_h
    for r, (row, h) in enumerate(zip(wrapped, heights)):
        x = PAD
        for lines, w in zip(row, widths):
            draw_lines(draw, (x, y + PAD // 2), lines, head_font if r == 0 else cell_font,
                       fill=TEXT if r == 0 or x > PAD else MUTED)
            x += w + PAD
        y += h
        draw.line([PAD, y - 2, width - PAD, y - 2], fill=EMPTY_CELL if r else MUTED, width=1)
    return out


def stack(images: list[Image.Image], direction: str = "vertical", gap: int = PAD) -> Image.Image:
    """Images one below (or beside) the other on a white background, aligned to the top left."""
    if direction == "vertical":
        size = (max(i.width for i in images), sum(i.height for i in images) + gap * (len(images) - 1))
    else:
        size = (sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images))
    out = Image.new("RGB", size, BACKGROUND)
    offset = 0
    for im in images:
        out.paste(im, (0, offset) if direction == "vertical" else (offset, 0))
        offset += (im.height if direction == "vertical" else im.width) + gap
    return out


def save_image(im: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically."""
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
    return Path(path)


def _save_figure(fig, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi, bbox_inches="tight", metadata={"Software": None})
    return Path(path)


def read_loss_csv(path: str | Path) -> tuple[list[int], list[float], list[float]]:
    """(steps, losses, learning rates) from the training's plots/train_loss.csv (step,loss,lr)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training loss history; run the train stage first (dvc repro train)")
    steps, losses, lrs = [], [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
            lrs.append(float(row["lr"]))
    return steps, losses, lrs


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_train_loss(csv_path: str | Path, png_path: str | Path, title: str = "training loss") -> Path:
    """The training loss per step (raw and smoothed) with the learning rate on a second axis."""
    from matplotlib.figure import Figure

    steps, losses, lrs = read_loss_csv(csv_path)
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    window = len(steps) // 20
    if window >= 2:
        ax.plot(steps, moving_average(losses, window), color="tab:blue", linewidth=2,
                label=f"loss (mean of {window})")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, lrs, color="tab:orange", linewidth=1, linestyle="--", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lines = ax.get_lines() + lr_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize=8)
    return _save_figure(fig, png_path)


def plot_val_loss(timesteps: list[float], series: dict[str, list[float | None]], png_path: str | Path,
                  title: str = "validation loss per timestep") -> Path:
    """Loss against timestep t, one line per series (e.g. 'base, hold-out'); series names containing 'LoRA'
    are drawn solid, the others dashed; None values are left out."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    for name, values in series.items():
        points = [(t, v) for t, v in zip(timesteps, values) if v is not None]
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                linestyle="-" if "LoRA" in name else "--", label=name)
    ax.set_xlabel("timestep t (0 = clean, 1 = noise)")
    ax.set_ylabel("flow-matching loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, png_path)
