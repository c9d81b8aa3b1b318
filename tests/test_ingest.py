"""Ingest: real files in tmp_path -> data/manifest.parquet + reports/ingest.json; every bad input reported."""
import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flux2 import cli
from flux2.atomic import atomic_path, atomic_write_json
from flux2.dataset import DatasetError, load_musubi_toml
from flux2.ingest import REASONS, IngestError, holdout_split, ingest, read_manifest
from flux2.params import DatasetParams, SourceParams
from tests.badcorpus import bad_corpus_sources, noise, write_bad_corpus

REPO = Path(__file__).resolve().parents[1]


def run_ingest(base: Path, fraction: float = 0.25, min_items: int = 0, **dataset) -> tuple:
    """ingest() with outputs under `base` (a split from `min_items` images on); returns (result, printed summary)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = ingest(DatasetParams(**dataset), fraction, base=base, progress=False, holdout_min_items=min_items)
    return result, out.getvalue()


def write_images(folder: Path, names: list[str], seed: int = 0, size=(96, 64), captions: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        noise(*size, seed + i).save(folder / name)
        if captions:
            (folder / f"{Path(name).stem}.txt").write_text(f"caption of {name}", encoding="utf-8")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    expected = write_bad_corpus(base / "corpus")
    result, printed = run_ingest(base, sources=bad_corpus_sources(base / "corpus"))
    return base, expected, result, printed


def test_bad_corpus_every_bad_item_reported_with_its_reason_and_the_rest_used(corpus):
    base, expected, result, printed = corpus
    got = {Path(r.path).name: r.reason for r in result.rejected}
    got.update({Path(i.image_path).name: None for i in result.items})
    assert got == expected
    assert set(expected.values()) - {None} == set(REASONS)  # the corpus exercises every reason
    assert result.found == len(expected)

    report = json.loads((base / "reports/ingest.json").read_text())
    assert report["found"] == len(expected) and report["used"] == len(result.items)
    for reason in REASONS:
        names = sorted(Path(r["path"]).name for r in report["rejected"][reason])
        assert names == sorted(n for n, why in expected.items() if why == reason)
    assert report["rejected_by_reason"]["unreadable"] == 4
    assert sum(report["buckets"].values()) == len(result.items)

    # The printed summary: counts, each reason with its file names, buckets, what was written.
    assert f"{len(expected)} items found, {len(result.items)} used" in printed
    assert "too_large (1): corpus/images/huge_header.png" in printed
    assert "duplicate (1): corpus/images/good_rgb_copy.png" in printed
    assert "wrote data/manifest.parquet (10 items) and reports/ingest.json" not in printed  # 9 good items
    assert "wrote data/manifest.parquet (9 items) and reports/ingest.json" in printed


def test_bad_corpus_manifest_rows(corpus):
    base, expected, result, _ = corpus
    rows = {Path(r["image_path"]).name: r for r in read_manifest(base / "data/manifest.parquet")}
    assert set(rows) == {n for n, why in expected.items() if why is None}
    # converted modes decode to RGB at their size; EXIF orientation applied (stored 96x64, rotated 90 degrees)
    assert (rows["exif_rotated.jpg"]["width"], rows["exif_rotated.jpg"]["height"]) == (64, 96)
    assert (rows["cmyk.jpg"]["width"], rows["gray16.png"]["width"], rows["palette_alpha.png"]["height"]) == (80, 80, 64)
    assert rows["good_rgb.png"]["caption"] == "a red thing"  # stripped
    assert [Path(c["path"]).name for c in rows["good_photo.jpg"]["controls"]] == ["good_photo_0.png", "good_photo_1.png"]
    assert [Path(c["path"]).name for c in rows["gray.png"]["controls"]] == ["gray_0000.png"]
    assert rows["good_photo.jpg"]["controls"][0]["width"] == 48
    assert rows["m_good.png"]["controls"][0]["path"] == "corpus/manifest/m_good_control.png"
    assert rows["mask_good.png"]["mask"]["path"] == "corpus/masks/mask_good.png"
    assert rows["mask_good.png"]["mask"]["alpha"] is False and rows["good_rgb.png"]["mask"] is None
    for r in rows.values():
        assert r["id"] == r["sha256"][:16] and r["split"] in ("train", "holdout") and r["num_repeats"] == 1
        assert r["bucket_width"] % 16 == 0 and r["bucket_height"] % 16 == 0
        assert (base / r["image_path"]).is_file()  # relative to the project folder
    assert (rows["good_rgb.png"]["bucket_width"], rows["good_rgb.png"]["bucket_height"]) == (80, 48)
    paths = [(r["source"], r["image_path"]) for r in read_manifest(base / "data/manifest.parquet")]
    assert paths == sorted(paths)
    assert not [p for p in (base / "data").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_on_error_fail_stops_at_the_first_bad_item(tmp_path):
    write_bad_corpus(tmp_path / "corpus")
    with pytest.raises(IngestError, match=r"corpus/images/bad_control\.png: control_unreadable: .*on_error"):
        run_ingest(tmp_path, sources=bad_corpus_sources(tmp_path / "corpus"), on_error="fail")
    assert not (tmp_path / "data/manifest.parquet").exists()


def test_nothing_usable_is_an_error_that_says_why(tmp_path):
    images = tmp_path / "images"
    write_images(images, ["a.png"], size=(8, 8))
    (images / "b.png").write_bytes(b"")
    (images / "b.txt").write_text("caption")
    write_images(images, ["c.png"], seed=5, captions=False)
    with pytest.raises(IngestError) as e:
        run_ingest(tmp_path, sources=[SourceParams(image_directory=str(images), resolution=64)])
    message = str(e.value)
    assert "all 3 found were rejected" in message
    for text in ("too_small (1): images/a.png", "unreadable (1): images/b.png", "caption_missing (1): images/c.png",
                 "reports/ingest.json"):
        assert text in message
    assert json.loads((tmp_path / "reports/ingest.json").read_text())["rejected_by_reason"]["too_small"] == 1
    assert not (tmp_path / "data/manifest.parquet").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(IngestError, match="no images found in folder .*empty"):
        run_ingest(tmp_path, sources=[SourceParams(image_directory=str(empty))])


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_manifest_formats_with_several_controls_and_a_root(tmp_path, fmt):
    data = tmp_path / "data_root"
    write_images(data / "imgs", ["a.png", "b.png", "c.png"], captions=False)
    write_images(data / "ctrl", ["a_c0.png", "a_c1.png"], seed=10, size=(32, 48), captions=False)
    rows = [{"image_path": "../imgs/a.png", "caption": " first ", "control_path_0": "../ctrl/a_c0.png",
             "control_path_1": "../ctrl/a_c1.png"},
            {"image_path": "../imgs/b.png", "caption": "second\nline", "control_path_0": "", "control_path_1": ""},
            {"image_path": "../imgs/c.png", "caption": "", "control_path_0": "", "control_path_1": ""}]
    manifest = data / "meta" / f"list.{fmt}"
    manifest.parent.mkdir()
    if fmt == "jsonl":
        manifest.write_text("".join(json.dumps({k: v for k, v in r.items() if v != "" or k == "caption"}) + "\n"
                                    for r in rows), encoding="utf-8")
    elif fmt == "csv":
        with open(manifest, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), manifest)

    result, _ = run_ingest(tmp_path, sources=[SourceParams(manifest=str(manifest), root=str(data), resolution=64)])
    assert [Path(i.image_path).name for i in result.items] == ["a.png", "b.png"]
    a, b = result.items
    assert a.caption == "first" and [Path(c.path).name for c in a.controls] == ["a_c0.png", "a_c1.png"]
    assert (a.controls[0].width, a.controls[0].height) == (32, 48) and b.controls == []
    assert b.caption == "second\nline"  # a quoted CSV field may span lines
    assert [(Path(r.path).name, r.reason) for r in result.rejected] == [("c.png", "caption_empty")]

    # Without `root` the manifest's own folder is the root, and ../imgs escapes it.
    with pytest.raises(IngestError, match="path_outside_root"):
        run_ingest(tmp_path, sources=[SourceParams(manifest=str(manifest), resolution=64)])


def test_manifest_without_image_path_column_names_the_file(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,caption\na.png,x\n")
    with pytest.raises(DatasetError, match=r"m\.csv: no image_path column \(found: path, caption\)"):
        run_ingest(tmp_path, sources=[SourceParams(manifest=str(manifest))])


MUSUBI_TOML = """
[general]
resolution = 64
caption_extension = ".caption"
enable_bucket = true
batch_size = 4

