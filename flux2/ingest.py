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
from flux2.buckets import control_bucket, select_bucket, target_size
from flux2.dataset import Entry, collect_sources, describe, list_entries
from flux2.images import ImageError, alpha_channel, open_mask, open_rgb, open_rgb_and_decoded
from flux2.params import DatasetParams, EvalParams, SourceParams
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
    "duplicate": "the same image bytes at the same bucket as an earlier item",
    "mask_missing": "the mask image is missing (alpha_mask: the image has no alpha channel)",
    "mask_unusable": "a mask cannot be decoded, differs in size from its image, or masks out everything",
}

CONTROL_TYPE = pa.struct([("path", pa.string()), ("sha256", pa.string()), ("width", pa.int32()),
                          ("height", pa.int32()),
                          ("bucket_width", pa.int32()),  # the size it is trained at (buckets.control_bucket)
                          ("bucket_height", pa.int32())])
MASK_TYPE = pa.struct([("path", pa.string()), ("sha256", pa.string()),
                       ("alpha", pa.bool_())])  # true: the alpha channel of the image at `path`
MANIFEST_SCHEMA = pa.schema([
    ("id", pa.string()),  # sha256[:16] of the image file (+ "-WxH" for the same image at a further bucket)
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
    ("batch_size", pa.int32()),  # the source's batch_size; null: train.batch_size
    ("mask", MASK_TYPE),  # the loss mask; null: none
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
    bucket_width: int = 0  # set from the source's control rules once the item's bucket is known
    bucket_height: int = 0


@dataclass
class Mask:
    path: str
    sha256: str
    alpha: bool


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
    batch_size: int | None = None
    mask: Mask | None = None


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
    holdout_min_items: int = 0
    holdout_skipped: bool = False  # too few images for a hold-out split: every item trains

    @property
    def images(self) -> int:
        """Distinct images (an image at several resolutions is several items)."""
        return len({i.sha256 for i in self.items})

    def buckets(self) -> dict[str, int]:
        """"WxH" -> item count, largest area first."""
        counts = Counter((i.bucket_width, i.bucket_height) for i in self.items)
        return {f"{w}x{h}": n for (w, h), n in sorted(counts.items(), key=lambda kv: (-kv[0][0] * kv[0][1], kv[0]))}


def ingest(dataset: DatasetParams, holdout_fraction: float = 0.1, base: str | Path = ".",
           progress: bool = True, holdout_min_items: int | None = None) -> IngestResult:
    """Ingest every source of `dataset`; write the manifest and the report (paths relative to `base`, the
    folder of params.yaml). Returns what was written. Raises IngestError when nothing is usable, or at the first
    bad item with `on_error: fail`; DatasetError / ParamsError for a source that cannot be read at all.

    An image listed by several sources at different buckets (the same pictures at several resolutions) is one
    item per bucket; at the same bucket it is a duplicate. Fewer than `holdout_min_items` distinct images
    (default: eval.holdout_min_items' default) hold nothing out."""
    if holdout_min_items is None:
        holdout_min_items = EvalParams().holdout_min_items
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
    first_of: dict[tuple, str] = {}  # (sha256, bucket) -> image_path of the item that was kept
    seen: set[str] = set()  # sha256 of every image kept
    for entry in tqdm(entries, desc="ingest", unit="item", disable=not progress, dynamic_ncols=True):
        name = _entry_name(entry, base)
        try:
            item = check_entry(entry, sources[entry.source], dataset, base)
            bucket = (item.bucket_width, item.bucket_height)
            if (item.sha256, bucket) in first_of:
                raise Rejected("duplicate", f"same image as {first_of[item.sha256, bucket]} at the same bucket "
                                            f"{bucket[0]}x{bucket[1]}")
            if item.sha256 in seen:  # the same image at a further resolution
                item.id = f"{item.id}-{bucket[0]}x{bucket[1]}"
        except Rejected as r:
            name, detail = printable(name), printable(r.detail)  # a non-UTF-8 name must still fit the report
            if dataset.on_error == "fail":
                raise IngestError(f"{name}: {r.reason}: {detail} (dataset.on_error is fail; fix the item, or "
                                  f"set dataset.on_error: skip to skip bad items and list them in {dataset.report})"
                                  ) from None
            rejected.append(Rejection(name, r.reason, detail))
            continue
        first_of[item.sha256, bucket] = item.image_path
        seen.add(item.sha256)
        items.append(item)

    items.sort(key=lambda i: (i.source, i.image_path))
    images = sorted({i.sha256 for i in items})
    # Every item of one image lands on the same side: an image trained at 512 px is no hold-out at 1024 px.
    skipped = holdout_fraction > 0 and len(images) < holdout_min_items
    split_of = dict(zip(images, holdout_split(images, 0.0 if skipped else holdout_fraction)))
    for item in items:
        item.split = split_of[item.sha256]
    result = IngestResult(items, rejected, len(entries), manifest, report, holdout_min_items, skipped)
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
    masks = [entry.mask] if entry.mask is not None and not source.alpha_mask else []  # alpha: the image itself
    for path in (entry.image, *entry.controls, *masks):
        if problem := utf8_problem(path):
            raise Rejected("bad_file_name", problem)
    width, height, sha, decoded = check_image(entry.image, dataset.min_side, dataset.max_pixels, source.alpha_mask)
    caption = read_caption(entry)
    controls = [check_control(p, dataset.max_pixels, base) for p in entry.controls]
    if source.alpha_mask:
        mask = check_alpha_mask(decoded, entry.image, sha, base)
    else:
        mask = check_mask(entry.mask, (width, height), dataset.max_pixels, base) if entry.mask else None
    bucket = select_bucket(width, height, source.resolution, source.enable_bucket, source.bucket_no_upscale)
    for c in controls:
        c.bucket_width, c.bucket_height = control_bucket(c.width, c.height, bucket, source.no_resize_control,
                                                         source.control_resolution)
    return Item(id=sha[:16], image_path=relative(entry.image, base), sha256=sha, caption=caption, width=width,
                height=height, bucket_width=bucket[0], bucket_height=bucket[1], split="train",
                num_repeats=source.num_repeats, source=entry.source, controls=controls,
                batch_size=source.batch_size, mask=mask)


def check_image(path: Path, min_side: int, max_pixels: int, alpha: bool = False
                ) -> tuple[int, int, str, Image.Image | None]:
    """(width, height after EXIF orientation, sha256 of the file, the decoded image when `alpha`: its alpha channel
    is the mask) of a usable image; raises Rejected.

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
        im, decoded = open_rgb_and_decoded(path, max_pixels) if alpha else (open_rgb(path, max_pixels), None)
    except ImageError as e:
        raise Rejected("unreadable", _strip_path(e, path)) from None
    return im.width, im.height, sha256_file(path), decoded


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


def check_mask(path: Path, size: tuple[int, int], max_pixels: int, base: Path) -> Mask:
    """A usable loss mask file (mask_directory) of an image of `size`; raises Rejected('mask_missing' /
    'mask_unusable')."""
    if not path.is_file():
        raise Rejected("mask_missing", f"{relative(path, base)} does not exist")
    try:
        mask = open_mask(path, max_pixels=max_pixels)
    except ImageError as e:
        raise Rejected("mask_unusable", f"{relative(path, base)}: {_strip_path(e, path)}") from None
    if mask.size != size:
        raise Rejected("mask_unusable", f"{relative(path, base)} is {mask.width}x{mask.height}, its image "
                                        f"{size[0]}x{size[1]}; masks must have their image's size")
    _check_not_black(mask, path, base)
    return Mask(relative(path, base), sha256_file(path), False)


def check_alpha_mask(decoded: Image.Image, path: Path, sha: str, base: Path) -> Mask:
    """The alpha channel of the image at `path` (`decoded` by check_image; sha256 `sha`) as a usable loss mask;
    raises Rejected('mask_missing' / 'mask_unusable')."""
    try:
        mask = alpha_channel(decoded, path)
    except ImageError as e:
        raise Rejected("mask_missing", f"{relative(path, base)}: {_strip_path(e, path)}") from None
    _check_not_black(mask, path, base)
    return Mask(relative(path, base), sha, True)


def _check_not_black(mask: Image.Image, path: Path, base: Path) -> None:
    if mask.getextrema()[1] == 0:
        raise Rejected("mask_unusable", f"{relative(path, base)} is black everywhere: nothing would be learned "
                                        f"from this image")


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
        "images": result.images,
        "holdout_note": holdout_note(result),
        # printable: a folder name that is not UTF-8 must still fit the report (its items are bad_file_name)
        "sources": [{"index": i, "description": printable(describe(s)), "resolution": s.resolution,
                     "enable_bucket": s.enable_bucket, "bucket_no_upscale": s.bucket_no_upscale,
                     "num_repeats": s.num_repeats, "batch_size": s.batch_size,
                     "no_resize_control": s.no_resize_control, "control_resolution": s.control_resolution,
                     "masks": "alpha" if s.alpha_mask else printable(s.mask_directory) if s.mask_directory else None,
                     "used": used[i]}
                    for i, s in enumerate(sources)],
        "manifest": relative(result.manifest, base),
        "settings": {"min_side": dataset.min_side, "max_pixels": dataset.max_pixels, "on_error": dataset.on_error,
                     "holdout_fraction": holdout_fraction, "holdout_min_items": result.holdout_min_items},
    }


def holdout_note(result: IngestResult) -> str | None:
    """Why nothing is held out, when the dataset is too small for a split; None otherwise."""
    if not result.holdout_skipped:
        return None
    return (f"{result.images} images is under eval.holdout_min_items ({result.holdout_min_items}): every item "
            f"trains, and the validation loss is measured on training items")


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
    if result.holdout_skipped:
        lines.append(f"  no hold-out: {holdout_note(result)}")
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
