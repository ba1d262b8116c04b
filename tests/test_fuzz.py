"""Property tests and bounded fuzzing of every reader.

1. `verify` detects any change to a LoRA-Mini file: every byte of the tensor data, flipped,
   gives an IntegrityError; a changed seed fails its fingerprint (or, unsigned, the metadata
   checksum); any single-byte change anywhere either fails or leaves the adapter identical.
2. Fuzzing (hypothesis, a few seconds in all): safetensors headers, every adapter format's
   reader, PEFT configs and the LoRA-Mini container, on random and mutated inputs. Only
   BadInputError (and its subclasses) may escape; nothing may hang.
   Longer runs: fuzz/run.sh SECONDS (atheris), see fuzz/README.md.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_convert as lc
from helpers.bad_fixtures import mbf
from lora_convert import container, formats
from lora_convert.convert import reconstruct
from lora_convert.errors import BadInputError, IntegrityError
from lora_convert.st import LazyTensors, read_header

ROOT = Path(__file__).resolve().parents[1]
VALID = ROOT / "fixtures" / "bad" / "_valid"
FORMATS = ROOT / "fixtures" / "formats"
MINIS = {"random": VALID / "mini_random.safetensors", "svd": VALID / "mini_svd.safetensors"}
SLOW_EXAMPLE_S = 10.0  # no single input may take longer than this (a hang guard)

# LORA_CONVERT_FUZZ_EXAMPLES=5000 runs longer, with random examples (fuzz/run.sh does).
_EXAMPLES = int(os.environ.get("LORA_CONVERT_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_EXAMPLES or 100, deadline=None, derandomize=not _EXAMPLES, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- helpers

def data_start(blob: bytes) -> int:
    return 8 + struct.unpack("<Q", blob[:8])[0]


def load_all(path: Path):
    """Load a LoRA-Mini file completely: every module (outers regenerated, checksums checked)."""
    mini = container.load(path)
    mods = {m.name: m for m in mini.modules()}
    return mini, mods


def same_modules(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for name in a:
        x, y = a[name], b[name]
        if x.spec() != y.spec() or any(not torch.equal(getattr(x, r), getattr(y, r)) or getattr(x, r).dtype != getattr(y, r).dtype
                                       for r in ("U", "V", "X", "Y")):
            return False
    return True


def exercise(fn, *args):
    """Run a reader; only BadInputError may escape, and it must be quick."""
    t0 = time.monotonic()
    try:
        fn(*args)
    except BadInputError as exc:
        assert str(exc) and "\n" not in str(exc), repr(exc)
    assert time.monotonic() - t0 < SLOW_EXAMPLE_S, "reader too slow (a hang?)"


def read_adapter_fully(path: Path, fmt: str | None = None):
    adapter = formats.read(path, fmt)
    for m in adapter.modules():
        assert m.down.dim() == 2 and m.up.dim() == 2 and m.up.shape[1] == m.down.shape[0]
        assert torch.isfinite(m.down).all() and torch.isfinite(m.up).all()
    for _ in adapter.passthrough():
        pass


def load_mini_fully(path: Path):
    mini, mods = load_all(path)
    for m in reconstruct(mini).modules():
        assert m.down.shape[0] == mods[m.name].rank


# ================================================================ verify detects any change

@pytest.mark.parametrize("outer", sorted(MINIS))
def test_flipping_any_data_byte_is_an_integrity_error(outer, tmp_path):
    """Exhaustive: every byte of the data section, XOR 0xFF, makes loading fail with IntegrityError."""
    blob = MINIS[outer].read_bytes()
    start = data_start(blob)
    f = tmp_path / "m.safetensors"
    for pos in range(start, len(blob)):
        bad = bytearray(blob)
        bad[pos] ^= 0xFF
        f.write_bytes(bytes(bad))
        with pytest.raises(IntegrityError, match="SHA-256 checksum"):
            load_all(f)


@pytest.fixture(scope="module")
def llama_mini(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("mini") / "m.safetensors"
    lc.save(lc.compress(lc.load_adapter(ROOT / "fixtures" / "peft-tiny-llama"), "random", seed=5, outer_dim=16, rank=4),
            out)
    return out.read_bytes()


@FUZZ
@given(where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_any_flipped_data_byte_fails_verify(llama_mini, tmp_path_factory, where, mask):
    """Property over byte positions in the data section of a 14-module file."""
    start = data_start(llama_mini)
    pos = start + int(where * (len(llama_mini) - start))
    bad = bytearray(llama_mini)
    bad[pos] ^= mask
    f = tmp_path_factory.mktemp("flip") / "m.safetensors"
    f.write_bytes(bytes(bad))
    with pytest.raises(IntegrityError):
        lc.verify(f)


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(outer=st.sampled_from(sorted(MINIS)), where=st.floats(0, 1, exclude_max=True), value=st.integers(0, 255))
def test_any_single_byte_change_fails_or_changes_nothing(tmp_path_factory, outer, where, value):
    """Anywhere in the file (header included): a changed byte is an error, or the file still
    means exactly the same adapter (e.g. a JSON space turned into a tab)."""
    blob = MINIS[outer].read_bytes()
    pos = int(where * len(blob))
    if blob[pos] == value:
        return
    bad = bytearray(blob)
    bad[pos] = value
    f = tmp_path_factory.mktemp("byte") / "m.safetensors"
    f.write_bytes(bytes(bad))
    try:
        _, mods = load_all(f)
    except BadInputError:
        return
    _, orig = load_all(MINIS[outer])
    assert same_modules(mods, orig), f"byte {pos} -> {value} silently changed the adapter"


@pytest.mark.parametrize("seed", [0, 6, 8, -7, 2**63])
def test_changed_seed_fails_the_fingerprint(seed, tmp_path, cli):
    blob = MINIS["random"].read_bytes()

    def edit(doc, header, meta):
        for spec in doc["modules"].values():
            spec["outer"]["seed"] = seed

    resigned, unsigned = tmp_path / "resigned.safetensors", tmp_path / "unsigned.safetensors"
    resigned.write_bytes(mbf.edit_mini(blob, edit, resign=True))
    unsigned.write_bytes(mbf.edit_mini(blob, edit, resign=False))
    with pytest.raises(IntegrityError, match="fingerprint"):
        load_all(resigned)
    with pytest.raises(IntegrityError, match="lora_mini_sha256 checksum"):
        load_all(unsigned)
    res = cli("verify", resigned)
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "fingerprint" in res.stderr


# ================================================================ fuzzing: mutations

def json_values():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.sampled_from([0, -1, 1, 2, 2**31, 2**40, 2**63, 2**64 + 1]),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                        st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "random", "svd",
                                         "conv", "linear", "embedding", "q_proj", "(a*)*b", "["]))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=8)


@st.composite
def byte_edits(draw, size: int, header_end: int):
    """A few edits, biased to the header: set bytes, truncate, insert junk."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "set", "set", "trunc", "insert"]))
        in_header = draw(st.booleans())
        pos = draw(st.integers(0, max(0, (header_end if in_header else size) - 1)))
        if kind == "set":
            edits.append(("set", pos, draw(st.integers(0, 255))))
        elif kind == "trunc":
            edits.append(("trunc", pos, None))
        else:
            edits.append(("insert", pos, draw(st.binary(min_size=1, max_size=16))))
    return edits