[[datasets]]
image_directory = "set_a"
control_directory = "set_a_controls"
num_repeats = 3
cache_directory = "cache_a"
no_resize_control = true
control_resolution = [48, 48]

[[datasets]]
image_jsonl_file = "set_b/list.jsonl"
resolution = [96, 64]
enable_bucket = false
"""


def write_musubi_dataset(folder: Path) -> Path:
    write_images(folder / "set_a", ["x.png", "y.png"], seed=20, captions=False)
    for name in ("x", "y"):
        (folder / "set_a" / f"{name}.caption").write_text(f"{name} caption")
        write_images(folder / "set_a_controls", [f"{name}_0.png", f"{name}_1.png"], seed=30 + ord(name), size=(32, 32),
                     captions=False)
    write_images(folder / "set_b", ["p.png", "q.png"], seed=40, size=(64, 128), captions=False)
    (folder / "set_b" / "list.jsonl").write_text(
        "".join(json.dumps({"image_path": n, "caption": f"{n} caption"}) + "\n" for n in ("p.png", "q.png")))
    (folder / "dataset.toml").write_text(MUSUBI_TOML)
    return folder / "dataset.toml"


def test_musubi_toml_general_overrides_and_ignored_keys(tmp_path, capsys):
    toml = write_musubi_dataset(tmp_path / "cfg")
    a, b = load_musubi_toml(toml)
    assert capsys.readouterr().out.count("ignoring keys that ingest does not use: cache_directory\n") == 1
    assert (a.resolution, a.enable_bucket, a.num_repeats, a.caption_extension) == (64, True, 3, ".caption")
    assert (b.resolution, b.enable_bucket, b.num_repeats, b.caption_extension) == ([96, 64], False, 1, ".caption")
    # Honoured, not dropped: batch_size (from [general]) and the edit-dataset control sizing.
    assert (a.batch_size, b.batch_size, a.no_resize_control, a.control_resolution) == (4, 4, True, [48, 48])
    assert (b.no_resize_control, b.control_resolution) == (False, None)
    assert Path(a.image_directory) == tmp_path / "cfg" / "set_a"  # relative to the TOML

    result, _ = run_ingest(tmp_path, fraction=0.0, toml="cfg/dataset.toml")
    by_name = {Path(i.image_path).name: i for i in result.items}
    assert set(by_name) == {"x.png", "y.png", "p.png", "q.png"} and not result.rejected
    assert by_name["x.png"].num_repeats == 3 and by_name["x.png"].caption == "x caption"
    assert [Path(c.path).name for c in by_name["y.png"].controls] == ["y_0.png", "y_1.png"]
    # 32x32 controls within the 48x48 maximum keep their size (default: the item's 80x48 bucket).
    assert {(c.bucket_width, c.bucket_height) for c in by_name["y.png"].controls} == {(32, 32)}
    assert by_name["x.png"].batch_size == 4
    assert (by_name["p.png"].bucket_width, by_name["p.png"].bucket_height) == (96, 64)  # enable_bucket false
    assert (by_name["x.png"].bucket_width, by_name["x.png"].bucket_height) == (80, 48)
    assert {i.source for i in result.items} == {0, 1} and all(i.split == "train" for i in result.items)


def test_musubi_toml_mistakes_are_named(tmp_path):
    (tmp_path / "typo.toml").write_text('[[datasets]]\nimage_directory = "a"\nnum_repeat = 2\n')
    with pytest.raises(DatasetError, match=r"\[\[datasets\]\]\[0\]: unknown key 'num_repeat'; did you mean num_repeats"):
        load_musubi_toml(tmp_path / "typo.toml")
    (tmp_path / "video.toml").write_text('[[datasets]]\nvideo_directory = "v"\n')
    with pytest.raises(DatasetError, match="video_directory is a video dataset"):
        load_musubi_toml(tmp_path / "video.toml")
    (tmp_path / "bad.toml").write_text('[[datasets]]\nimage_directory = "a"\nnum_repeats = 0\n')
    with pytest.raises(DatasetError, match=r"\[\[datasets\]\]\[0\]\.num_repeats: must be at least 1"):
        load_musubi_toml(tmp_path / "bad.toml")


def test_holdout_split_is_deterministic_and_has_both_sides():
    import hashlib

    shas = [hashlib.sha256(bytes([i])).hexdigest() for i in range(40)]
    split = holdout_split(shas, 0.25)
    assert split == holdout_split(shas, 0.25)
    assert dict(zip(shas, split)) == dict(zip(shas[::-1], holdout_split(shas[::-1], 0.25)))  # order-free
    assert all((s == "holdout") == (int(h[:8], 16) / 2**32 < 0.25) for h, s in zip(shas, split))
    assert holdout_split(shas, 0.0) == ["train"] * 40
    low = min(shas, key=lambda h: int(h[:8], 16))
    two = [low, max(shas, key=lambda h: int(h[:8], 16))]
    assert holdout_split(two, 1e-9) == ["holdout", "train"]  # at least one holdout...
    assert holdout_split(two, 0.999999) == ["holdout", "train"]  # ...and at least one train
    assert holdout_split(shas[:1], 0.5) in (["train"], ["holdout"])


def test_same_inputs_give_the_same_manifest_anywhere(tmp_path):
    for where in ("one", "two"):
        write_images(tmp_path / where / "images", [f"{i}.png" for i in range(6)])
        run_ingest(tmp_path / where, fraction=0.3, sources=[SourceParams(image_directory="images", resolution=64)])
    rows = [read_manifest(tmp_path / w / "data/manifest.parquet") for w in ("one", "two")]
    assert rows[0] == rows[1]
    assert {r["split"] for r in rows[0]} == {"train", "holdout"}
    assert (tmp_path / "one/data/manifest.parquet").read_bytes() == (tmp_path / "two/data/manifest.parquet").read_bytes()


def test_cli_ingest_with_a_musubi_toml(tmp_path, monkeypatch, capsys):
    write_musubi_dataset(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["ingest", "--dataset_config", "dataset.toml", "--out", "out/m.parquet", "--report",
                     "out/r.json"]) == 0
    assert len(read_manifest(tmp_path / "out/m.parquet")) == 4 and (tmp_path / "out/r.json").is_file()
    assert "wrote out/m.parquet (4 items) and out/r.json" in capsys.readouterr().out
    assert cli.main(["ingest", "--dataset_config", "missing.toml"]) == 2
    assert "missing.toml: dataset config not found" in capsys.readouterr().err


@pytest.mark.slow
def test_stage_entry_point_runs_as_a_subprocess(tmp_path):
    write_images(tmp_path / "images", ["a.png", "b.png", "c.png"])
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "params.yaml").write_text(
        "dataset:\n  sources:\n    - image_directory: images\n      resolution: 64\n"
        "eval:\n  holdout_fraction: 0.3\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "stages.ingest"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "unreadable (1): images/broken.png" in done.stdout
    assert len(read_manifest(tmp_path / "data/manifest.parquet")) == 3
    assert json.loads((tmp_path / "reports/ingest.json").read_text())["used"] == 3

    shutil.rmtree(tmp_path / "images")
    done = subprocess.run([sys.executable, "-m", "stages.ingest"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: image_directory") and "Traceback" not in done.stderr


def test_atomic_writes_leave_the_old_file_on_error(tmp_path):
    target = tmp_path / "sub" / "report.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.suffix == ".json"
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]
