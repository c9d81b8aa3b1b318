"""Garbage in: the parsers of user files, fuzzed with hypothesis (bounded, derandomized).

Every target gets random or lying input and may only answer with a result or with one of our clear errors: a
ValueError subclass whose message names the file. No other exception, no hang (per-example deadline), and no
allocation sized by an unchecked number (memory checked around the lying-header cases).
"""
from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from flux2.params import ParamsError, load_params, parse_params
from flux2.prompts import parse_prompt_line, read_prompt_file
from flux2.safetensors_io import DTYPES, load_file, read_header
from tests.reliability.helpers import assert_clear_error, bounded_memory


def fuzz(examples: int, deadline_ms: int = 2000):
    """Bounded and deterministic: a fixed number of examples from a fixed seed, each under a deadline."""
    return settings(max_examples=examples, deadline=deadline_ms, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def expect_clear(call, *names):
    """Run call(); a ValueError naming one of `names` is fine, any other exception fails the test."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - the point is to see what escapes
        assert_clear_error(e, *names)
        return None


# A value of any YAML-ish kind, nested a little: what a user (or a broken editor) can put in a YAML file.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["tiny", "auto", "cpu", "bf16", "no", "constant", "",
                                                           "..", "/etc/passwd", "1e999", "ds"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8) | st.integers(), inner, max_size=3), max_leaves=8)


def _fields(group: str) -> list[str]:
    import dataclasses

    from flux2 import params as P

    cls = {"model": P.ModelParams, "dataset": P.DatasetParams, "cache": P.CacheParams, "train": P.TrainParams,
           "eval": P.EvalParams, "tracking": P.TrackingParams}[group]
    return [f.name for f in dataclasses.fields(cls)]


GROUPS = ["model", "dataset", "cache", "train", "eval", "tracking"]


@st.composite
def params_data(draw):
    """A params mapping: mostly real groups and keys with random values, sometimes a real source list."""
    data = {}
    for group in draw(st.lists(st.sampled_from(GROUPS + ["modle", "x"]), max_size=4, unique=True)):
        if group not in GROUPS:
            data[group] = draw(values)
            continue
        keys = draw(st.lists(st.sampled_from(_fields(group) + ["lerning_rate", "sources"]), max_size=4,
                             unique=True))
        data[group] = {k: draw(values) for k in keys}
        if group == "dataset" and draw(st.booleans()):
            data[group]["sources"] = [{"image_directory": draw(st.text(max_size=5)),
                                       draw(st.sampled_from(["resolution", "num_repeats", "root", "manifest"])):
                                           draw(values)}]
    return data


@fuzz(300)
@given(params_data())
def test_parse_params_answers_with_params_or_a_params_error(data):
    result = expect_clear(lambda: parse_params(data, "fuzz/params.yaml"), "fuzz/params.yaml")
    if result is None:
        with pytest.raises(ParamsError):
            parse_params(data, "fuzz/params.yaml")


@fuzz(150)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                 params_data().map(lambda d: json.dumps(d, default=str).encode()),
                 st.sampled_from([b"a: &a [1, 2]\nb: [*a, *a]\n", b"train: {learning_rate: .nan}\n", b"- 1\n- 2\n",
                                  b"\xff\xfe\x00", b"model: !!python/object/apply:os.system ['true']\n",
                                  b"{" * 200, b"train:\n  max_train_steps: 1e999\n"])))
def test_load_params_answers_with_params_or_an_error_naming_the_file(raw):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "params.yaml"
        path.write_bytes(raw)
        expect_clear(lambda: load_params(path, check_paths=False), path)


# ------------------------------------------------------------------------------------------------ prompt files

prompt_text = st.text(alphabet=st.sampled_from(list("ab -–—wshdgnlcifx0123456789.e+#\t\u00a0\u3000\U0001f600")),
                      max_size=60)
flags = st.sampled_from(["--w", "--h", "--s", "--d", "--g", "--l", "--n", "--ci", "--fs", "--x", "--", "-w"])
flag_values = st.one_of(st.integers(-10**30, 10**30).map(str), st.floats().map(str), st.text(max_size=8),
                        st.sampled_from(["", "nan", "inf", "-inf", "1e999", "0x10", "1_024", "٣٢", "../../x.png"]))


@st.composite
def prompt_lines(draw):
    parts = [draw(prompt_text)]
    for _ in range(draw(st.integers(0, 4))):
        parts += [draw(flags), draw(flag_values)]
    return " ".join(parts)


@fuzz(400)
@given(prompt_lines())
def test_prompt_line_answers_with_a_prompt_or_a_prompt_file_error(line):
    result = expect_clear(lambda: parse_prompt_line(line, "fuzz.txt:1"), "fuzz.txt:1")
    if result is not None:
        assert result.prompt and all(math.isfinite(v) for v in (result.guidance, result.flow_shift)
                                     if v is not None), result


@fuzz(100)
@given(st.one_of(st.binary(max_size=300), st.lists(prompt_lines(), max_size=5).map(lambda ls: "\n".join(ls).encode())))
def test_prompt_file_answers_with_prompts_or_an_error_naming_the_file(raw):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "prompts.txt"
        path.write_bytes(raw)
        expect_clear(lambda: read_prompt_file(path), path)


# ------------------------------------------------------------------------------------------------ manifests

GOOD = Image.new("RGB", (64, 48), (200, 30, 30))
path_values = st.one_of(
    st.sampled_from(["good.png", "./good.png", "sub/../good.png", "missing.png", "../outside.png", "/etc/passwd",
                     "good.txt", "", " ", "good.png\x00", "~/good.png", "sub", "link.png", "C:\\good.png",
                     "good.png/..", "\u00e9t\u00e9.png"]),
    st.text(max_size=12), st.integers(), st.none(), st.lists(st.text(max_size=4), max_size=2))
caption_values = st.one_of(st.text(max_size=20), st.none(), st.integers(), st.floats(), st.just(""),
                           st.lists(st.text(max_size=3), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                                      st.integers(), max_size=2))


@st.composite
def manifest_rows(draw):
    rows = []
    for _ in range(draw(st.integers(0, 4))):
        row = {"image_path": draw(path_values), "caption": draw(caption_values)} if draw(st.booleans()) else {}
        for key in draw(st.lists(st.sampled_from(["image_path", "caption", "control_path", "control_path_0",
                                                  "control_path_1", "control_path_x", "extra", "control_path_99999"]),
                                 max_size=5, unique=True)):
            row[key] = draw(caption_values if key in ("caption", "extra") else path_values)
        rows.append(row)
    return rows


def _write_manifest(path: Path, rows: list[dict], fmt: str, garbage: bytes | None) -> None:
    import csv
    import io

    if garbage is not None:
        path.write_bytes(garbage)
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8", errors="surrogatepass")
    elif fmt == "csv":
        columns = sorted({k for r in rows for k in r}) or ["image_path"]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: v for k, v in r.items()})
        path.write_bytes(buf.getvalue().encode("utf-8", errors="surrogatepass"))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = sorted({k for r in rows for k in r})
        # One Parquet column holds one type: store each value as JSON text unless all are plain strings.
        table = pa.table({c: [r.get(c) if all(isinstance(x.get(c), (str, type(None))) for x in rows)
                              else json.dumps(r.get(c)) for r in rows] for c in columns})
        pq.write_table(table, path)


@fuzz(120, deadline_ms=5000)
@example([{"image_path": "good.png\x00", "caption": "x"}, {"image_path": "\ud800.png", "caption": "y"},
          {"image_path": "good.png", "caption": "\ud800", "control_path": "a\x00"}], "jsonl", None)
@example([{"image_path": "good.png", "caption": "x", "control_path_0": "good.png\x00"}], "csv", None)
@given(manifest_rows(), st.sampled_from(["jsonl", "csv", "parquet"]),
       st.one_of(st.none(), st.none(), st.binary(max_size=100), st.sampled_from([b"PAR1garbage", b"\xef\xbb\xbf",
                                                                                 b"[1, 2]\n", b"{\"a\": 1}\n"])))
def test_manifest_ingest_answers_with_items_or_an_error_naming_the_file(rows, fmt, garbage):
    from flux2.ingest import ingest
    from flux2.params import DatasetParams, SourceParams

    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "data"
        (root / "sub").mkdir(parents=True)
        GOOD.save(root / "good.png")
        GOOD.save(Path(d) / "outside.png")
        (root / "link.png").symlink_to(Path(d) / "outside.png")
        (root / "good.txt").write_text("a caption")
        manifest = root / f"manifest.{fmt}"
        _write_manifest(manifest, rows, fmt, garbage)
        dataset = DatasetParams(sources=[SourceParams(manifest=str(manifest), resolution=64)], min_side=32,
                                manifest=str(Path(d) / "out" / "manifest.parquet"),
                                report=str(Path(d) / "out" / "ingest.json"))
        # Either the manifest is named, or (nothing usable) the report that lists every file and its reason.
        result = expect_clear(lambda: ingest(dataset, 0.0, base=d, progress=False), manifest.name, "ingest.json")
        if result is not None:
            for item in result.items:  # whatever got in lies inside the root
                assert (Path(d) / item.image_path).resolve().is_relative_to(root.resolve())
                for c in item.controls:
                    assert (Path(d) / c.path).resolve().is_relative_to(root.resolve())


@fuzz(60, deadline_ms=5000)
@given(st.binary(max_size=80), st.sampled_from([".txt", ".caption"]))
def test_caption_files_give_an_item_or_a_reason(raw, extension):
    from flux2.ingest import REASONS, ingest
    from flux2.params import DatasetParams, SourceParams

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "ds"
        folder.mkdir()
        GOOD.save(folder / "a.png")
        (folder / f"a{extension}").write_bytes(raw)
        dataset = DatasetParams(sources=[SourceParams(image_directory=str(folder), resolution=64,
                                                      caption_extension=extension)], min_side=32,
                                manifest=str(Path(d) / "manifest.parquet"), report=str(Path(d) / "ingest.json"))
        result = expect_clear(lambda: ingest(dataset, 0.0, base=d, progress=False), folder, "a.png")
        if result is None:
            report = json.loads((Path(d) / "ingest.json").read_text())
            assert set(report["rejected"]) <= set(REASONS) and report["rejected_count"] == 1
        else:
            assert result.items[0].caption == raw.decode("utf-8-sig").strip()


# ------------------------------------------------------------------------------------------------ safetensors

def raw_file(path: Path, header: bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if header_len is None else header_len) + header + data)
    return path


dtype_names = st.sampled_from(list(DTYPES) + ["F4", "I128", "f32", "", "BOOL ", None, 3])
shapes = st.one_of(st.lists(st.integers(0, 4), max_size=3),
                   st.lists(st.sampled_from([10**12, 2**63, 2**64 + 1, -1, 0, 7]), min_size=1, max_size=4),
                   st.just([1.5]), st.just(["2"]), st.none(), st.just([True]))


@st.composite
def safetensors_bytes(draw):
    """(header bytes, data bytes, declared header length): consistent, slightly wrong, or lying."""
    entries = {}
    data_len = 0
    for i in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from([f"t{i}", "__metadata__", "", "a.weight", "\u00e9", "x" * 300]))
        dtype, shape = draw(dtype_names), draw(shapes)
        size = 0
        if isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape) and dtype in DTYPES:
            size = math.prod(shape) * DTYPES[dtype].itemsize
        begin = data_len
        end = draw(st.sampled_from([begin + size, begin + size, begin + size + 1, begin - 1, 10**15, 2**64]))
        entry = {"dtype": dtype, "shape": shape, "data_offsets": draw(st.sampled_from(
            [[begin, end], [begin, end], [end, begin], [begin], "x", [begin, None]]))}
        if draw(st.integers(0, 9)) == 0:
            entry = draw(st.sampled_from([[], "x", None, {"dtype": "F32"}]))
        entries[name] = entry
        data_len = max(data_len, min(end, 4096)) if isinstance(end, int) and end > 0 else data_len
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.sampled_from([{"a": "b"}, {"a": 1}, [], "x", {"format": "pt"}]))
    header = json.dumps(entries).encode()
    header = draw(st.sampled_from([header, header, header, b" " + header, header + b"   ", header[:-1],
                                   header.replace(b"0", b"NaN", 1), b"[" * 20000 + b"]" * 20000,
                                   b'{"\\ud800": 1}', b"\xff" + header]))
    data = draw(st.sampled_from([b"\0" * data_len, b"\0" * data_len, b"\0" * max(0, data_len - 1),
                                 b"\0" * (data_len + 3), b""]))
    declared = draw(st.sampled_from([None, None, None, 0, 1, 10**12, 2**64 - 1, len(header) + 1]))
    return header, data, declared


@fuzz(400)
@given(safetensors_bytes())
def test_safetensors_reader_answers_with_tensors_or_a_checkpoint_error(case):
    header, data, declared = case
    with tempfile.TemporaryDirectory() as d:
        path = raw_file(Path(d) / "model.safetensors", header, data, declared)
        with bounded_memory(limit_mb=64):
            expect_clear(lambda: read_header(path), path)
            expect_clear(lambda: load_file(path), path)


@pytest.mark.parametrize("shape, dtype", [([10**12], "F32"), ([10**6, 10**6], "BF16"), ([2**40, 2**40, 8], "F64")])
def test_header_claiming_a_huge_tensor_in_a_small_file_is_refused_before_any_allocation(tmp_path, shape, dtype):
    """A 1 KB file whose header claims 10^12 elements (offsets consistent with the claim, or lying about it)."""
    from flux2.loading import check_dit
    from flux2.lora_formats import read_lora

    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    for offsets in ([0, nbytes], [0, 4]):
        header = json.dumps({"lora_unet_img_in.lora_down.weight": {"dtype": dtype, "shape": shape,
                                                                    "data_offsets": offsets}}).encode()
        path = raw_file(tmp_path / "big.safetensors", header, b"\0" * (1024 - 8 - len(header)))
        with bounded_memory(limit_mb=32):
            for call in (read_header, load_file, read_lora, lambda p: check_dit(p, "tiny")):
                with pytest.raises(ValueError, match="big.safetensors"):
                    call(path)


def test_deeply_nested_header_is_a_checkpoint_error(tmp_path):
    for nested in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
        path = raw_file(tmp_path / "nested.safetensors", nested)
        with pytest.raises(ValueError, match="nested.safetensors"):
            read_header(path)


# ------------------------------------------------------------------------------------------------ LoRA files

MODULES = ["double_blocks_0_img_attn_qkv", "single_blocks_1_linear1", "img_in", "final_layer_linear", "nope_0"]
PATHS = ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "img_in", "final_layer.linear"]
DIFFUSERS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "x_embedder", "proj_out",
             "norm_out.linear", "single_transformer_blocks.0.attn.to_qkv_mlp_proj"]


@st.composite
def lora_state_dicts(draw):
    """Plausible LoRA keys in the three layouts (and mixtures), with random dtypes and shapes."""
    layout = draw(st.sampled_from(["kohya", "comfy", "diffusers", "mixed"]))
    sd = {}
    for _ in range(draw(st.integers(0, 4))):
        kind = layout if layout != "mixed" else draw(st.sampled_from(["kohya", "comfy", "diffusers", "junk"]))
        if kind == "kohya":
            base = f"lora_unet_{draw(st.sampled_from(MODULES))}"
            suffixes = [".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_mid.weight", ".hada_w1_a"]
        elif kind == "comfy":
            base = f"diffusion_model.{draw(st.sampled_from(PATHS))}"
            suffixes = [".lora_A.weight", ".lora_B.weight", ".alpha", ".lora_down.weight", ".dora_scale"]
        elif kind == "diffusers":
            base = f"{draw(st.sampled_from(['transformer.', 'base_model.model.']))}{draw(st.sampled_from(DIFFUSERS))}"
            suffixes = [".lora_A.weight", ".lora_B.weight", ".alpha", ".weight"]
        else:
            base, suffixes = draw(st.text(max_size=10)), ["", ".weight", ".lora_te1"]
        fills = st.sampled_from([0.0, 1.0, -1.0, float("nan"), float("inf"), 1e30])
        dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool,
                                  torch.float8_e4m3fn, torch.uint8])
        if kind != "junk" and draw(st.booleans()):  # a consistent down/up pair, so reading gets further
            rank, n_in, n_out = draw(st.sampled_from([0, 1, 2])), draw(st.sampled_from([128, 7])), \
                draw(st.sampled_from([128, 384, 6]))
            down, up = suffixes[0], suffixes[1]
            sd[base + down] = torch.full((rank, n_in), draw(fills)).to(draw(dtypes))
            sd[base + up] = torch.full((n_out, rank), draw(fills)).to(draw(dtypes))
            if draw(st.booleans()):
                shape = draw(st.sampled_from([[], [1], [3], [0], [1, 1]]))
                sd[base + ".alpha"] = torch.full(shape, draw(fills)).to(draw(dtypes))
            continue
        for suffix in draw(st.lists(st.sampled_from(suffixes), min_size=1, max_size=3, unique=True)):
            shape = draw(st.one_of(st.lists(st.integers(0, 6), max_size=3),
                                   st.sampled_from([[2, 128], [128, 2], [384, 2], [2, 192], [2], [], [0, 128]])))
            sd[base + suffix] = torch.full(shape, draw(fills)).to(draw(dtypes))
    metadata = draw(st.one_of(st.none(), st.dictionaries(
        st.sampled_from(["lora_adapter_metadata", "ss_network_dim", "format", "x"]),
        st.one_of(st.text(max_size=6), st.sampled_from([
            '{"r": 2, "lora_alpha": 4}', '{"r": 0, "lora_alpha": "x"}', "[1, 2]", '{"alpha_pattern": {"(": 1}}',
            '{"alpha_pattern": [1]}', '{"lora_alpha": null}', '{"use_rslora": true, "lora_alpha": 1e400}',
            '{"transformer.r": 2}', "{"])), max_size=2)))
    return sd, metadata


DIFFUSERS_PAIR = {"transformer.x_embedder.lora_A.weight": torch.zeros(2, 128),
                  "transformer.x_embedder.lora_B.weight": torch.zeros(128, 2)}


@fuzz(300)
@given(lora_state_dicts())
@example(({"lora_unet_img_in.lora_down.weight": torch.zeros(2, 128), "lora_unet_img_in.lora_up.weight":
           torch.zeros(128, 2), "lora_unet_img_in.alpha": torch.ones(3)}, None))
@example(({"lora_unet_img_in.lora_down.weight": torch.zeros(0, 128), "lora_unet_img_in.lora_up.weight":
           torch.zeros(128, 0)}, None))
@example((DIFFUSERS_PAIR, {"lora_adapter_metadata": "[1, 2]"}))
@example((DIFFUSERS_PAIR, {"lora_adapter_metadata": '{"alpha_pattern": {"(": 1}}'}))
@example((DIFFUSERS_PAIR, {"lora_adapter_metadata": '{"lora_alpha": null}'}))
@example((DIFFUSERS_PAIR, {"lora_adapter_metadata": '{"use_rslora": true, "lora_alpha": 1e400}'}))
def test_lora_reader_answers_with_a_lora_or_an_error_naming_the_file(case):
    from flux2.lora_formats import read_lora

    sd, metadata = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "lora.safetensors"
        save_file(sd, path, metadata=metadata)
        lora = expect_clear(lambda: read_lora(path), path)
        if lora is not None:
            for w in lora.modules.values():  # what is accepted can be used
                assert w.rank >= 1 and math.isfinite(w.scale)


# ------------------------------------------------------------------------------------------------ DiT files

@st.composite
def dit_shape_tables(draw):
    """Headers that look more or less like a DiT: real key names with random shapes and dtypes."""
    from flux2.loading import expected_dit_shapes
    from flux2.variants import VARIANTS

    expected = expected_dit_shapes(VARIANTS["tiny"])
    keys = sorted(expected)
    table = {}
    prefix = draw(st.sampled_from(["", "", "model.diffusion_model.", "diffusion_model."]))
    for key in draw(st.lists(st.sampled_from(keys + ["double_blocks.99.x", "vae.x", "scaled_fp8",
                                                     "a.scale_weight", "double_blocks.1e3.x"]),
                             min_size=1, max_size=12, unique=True)):
        shape = list(expected.get(key, (1,)))
        if draw(st.integers(0, 3)) == 0:
            shape = draw(st.lists(st.sampled_from([0, 1, 3, 10**9]), max_size=3))
        dtype = draw(st.sampled_from(["F32", "BF16", "F8_E4M3", "I8", "BOOL"]))
        table[prefix + key] = (shape, dtype)
    return table


@fuzz(120)
@given(dit_shape_tables())
def test_dit_check_answers_with_info_or_an_error_naming_the_file(table):
    """Header-only files (all tensors zero-sized in the data, or lying): check_dit reads no tensor data."""
    from flux2.loading import check_dit

    with tempfile.TemporaryDirectory() as d:
        entries, offset = {}, 0
        for key, (shape, dtype) in table.items():
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            entries[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        path = raw_file(Path(d) / "dit.safetensors", json.dumps(entries).encode(),
                        b"\0" * offset if offset < 1_000_000 else b"")
        with bounded_memory(limit_mb=64):
            expect_clear(lambda: check_dit(path, "tiny"), path)


# ------------------------------------------------------------------------------------------------ checkpoints

@st.composite
def checkpoint_folders(draw):
    """A step-* folder whose files are random, truncated, or consistent with a state.json that lies."""
    lora = draw(st.sampled_from(["good", "garbage", "missing", "empty"]))
    optimizer = draw(st.sampled_from(["good", "garbage", "missing", "foreign"]))
    state = draw(st.one_of(
        st.sampled_from(["consistent", "consistent", "wrong_sha", "no_sha", "garbage", "list", "missing"]),
        st.builds(lambda f, v: ("field", f, v), st.sampled_from(["step", "epoch", "batch_in_epoch", "rng", "sha256",
                                                                 "extra", "bad_steps", "format_version"]),
                  values)))
    return lora, optimizer, state


@pytest.fixture(scope="module")
def warm_optimizer():
    """One AdamW step and checkpoint before the examples: the first ones in a process import and set up torch's
    optimizer machinery (12 s on a loaded machine), which the per-example deadline is not about."""
    from flux2.checkpoint import TrainState, save_checkpoint

    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones_like(param)
    optimizer.step()
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(Path(d), TrainState(step=1), {"w": param.detach()}, optimizer)


@fuzz(100, deadline_ms=5000)
@given(checkpoint_folders())
def test_checkpoint_loader_skips_or_refuses_bad_checkpoints(warm_optimizer, case):
    """load_latest_checkpoint never crashes on a damaged or lying checkpoint: it falls back to an older one (or
    to None) and says which file was wrong; whatever it returns was really saved."""
    from flux2.atomic import sha256_file
    from flux2.checkpoint import TrainState, load_latest_checkpoint, record_digest, save_checkpoint

    lora_kind, opt_kind, state_kind = case
    param = torch.nn.Parameter(torch.ones(4, 3))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.ones_like(param)
    optimizer.step()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        save_checkpoint(folder, TrainState(step=5, extra={"fingerprint": "f"}), {"w": param.detach()}, optimizer)
        path = save_checkpoint(folder, TrainState(step=10, extra={"fingerprint": "f"}), {"w": param.detach() * 2},
                               optimizer)
        garbage = b"\x00\x01garbage" * 3
        for name, kind in (("lora.safetensors", lora_kind), ("optimizer.safetensors", opt_kind)):
            file = path / name
            if kind == "garbage":
                file.write_bytes(garbage)
            elif kind == "missing":
                file.unlink()
            elif kind == "empty":
                file.write_bytes(b"")
            elif kind == "foreign":
                save_file({"state.x.exp_avg": torch.zeros(2), "nonsense": torch.zeros(1)}, file,
                          metadata={"scalars": "{", "param_groups": "[]"})
        record = json.loads((path / "state.json").read_text())
        if state_kind in ("consistent", "no_sha") or isinstance(state_kind, tuple):
            record["sha256"] = {n: sha256_file(path / n) for n in ("lora.safetensors", "optimizer.safetensors")
                                if (path / n).is_file()}
            if state_kind == "no_sha":
                del record["sha256"]
            if isinstance(state_kind, tuple):
                record[state_kind[1]] = state_kind[2]
            record = json.loads(json.dumps(record, default=str))
            record["record_sha256"] = record_digest(record)  # a consistent lie: only the content can tell
            (path / "state.json").write_text(json.dumps(record))
        elif state_kind == "wrong_sha":
            record["sha256"]["lora.safetensors"] = "0" * 64
            (path / "state.json").write_text(json.dumps(record))
        elif state_kind == "garbage":
            (path / "state.json").write_bytes(garbage)
        elif state_kind == "list":
            (path / "state.json").write_text("[1, 2]")
        else:
            (path / "state.json").unlink()
        fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4, 3))], lr=1e-3)
        loaded = expect_clear(lambda: load_latest_checkpoint(folder, fresh), folder)
        if loaded is not None:
            state, weights = loaded
            assert isinstance(state, TrainState) and state.step in (5, 10) and type(state.step) is int
            assert torch.equal(weights["w"], param.detach() * (2 if state.step == 10 else 1))