def apply_edits(blob: bytes, edits) -> bytes:
    b = bytearray(blob)
    for kind, pos, arg in edits:
        pos = min(pos, len(b))
        if kind == "set" and pos < len(b):
            b[pos] = arg
        elif kind == "trunc":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = arg
    return bytes(b)


def mutate_json(obj, path_choice: list[int], value):
    """Replace (or add) the value at a pseudo-random path of a JSON document."""
    node = obj
    for i, c in enumerate(path_choice):
        if isinstance(node, dict) and node:
            keys = sorted(node, key=str)
            key = keys[c % len(keys)]
            if i == len(path_choice) - 1 or not isinstance(node[key], (dict, list)) or not node[key]:
                node[key] = value
                return obj
            node = node[key]
        elif isinstance(node, list) and node:
            idx = c % len(node)
            if i == len(path_choice) - 1 or not isinstance(node[idx], (dict, list)) or not node[idx]:
                node[idx] = value
                return obj
            node = node[idx]
        else:
            break
    if isinstance(node, dict):
        node[f"k{len(node)}"] = value
    return obj


def safetensors_seeds() -> list[Path]:
    return sorted([*VALID.rglob("*.safetensors"), *FORMATS.rglob("*.safetensors"),
                   *(ROOT / "fixtures").glob("peft-tiny-llama*/adapter_model.safetensors")],
                  key=lambda p: (p.stat().st_size, str(p)))[:24]


