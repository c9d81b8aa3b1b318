"""Dataset sources -> entries: what each source says its items are, before any image is opened.

A source is a folder of images with caption files (`image_directory`) or a manifest (`manifest` /
musubi-tuner's `image_jsonl_file`: JSONL, CSV or Parquet with `image_path`, `caption` and optional
`control_path` or `control_path_0`, `control_path_1`, ...). A `control_directory` adds controls matched by file
stem: `name.*` (one), or `name_0.*`, `name_1.*`, ... (several; `name_0000` also works); a `mask_directory` adds
loss masks by exact stem (`name.*`), and `alpha_mask` takes each image's alpha channel as its mask.
A musubi-tuner dataset TOML (`[general]` + `[[datasets]]`) becomes the same SourceParams.

Problems visible from the listing alone (a manifest path outside its root, a missing file, no matching
control) are recorded on the entry with a reason code; `flux2.ingest` opens the files and finds the rest.
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flux2.params import DatasetParams, ParamsError, SourceParams, parse_params
from flux2.user_files import UserFileError, open_regular, read_limited

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
# Image formats a folder may hold that ingest does not train on: listed as rejected (unsupported_format), so
# they are never skipped unseen. GIFs are animations or 256-colour palettes; the others need plugins or raw
# development.
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset({".gif", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".svg", ".psd",
                                          ".tga", ".ico", ".exr", ".dng", ".cr2", ".nef", ".arw"})
LISTED_EXTENSIONS = IMAGE_EXTENSIONS | UNSUPPORTED_IMAGE_EXTENSIONS  # the files a folder's listing looks at
MANIFEST_EXTENSIONS = (".jsonl", ".csv", ".parquet")
MAX_MANIFEST_BYTES = 2_000_000_000  # a JSONL / CSV manifest is read whole: ~10 million rows
MAX_CONFIG_BYTES = 10_000_000

# musubi-tuner's dataset TOML: the keys we use (musubi's, plus sd-scripts' alpha_mask and our mask_directory), their
# musubi defaults, and musubi keys that nobody uses for FLUX.2 images. Dataset values override [general].
MUSUBI_KEYS = ("image_directory", "image_jsonl_file", "control_directory", "resolution", "enable_bucket",
               "bucket_no_upscale", "num_repeats", "caption_extension", "batch_size", "no_resize_control",
               "control_resolution", "mask_directory", "alpha_mask")
MUSUBI_DEFAULTS = {"resolution": [960, 544], "enable_bucket": False, "bucket_no_upscale": False,
                   "num_repeats": 1, "caption_extension": ".txt"}
MUSUBI_IGNORED = frozenset({
    "cache_directory", "skip_corrupted_cache", "debug_dataset", "multiple_target", "fp_latent_window_size",
    "fp_1f_clean_indices",
    "fp_1f_target_index", "fp_1f_no_post", "flux_kontext_no_resize_control", "qwen_image_edit_no_resize_control",
    "qwen_image_edit_control_resolution"})
MUSUBI_VIDEO_KEYS = ("video_directory", "video_jsonl_file")


class DatasetError(ValueError):
    """A source that cannot be listed at all (missing folder, unreadable manifest, bad TOML)."""


@dataclass
class Entry:
    """One candidate item as its source describes it."""

    source: int  # index into the list of sources
    image: Path  # absolute
    caption: str | None = None  # a manifest's caption text (None: the row has none)
    caption_file: Path | None = None  # a folder's caption file, `<stem><caption_extension>`
    controls: list[Path] = field(default_factory=list)
    mask: Path | None = None  # the loss mask: a mask_directory file, or the image itself (alpha_mask)
    problem: tuple[str, str] | None = None  # (reason code, detail) found while listing
    where: str = ""  # "manifest.jsonl row 3" for manifest rows, for messages


def load_musubi_toml(path: str | Path, verbose: bool = True) -> list[SourceParams]:
    """A musubi-tuner dataset config (`.toml`, or its `.json` form) as SourceParams, paths made absolute.

    Relative paths are looked up beside the TOML first, then (musubi-tuner's convention) in the current folder.
    Keys ingest does not use (batch_size, cache_directory, ...) are accepted and named in one info line.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: dataset config not found")
    try:
        text = read_limited(path, MAX_CONFIG_BYTES, "a dataset config").decode("utf-8")
        if path.suffix.lower() == ".json":
            config = json.loads(text)
        else:
            config = _toml_module().loads(text)
    except UserFileError as e:
        raise DatasetError(str(e)) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not a valid dataset config ({e})") from None
    if not isinstance(config, dict):
        raise DatasetError(f"{path}: expected a [general] table and [[datasets]] tables")
    general = config.get("general", {})
    datasets = config.get("datasets", [])
    if not isinstance(general, dict) or not isinstance(datasets, list) or not all(
            isinstance(d, dict) for d in datasets):
        raise DatasetError(f"{path}: expected a [general] table and [[datasets]] tables")
    if not datasets:
        raise DatasetError(f"{path}: no [[datasets]]; add at least one with image_directory or image_jsonl_file")
    other = sorted(set(config) - {"general", "datasets"})
    ignored: set[str] = set(other)
    sources = []
    for i, d in enumerate(datasets):
        where = f"{path}: [[datasets]][{i}]"
        video = [k for k in MUSUBI_VIDEO_KEYS if k in d]
        if video:
            raise DatasetError(f"{where}: {video[0]} is a video dataset; FLUX.2 LoRA training uses image datasets "
                               f"(image_directory or image_jsonl_file)")
        merged = {**MUSUBI_DEFAULTS, **general, **d}
        for key in merged:
            if key in MUSUBI_KEYS:
                continue
            near = difflib.get_close_matches(key, MUSUBI_KEYS, n=1, cutoff=0.85)
            if near and key not in MUSUBI_IGNORED:
                raise DatasetError(f"{where}: unknown key {key!r}; did you mean {near[0]}?")
            ignored.add(key)
        values = {k: v for k, v in merged.items() if k in MUSUBI_KEYS}
        for key in ("resolution", "control_resolution"):
            if isinstance(values.get(key), list) and len(values[key]) == 1:
                values[key] = values[key][0]
        for key in ("image_directory", "image_jsonl_file", "control_directory", "mask_directory"):
            if isinstance(values.get(key), str):
                values[key] = str(_toml_path(values[key], path.parent))
        sources.append(values)
    try:
        params = parse_params({"dataset": {"sources": sources}}, str(path))
    except ParamsError as e:
        raise DatasetError(str(e).replace("dataset.sources[", "[[datasets]][")) from None
    if ignored and verbose:
        print(f"{path}: ignoring keys that ingest does not use: {', '.join(sorted(ignored))}")
    return params.dataset.sources


def _toml_module():
    try:
        import tomllib  # Python 3.11+
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise DatasetError("reading a TOML dataset config needs Python 3.11+ or `pip install tomli`") from None
    return tomllib


def _toml_path(value: str, toml_dir: Path) -> Path:
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    beside = toml_dir / p
    if beside.exists() or not p.exists():
        return beside.absolute()
    return p.absolute()  # musubi-tuner resolves against the current folder


def collect_sources(dataset: DatasetParams, base: str | Path = ".", verbose: bool = True) -> list[SourceParams]:
    """The sources of `dataset` (`sources`, then the musubi TOML's), with every path absolute.

    Relative paths are relative to `base` (the folder of params.yaml).
    """
    base = Path(base).absolute()
    sources = [_absolute(s, base) for s in dataset.sources]
    if dataset.toml:
        sources += load_musubi_toml(base / dataset.toml, verbose=verbose)
    if not sources:
        raise DatasetError("no dataset sources: list dataset.sources in params.yaml or set dataset.toml")
    return sources


def _absolute(source: SourceParams, base: Path) -> SourceParams:
    changes = {}
    for key in ("image_directory", "manifest", "image_jsonl_file", "control_directory", "mask_directory", "root"):
        value = getattr(source, key)
        if value is not None:
            changes[key] = str((base / Path(value).expanduser()).absolute())
    return dataclasses.replace(source, **changes)


def describe(source: SourceParams) -> str:
    """`folder PATH` or `manifest PATH`, for messages."""
    if source.image_directory:
        return f"folder {source.image_directory}"
    return f"manifest {source.manifest or source.image_jsonl_file}"


def list_entries(source: SourceParams, index: int) -> list[Entry]:
    """Every candidate item of one source (paths absolute), in a stable order."""
    controls = _control_index(Path(source.control_directory)) if source.control_directory else None
    if source.image_directory:
        entries = _list_folder(source, index)
    else:
        entries = _list_manifest(source, index)
    if controls is not None:
        for entry in entries:
            if entry.problem is None and not entry.controls:
                entry.controls = match_controls(entry.image.stem, controls)
                if not entry.controls:
                    entry.problem = ("control_missing", f"no {entry.image.stem}.* or {entry.image.stem}_0.* in "
                                                        f"{source.control_directory}")
    if source.mask_directory or source.alpha_mask:
        masks = _control_index(Path(source.mask_directory), "mask_directory")[0] if source.mask_directory else None
        for entry in entries:
            if entry.problem is None:
                entry.mask = entry.image if masks is None else (masks.get(entry.image.stem) or [None])[0]
                if entry.mask is None:
                    entry.problem = ("mask_missing", f"no {entry.image.stem}.* in {source.mask_directory}")
    return entries


def _list_folder(source: SourceParams, index: int) -> list[Entry]:
    folder = Path(source.image_directory)
    if not folder.is_dir():
        raise DatasetError(f"image_directory {folder}: not a folder")
    entries = []
    for p in sorted(folder.iterdir()):
        # Hidden files are skipped: macOS "._name.jpg" resource forks are not images.
        suffix = p.suffix.lower()
        if suffix not in LISTED_EXTENSIONS or p.name.startswith(".") or p.is_dir():
            continue
        entry = Entry(index, p, caption_file=folder / f"{p.stem}{source.caption_extension}")
        if suffix in UNSUPPORTED_IMAGE_EXTENSIONS:
            entry.problem = ("unsupported_format", f"{suffix} files are not read (ingest reads "
                                                   f"{' '.join(sorted(IMAGE_EXTENSIONS))}); convert it to PNG")
        elif not p.exists():
            entry.problem = ("image_missing", "broken link")
        entries.append(entry)
    return entries


def _list_manifest(source: SourceParams, index: int) -> list[Entry]:
    manifest = Path(source.manifest or source.image_jsonl_file)
    root = Path(source.root) if source.root else manifest.parent
    if not root.is_dir():
        raise DatasetError(f"root {root} (for manifest {manifest}): not a folder")
    root = root.resolve()
    entries = []
    for row_number, row in read_manifest_rows(manifest):
        where = f"{manifest.name} row {row_number}"
        image = row.get("image_path")
        entry = Entry(index, Path(str(image or "")), where=where)
        entries.append(entry)
        controls, entry.problem = _row_controls(row, where)
        if entry.problem:
            entry.image = Path()  # named by `where` in the report
            continue
        if not isinstance(image, str) or not image.strip():
            entry.problem = ("image_missing", f"{where}: no image_path")
            continue
        entry.image, entry.problem = _manifest_path(image, manifest.parent, root, "image", where)
        if entry.problem:
            continue
        caption = row.get("caption")
        if caption is not None and not isinstance(caption, str):
            entry.problem = ("caption_missing", f"{where}: caption is {caption!r}, expected text")
            continue
        entry.caption = caption
        if caption is None:
            entry.problem = ("caption_missing", f"{where}: no caption")
            continue
        for value in controls:
            path, problem = _manifest_path(value, manifest.parent, root, "control", where)
            if problem:
                entry.problem = problem
                break
            entry.controls.append(path)
    return entries


def _manifest_path(value: str, folder: Path, root: Path, what: str, where: str) -> tuple[Path, tuple | None]:
    """A manifest path made absolute (relative to the manifest's folder; `..` removed, links kept as named), and
    checked, with every link resolved, to lie inside `root`."""
    reason = "image_missing" if what == "image" else "control_missing"
    try:
        path = Path(os.path.normpath(folder / Path(value).expanduser()))
        real = path.resolve()
    except ValueError as e:  # a NUL byte or a lone surrogate: no file can have this name
        return Path(), (reason, f"{where}: {what} {value!r} is not a possible file name ({e})")
    if not real.is_relative_to(root):
        return path, ("path_outside_root", f"{where}: {what} {value} resolves to {real}, outside the dataset root "
                                           f"{root}; move it inside or set the source's root")
    if not real.is_file():
        return path, (reason, f"{where}: {what} {value} does not exist")
    return path, None


def _row_controls(row: dict[Any, Any], where: str) -> tuple[list[str], tuple[str, str] | None]:
    """(the row's control paths, what makes the row unusable before any file is looked at). The paths:
    `control_path`, then `control_path_0`, `control_path_1`, ... in numeric order, empty values skipped. The
    problems: a CSV row with more fields than the header (an unquoted comma), two columns for one control number,
    a control path that is not text."""
    if None in row:  # csv.DictReader puts the fields past the header under None
        return [], ("bad_row", f"{where}: {len(row) - 1 + len(row[None])} fields, but the header names "
                               f"{len(row) - 1} columns; quote a value that holds a comma (\"a, b\")")
    numbers: dict[int, str] = {}
    for key in row:
        if isinstance(key, str) and re.fullmatch(r"control_path_\d+", key):
            number = int(key.rsplit("_", 1)[1])
            if number in numbers:
                return [], ("bad_row", f"{where}: {numbers[number]} and {key} both give control {number}; keep one")
            numbers[number] = key
    paths = []
    for key in ["control_path", *(numbers[n] for n in sorted(numbers))]:
        value = row.get(key)
        values = value if isinstance(value, list) else [value]
        if not all(v is None or isinstance(v, str) for v in values):
            return [], ("control_missing", f"{where}: {key} is {value!r}, expected a path (text) or a list of "
                                           "paths")
        paths += [v for v in values if v is not None and v.strip()]
    return paths, None


def read_manifest_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(row number from 1, row) for each row of a JSONL, CSV or Parquet manifest that has an `image_path` column."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest {path}: not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            with open_regular(path) as f:
                table = pq.read_table(f)
        except UserFileError as e:
            raise DatasetError(f"manifest {e}") from None
        except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError kinds
            raise DatasetError(f"manifest {path}: not a readable Parquet file ({e})") from None
        columns, rows = table.column_names, table.to_pylist()
    elif suffix in (".jsonl", ".csv"):
        try:
            text = read_limited(path, MAX_MANIFEST_BYTES, "a manifest").decode("utf-8-sig")
        except UserFileError as e:
            raise DatasetError(f"manifest {e}") from None
        except UnicodeDecodeError as e:
            raise DatasetError(f"manifest {path}: not UTF-8 text ({e}); save it as UTF-8") from None
        if suffix == ".csv":
            columns, rows = _parse_csv(text, path)
        else:
            columns, rows = _parse_jsonl(text, path)
    else:
        raise DatasetError(f"manifest {path}: unknown format; expected {', '.join(MANIFEST_EXTENSIONS)}")
    if "image_path" not in columns:
        raise DatasetError(f"manifest {path}: no image_path column (found: {', '.join(map(str, columns)) or 'none'})")
    return list(enumerate(rows, start=1))


def _parse_csv(text: str, path: Path) -> tuple[list[str], list[dict]]:
    # A field may be as long as the file (a long caption is then refused as caption_too_long, with its row).
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted captions may span lines
    try:
        return list(reader.fieldnames or []), list(reader)
    except csv.Error as e:
        raise DatasetError(f"manifest {path}:{reader.line_num}: not valid CSV ({e})") from None


def _parse_jsonl(text: str, path: Path) -> tuple[list[str], list[dict]]:
    rows, columns = [], {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DatasetError(f"manifest {path}:{line_number}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"manifest {path}:{line_number}: expected an object like "
                               f'{{"image_path": ..., "caption": ...}}, got {type(row).__name__}')
        rows.append(row)
        columns.update(dict.fromkeys(row))
    # An empty file has no columns but also no rows; let it through so that it counts as "nothing found".
    return (list(columns) if rows else ["image_path"]), rows


def _control_index(folder: Path, key: str = "control_directory"
                   ) -> tuple[dict[str, list[Path]], dict[str, list[tuple[int, Path]]]]:
    """Images of a control (or mask) folder by exact stem, and numbered ones (`stem_N`) by base stem."""
    if not folder.is_dir():
        raise DatasetError(f"{key} {folder}: not a folder")
    exact: dict[str, list[Path]] = {}
    numbered: dict[str, list[tuple[int, Path]]] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or p.name.startswith(".") or p.is_dir():
            continue
        exact.setdefault(p.stem, []).append(p)
        m = re.fullmatch(r"(.+)_(\d+)", p.stem)
        if m:
            numbered.setdefault(m.group(1), []).append((int(m.group(2)), p))
    return exact, numbered


def match_controls(stem: str, index: tuple[dict[str, list[Path]], dict[str, list[tuple[int, Path]]]]) -> list[Path]:
    """The controls of the image named `stem`: `stem.*` if there is one, else `stem_0.*`, `stem_1.*`, ... in
    numeric order (`stem_0000` too); [] when none match."""
    exact, numbered = index
    if stem in exact:
        return exact[stem][:1]  # sorted, so `stem.jpg` before `stem.png` if both exist
    return [p for _, p in sorted(numbered.get(stem, []))]
