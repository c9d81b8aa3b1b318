"""Ingest: decode and check every dataset item once, assign buckets and the hold-out split, write the manifest.

Outputs: `data/manifest.parquet` (one row per usable item, see MANIFEST_SCHEMA) and `reports/ingest.json`
(counts, every rejected file with its reason, the bucket histogram), plus a printed summary. Bad items are
skipped and reported (`dataset.on_error: fail` stops at the first); no usable item at all is an error.
Reason codes are stable: see REASONS.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from flux2.atomic import atomic_path, atomic_write_json, sha256_file
from flux2.buckets import select_bucket, target_size
from flux2.dataset import Entry, collect_sources, describe, list_entries
from flux2.images import ImageError, open_rgb
from flux2.params import DatasetParams, SourceParams
from flux2.user_files import FileTooLarge, UserFileError, check_writable, open_regular, printable, read_limited, \
    utf8_problem

# Far more than any text encoder reads (512 tokens are ~2,000 characters): a longer caption is a mistake, such as a
# whole document or a CSV column shifted into the caption.
MAX_CAPTION_CHARS = 20_000

REASONS = {
    "image_missing": "the image file does not exist",
    "path_outside_root": "a manifest path resolves outside the dataset root",
    "unreadable": "not a readable image (truncated, empty, not an image, not a regular file such as a FIFO)",
    "unsupported_format": "an image format ingest does not read (.gif, .heic, .avif, ...): convert it to PNG",
    "bad_file_name": "the file name is not valid UTF-8: rename it",
    "bad_row": "a manifest row that cannot be read as it is (more fields than the header, two columns for one "
               "control)",
    "too_small": "the shorter side is under dataset.min_side",
    "too_large": "more pixels than dataset.max_pixels",
    "caption_missing": "no caption file (or one that is not a readable regular file) / no caption in the "
                       "manifest row",
    "caption_empty": "the caption is empty or only whitespace",
    "caption_not_utf8": "the caption file is not UTF-8 text",
    "caption_too_long": f"the caption is over {MAX_CAPTION_CHARS:,} characters (the text encoder reads a few "
                        "hundred tokens)",
    "control_missing": "a control image is missing",
    "control_unreadable": "a control image cannot be decoded",
    "duplicate": "the same image bytes as an earlier item",
}

CONTROL_TYPE = pa.struct([("path", pa.string()), ("sha256", pa.string()), ("width", pa.int32()),
                          ("height", pa.int32())])
MANIFEST_SCHEMA = pa.schema([
    ("id", pa.string()),  # sha256[:16] of the image file: stable across machines and renames
    ("image_path", pa.string()),  # relative to the project folder (params.yaml's) when inside it, else absolute
    ("sha256", pa.string()),
    ("caption", pa.string()),
    ("width", pa.int32()),  # original size, after EXIF orientation
    ("height", pa.int32()),
    ("bucket_width", pa.int32()),
    ("bucket_height", pa.int32()),
    ("split", pa.string()),  # train | holdout
    ("num_repeats", pa.int32()),
    ("source", pa.int32()),  # index into the dataset's sources
    ("controls", pa.list_(CONTROL_TYPE)),
], metadata={"flux2_manifest": "1"})


class IngestError(ValueError):
    """The dataset cannot be ingested (a bad item with on_error: fail, or no usable item), with the reason."""


class Rejected(Exception):
    """An item that is skipped, with its reason code and a detail for the report."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Control:
    path: str
    sha256: str
    width: int
    height: int


@dataclass
class Item:
    """One usable item: a row of the manifest."""

    id: str
    image_path: str
    sha256: str
    caption: str
    width: int
    height: int
    bucket_width: int
    bucket_height: int
    split: str
    num_repeats: int
    source: int
    controls: list[Control] = field(default_factory=list)


@dataclass
class Rejection:
    path: str
    reason: str
    detail: str


@dataclass
class IngestResult:
    items: list[Item]
    rejected: list[Rejection]
    found: int
    manifest: Path
    report: Path

    def buckets(self) -> dict[str, int]:
        """"WxH" -> item count, largest area first."""
        counts = Counter((i.bucket_width, i.bucket_height) for i in self.items)
        return {f"{w}x{h}": n for (w, h), n in sorted(counts.items(), key=lambda kv: (-kv[0][0] * kv[0][1], kv[0]))}