ST_SEEDS = safetensors_seeds()


@FUZZ
@given(data=st.binary(max_size=256))
def test_read_header_random_bytes(tmp_path_factory, data):
    f = tmp_path_factory.mktemp("st") / "x.safetensors"
    f.write_bytes(data)
    exercise(read_header, f)


def read_all_tensors(path: Path):
    lazy = LazyTensors(path)
    for key in lazy.keys():
        lazy.get(key)


@FUZZ
@given(seed=st.sampled_from(ST_SEEDS), data=st.data())
def test_safetensors_mutated(tmp_path_factory, seed, data):
    """Byte edits of real files; read_header then every tensor through LazyTensors."""
    blob = seed.read_bytes()
    edits = data.draw(byte_edits(len(blob), data_start(blob)))
    f = tmp_path_factory.mktemp("st") / "x.safetensors"
    f.write_bytes(apply_edits(blob, edits))
    exercise(read_all_tensors, f)


@FUZZ
@given(seed=st.sampled_from(ST_SEEDS), where=st.lists(st.integers(0, 2**16), min_size=1, max_size=4),
       value=json_values())
def test_safetensors_header_structure(tmp_path_factory, seed, where, value):
    """Structured header edits: any field of any entry replaced by arbitrary JSON."""
    header, data = mbf.st_split(seed.read_bytes())
    f = tmp_path_factory.mktemp("st") / "x.safetensors"
    f.write_bytes(mbf.st_bytes(json.dumps(mutate_json(header, where, value)).encode(), data))
    exercise(read_all_tensors, f)


def adapter_seeds() -> list[tuple[Path, str]]:
    """(input, the file to mutate inside it) for every adapter fixture of every format."""
    seeds = []
    for p in sorted([*(ROOT / "fixtures").glob("peft-tiny-llama*"), *FORMATS.iterdir(), *VALID.iterdir()]):
        if p.name.startswith("bad-") or p.name.startswith("mini_") or p.name == "peft-pickle":
            continue
        if p.is_dir():
            sts = sorted(p.rglob("*.safetensors"))
            if not sts:
                continue
            for target in sts + sorted(p.rglob("*.json")):
                seeds.append((p, str(target.relative_to(p))))
        elif p.suffix == ".safetensors":
            seeds.append((p, ""))
    return seeds


ADAPTER_SEEDS = adapter_seeds()


def copy_seed(seed: Path, tmp: Path) -> Path:
    dest = tmp / seed.name
    (shutil.copytree if seed.is_dir() else shutil.copy)(seed, dest)
    return dest


@FUZZ
@given(seed=st.sampled_from(ADAPTER_SEEDS), data=st.data())
def test_adapter_readers_mutated(tmp_path_factory, seed, data):
    """Every format (detected, as the CLI does): byte edits of the tensors file or the config."""
    path, rel = seed
    dest = copy_seed(path, tmp_path_factory.mktemp("ad"))
    target = dest / rel if rel else dest
    blob = target.read_bytes()
    header_end = data_start(blob) if target.suffix == ".safetensors" and len(blob) >= 8 else len(blob)
    target.write_bytes(apply_edits(blob, data.draw(byte_edits(len(blob), min(header_end, len(blob))))))
    exercise(read_adapter_fully, dest)


@FUZZ
@given(seed=st.sampled_from(ADAPTER_SEEDS), where=st.lists(st.integers(0, 2**16), min_size=1, max_size=4),
       value=json_values())
def test_adapter_readers_structured(tmp_path_factory, seed, where, value):
    """Every format: a config field or a header field replaced by arbitrary JSON."""
    path, rel = seed
    dest = copy_seed(path, tmp_path_factory.mktemp("ad"))
    target = dest / rel if rel else dest
    if target.suffix == ".json":
        target.write_text(json.dumps(mutate_json(json.loads(target.read_text()), where, value)))
    else:
        header, data = mbf.st_split(target.read_bytes())
        target.write_bytes(mbf.st_bytes(json.dumps(mutate_json(header, where, value)).encode(), data))
    exercise(read_adapter_fully, dest)


@FUZZ
@given(outer=st.sampled_from(sorted(MINIS)), where=st.lists(st.integers(0, 2**16), min_size=1, max_size=5),
       value=json_values(), resign=st.booleans())
def test_container_structured_spec(tmp_path_factory, outer, where, value, resign):
    """The lora_mini document with any field replaced by arbitrary JSON, re-signed (so the spec
    checks, not the checksum, are what is exercised) or not; then load, verify, reconstruct."""
    def edit(doc, header, meta):
        mutate_json(doc, where, value)

    f = tmp_path_factory.mktemp("mini") / "m.safetensors"
    try:
        f.write_bytes(mbf.edit_mini(MINIS[outer].read_bytes(), edit, resign=resign))
    except ValueError:  # NaN etc. in the mutated document: json.dumps(allow_nan) is fine, skip odd cases
        return
    exercise(load_mini_fully, f)


@FUZZ
@given(outer=st.sampled_from(sorted(MINIS)), data=st.data())
def test_container_mutated_bytes(tmp_path_factory, outer, data):
    blob = MINIS[outer].read_bytes()
    f = tmp_path_factory.mktemp("mini") / "m.safetensors"
    f.write_bytes(apply_edits(blob, data.draw(byte_edits(len(blob), data_start(blob)))))
    exercise(load_mini_fully, f)


# ================================================================ regressions found by fuzzing

def test_header_dtype_of_any_json_type(tmp_path):
    """Found by test_safetensors_header_structure: a list as dtype raised TypeError (unhashable)."""
    for dtype in ([], {}, 1.5, None, ["F32"]):
        f = tmp_path / "x.safetensors"
        f.write_bytes(mbf.st_bytes({"a": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4))
        with pytest.raises(BadInputError, match="unknown dtype"):
            read_header(f)


def test_float8_factors_round_trip(tmp_path, cli):
    """Found while fuzzing dtypes: F8_E4M3/F8_E5M2 factors crashed require_finite (no isfinite for
    float8) and could not be written back; now they compress, verify and reconstruct."""
    src = tmp_path / "f8"
    mbf.write_peft(src, {k: v.to(torch.float8_e4m3fn if "lora_A" in k else torch.float8_e5m2)
                         for k, v in mbf.base_tensors().items()})
    for args in (["compress", str(src), "-o", str(tmp_path / "m")], ["verify", str(tmp_path / "m")],
                 ["reconstruct", str(tmp_path / "m"), "-o", str(tmp_path / "back")], ["inspect", str(tmp_path / "back")]):
        res = cli(*args)
        assert res.exit_code == 0, (args, res.output)
    bad = dict(mbf.base_tensors())
    key = next(iter(bad))
    bad[key] = bad[key].to(torch.float8_e4m3fn)
    bad[key].view(torch.uint8)[0, 0] = 0x7F  # NaN in e4m3fn
    mbf.write_peft(tmp_path / "f8nan", bad)
    res = cli("inspect", tmp_path / "f8nan")
    assert res.exit_code == 2 and "NaN or Inf" in res.stderr