def ingest(dataset: DatasetParams, holdout_fraction: float = 0.1, base: str | Path = ".",
           progress: bool = True) -> IngestResult:
    """Ingest every source of `dataset`; write the manifest and the report (paths relative to `base`, the
    folder of params.yaml). Returns what was written. Raises IngestError when nothing is usable, or at the first
    bad item with `on_error: fail`; DatasetError / ParamsError for a source that cannot be read at all."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise IngestError(f"holdout_fraction: must be in [0, 1), got {holdout_fraction}")
    base = Path(base).absolute()
    sources = collect_sources(dataset, base)
    for i, s in enumerate(sources):
        try:
            select_bucket(*target_size(s.resolution), s.resolution, s.enable_bucket, s.bucket_no_upscale)
        except ValueError as e:
            raise IngestError(f"source {i} ({describe(s)}): {e}") from None
    manifest, report = base / dataset.manifest, base / dataset.report
    check_writable(manifest, "dataset.manifest")  # before the work, not after it
    check_writable(report, "dataset.report")
    entries = [e for i, s in enumerate(sources) for e in list_entries(s, i)]

    items: list[Item] = []
    rejected: list[Rejection] = []
    first_of: dict[str, str] = {}  # sha256 -> image_path of the item that was kept
    for entry in tqdm(entries, desc="ingest", unit="item", disable=not progress, dynamic_ncols=True):
        name = _entry_name(entry, base)
        try:
            item = check_entry(entry, sources[entry.source], dataset, base)
            if item.sha256 in first_of:
                raise Rejected("duplicate", f"same image as {first_of[item.sha256]}")
        except Rejected as r:
            name, detail = printable(name), printable(r.detail)  # a non-UTF-8 name must still fit the report
            if dataset.on_error == "fail":
                raise IngestError(f"{name}: {r.reason}: {detail} (dataset.on_error is fail; fix the item, or "
                                  f"set dataset.on_error: skip to skip bad items and list them in {dataset.report})"
                                  ) from None
            rejected.append(Rejection(name, r.reason, detail))
            continue
        first_of[item.sha256] = item.image_path
        items.append(item)

    items.sort(key=lambda i: (i.source, i.image_path))
    for item, split in zip(items, holdout_split([i.sha256 for i in items], holdout_fraction)):
        item.split = split
    result = IngestResult(items, rejected, len(entries), manifest, report)
    report_data = build_report(result, sources, dataset, holdout_fraction, base)
    if not items:
        atomic_write_json(report, report_data)
        raise IngestError(_nothing_usable(result, sources, base))
    with atomic_path(manifest) as tmp:  # both written before either replaces its old version
        pq.write_table(manifest_table(items), tmp)
        atomic_write_json(report, report_data)
    print(summary(result, base))
    return result


def check_entry(entry: Entry, source: SourceParams, dataset: DatasetParams, base: Path) -> Item:
    """Decode and check one entry; raises Rejected with the first problem found. The split is set later."""
    if entry.problem:
        raise Rejected(*entry.problem)
    for path in (entry.image, *entry.controls):
        if utf8_problem(path):
            raise Rejected("bad_file_name", utf8_problem(path))
    width, height, sha = check_image(entry.image, dataset.min_side, dataset.max_pixels)
    caption = read_caption(entry)
    controls = [check_control(p, dataset.max_pixels, base) for p in entry.controls]
    bucket = select_bucket(width, height, source.resolution, source.enable_bucket, source.bucket_no_upscale)
    return Item(id=sha[:16], image_path=relative(entry.image, base), sha256=sha, caption=caption, width=width,
                height=height, bucket_width=bucket[0], bucket_height=bucket[1], split="train",
                num_repeats=source.num_repeats, source=entry.source, controls=controls)


def check_image(path: Path, min_side: int, max_pixels: int) -> tuple[int, int, str]:
    """(width, height after EXIF orientation, sha256 of the file) of a usable image; raises Rejected.

    The size is checked from the header first, so a file that claims 30000x30000 is refused before decoding.
    Rotation does not change the shorter side or the pixel count, so the header size is enough for that.
    """
    w, h = probe_size(path)
    if w * h > max_pixels:
        raise Rejected("too_large", f"{w}x{h} = {w * h:,} pixels is over dataset.max_pixels ({max_pixels:,}); "
                                    f"downscale it")
    if min(w, h) < min_side:
        raise Rejected("too_small", f"{w}x{h}: the shorter side is under dataset.min_side ({min_side})")
    try:
        im = open_rgb(path, max_pixels)
    except ImageError as e:
        raise Rejected("unreadable", _strip_path(e, path)) from None
    return im.width, im.height, sha256_file(path)


def probe_size(path: Path) -> tuple[int, int]:
    """The size in the file header (no pixel data read); Rejected('unreadable') if it is not an image."""
    try:
        with open_regular(path) as f, Image.open(f) as im:
            return im.size
    except FileNotFoundError:
        raise Rejected("image_missing", "file not found") from None
    except UserFileError as e:
        raise Rejected("unreadable", _strip_path(e, path)) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Rejected("unreadable", f"not an image ({e})") from None


def check_control(path: Path, max_pixels: int, base: Path) -> Control:
    """A decoded, usable control image; raises Rejected('control_missing' / 'control_unreadable')."""
    if not path.is_file():
        raise Rejected("control_missing", f"{relative(path, base)} does not exist")
    try:
        im = open_rgb(path, max_pixels)
    except ImageError as e:
        raise Rejected("control_unreadable", f"{relative(path, base)}: {_strip_path(e, path)}") from None
    return Control(relative(path, base), sha256_file(path), im.width, im.height)


def read_caption(entry: Entry) -> str:
    """The entry's caption, UTF-8, stripped; raises Rejected('caption_missing' / 'caption_not_utf8' /
    'caption_empty')."""
    if entry.caption_file is not None:
        try:
            data = read_limited(entry.caption_file, 4 * MAX_CAPTION_CHARS + 3, "a caption")  # UTF-8: <= 4 bytes a char
        except FileNotFoundError:
            raise Rejected("caption_missing", f"no caption file {entry.caption_file.name}") from None
        except FileTooLarge:
            raise Rejected("caption_too_long", f"{entry.caption_file.name} is over "
                                               f"{4 * MAX_CAPTION_CHARS + 3:,} bytes; is it a caption?") from None
        except UserFileError as e:  # a FIFO, or a link to /dev/zero
            raise Rejected("caption_missing", str(e)) from None
        except OSError as e:
            raise Rejected("caption_missing", f"cannot read {entry.caption_file.name} ({e.strerror or e})") from None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise Rejected("caption_not_utf8", f"{entry.caption_file.name} is not UTF-8 ({e.reason} at byte "
                                               f"{e.start}); save it as UTF-8") from None
    elif entry.caption is not None:
        text = entry.caption
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate from a JSON escape: not writable as UTF-8
            raise Rejected("caption_not_utf8", f"the caption holds {e.object[e.start]!r}, which is not UTF-8 "
                                               "text") from None
    else:
        raise Rejected("caption_missing", "no caption")
    text = text.strip()
    if not text:
        raise Rejected("caption_empty", f"{entry.caption_file.name if entry.caption_file else 'caption'} is empty")
    if len(text) > MAX_CAPTION_CHARS:
        raise Rejected("caption_too_long", f"{entry.caption_file.name if entry.caption_file else 'the caption'} "
                                           f"holds {len(text):,} characters; shorten it")
    return text



def holdout_split(sha256s: list[str], fraction: float) -> list[str]:
    """"holdout" or "train" for each item, from its content hash alone: holdout when
    int(sha256[:8], 16) / 2**32 < fraction. With fraction > 0 and at least 2 items there is at least one of
    each: the item with the smallest hash value is moved to holdout, or the largest to train."""
    u = [int(s[:8], 16) / 2**32 for s in sha256s]
    split = ["holdout" if x < fraction else "train" for x in u]
    if fraction > 0 and len(split) >= 2:
        order = sorted(range(len(u)), key=lambda i: (u[i], sha256s[i]))
        if "holdout" not in split:
            split[order[0]] = "holdout"
        if "train" not in split:
            split[order[-1]] = "train"
    return split


def manifest_table(items: list[Item]) -> pa.Table:
    """The items as a table of MANIFEST_SCHEMA."""
    return pa.Table.from_pylist([asdict(i) for i in items], schema=MANIFEST_SCHEMA)


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a manifest written by `ingest`, as dicts (controls: a list of dicts)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; run the ingest stage first (flux2 ingest / dvc repro ingest)")
    table = pq.read_table(path)
    missing = [n for n in MANIFEST_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{path}: not an ingest manifest (missing columns {', '.join(missing)}); run ingest again")
    return table.to_pylist()


def relative(path: Path, base: Path) -> str:
    """`path` relative to `base` (POSIX form) when inside it, else absolute."""
    for b in (base, base.resolve()):
        try:
            return path.relative_to(b).as_posix()
        except ValueError:
            pass
    return path.as_posix()


def _entry_name(entry: Entry, base: Path) -> str:
    if entry.where and entry.image == Path():
        return entry.where
    return relative(entry.image, base)


def _strip_path(e: Exception, path: Path) -> str:
    message = str(e)
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def build_report(result: IngestResult, sources: list[SourceParams], dataset: DatasetParams,
                 holdout_fraction: float, base: Path) -> dict[str, Any]:
    """The JSON report: counts, rejected files by reason, buckets, per-source counts, settings."""
    rejected: dict[str, list[dict[str, str]]] = {}
    for r in result.rejected:
        rejected.setdefault(r.reason, []).append({"path": r.path, "detail": r.detail})
    used = Counter(i.source for i in result.items)
    splits = Counter(i.split for i in result.items)
    return {
        "found": result.found,
        "used": len(result.items),
        "train": splits["train"],
        "holdout": splits["holdout"],
        "rejected_count": len(result.rejected),
        "rejected_by_reason": {k: len(v) for k, v in rejected.items()},
        "rejected": rejected,
        "reason_codes": REASONS,
        "buckets": result.buckets(),
        "sources": [{"index": i, "description": describe(s), "resolution": s.resolution,
                     "enable_bucket": s.enable_bucket, "bucket_no_upscale": s.bucket_no_upscale,
                     "num_repeats": s.num_repeats, "used": used[i]} for i, s in enumerate(sources)],
        "manifest": relative(result.manifest, base),
        "settings": {"min_side": dataset.min_side, "max_pixels": dataset.max_pixels, "on_error": dataset.on_error,
                     "holdout_fraction": holdout_fraction},
    }


def _by_reason(rejected: list[Rejection], max_names: int) -> list[str]:
    grouped: dict[str, list[str]] = {}
    for r in rejected:
        grouped.setdefault(r.reason, []).append(r.path)
    lines = []
    for reason in REASONS:
        names = grouped.get(reason)
        if names:
            more = f", ... and {len(names) - max_names} more" if len(names) > max_names else ""
            lines.append(f"  {reason} ({len(names)}): {', '.join(names[:max_names])}{more}")
    return lines


def summary(result: IngestResult, base: Path, max_names: int = 8) -> str:
    """The printed summary: counts, rejected files per reason (a few names each), buckets, what was written."""
    splits = Counter(i.split for i in result.items)
    lines = [f"ingest: {result.found} items found, {len(result.items)} used ({splits['train']} train, "
             f"{splits['holdout']} holdout), {len(result.rejected)} rejected"]
    lines += _by_reason(result.rejected, max_names)
    lines.append("  buckets: " + ", ".join(f"{k}: {n}" for k, n in result.buckets().items()))
    lines.append(f"wrote {relative(result.manifest, base)} ({len(result.items)} items) and "
                 f"{relative(result.report, base)}")
    return "\n".join(lines)


def _nothing_usable(result: IngestResult, sources: list[SourceParams], base: Path) -> str:
    if result.found == 0:
        return ("no usable items: no images found in " + "; ".join(describe(s) for s in sources) +
                " (image files: .png .jpg .jpeg .webp .bmp .tif .tiff; manifests: rows with image_path)")
    counts = Counter(r.reason for r in result.rejected)
    reasons = "; ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return (f"no usable items: all {result.found} found were rejected ({reasons}):\n" +
            "\n".join(_by_reason(result.rejected, 5)) + f"\nevery file and reason: {relative(result.report, base)}")
