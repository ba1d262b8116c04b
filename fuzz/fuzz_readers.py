"""Fuzz targets for every reader of untrusted input.

    python fuzz/fuzz_readers.py TARGET [libFuzzer flags] CORPUS_DIR [SEED_DIR]   # atheris
    python fuzz/fuzz_readers.py --seeds DIR                                      # write seed corpora
    python fuzz/fuzz_readers.py --plain TARGET SECONDS SEED_DIR                   # no atheris
    python fuzz/fuzz_readers.py --repro TARGET FILE                               # rerun one input

fuzz/run.sh SECONDS runs them all. Targets (the input is one file's bytes):

  st         a safetensors file: read_header, then every tensor through LazyTensors
  adapter    byte 0 picks a slot (a fixture of some format and one file in it: tensors, config,
             or a torch pickle), the rest replaces that file; the adapter is read with format
             detection (and --allow-pickle), every module loaded, compressed, written as PEFT
  container  a LoRA-Mini file: load, every module (outers regenerated, checksums), reconstruct,
             write as PEFT
  spec       the `lora_mini` metadata document of a valid LoRA-Mini file, re-signed so that the
             checksum passes and the spec validation and outer generation are what is fuzzed

The contract: only lora_convert.errors.BadInputError (and subclasses) may escape; anything
else is a crash. A hang or runaway memory is caught by the watchdogs (-rss_limit_mb, atheris'
-timeout, and a faulthandler per-input limit, FUZZ_PER_INPUT_S, that kills the process; the
input is then in ARTIFACT_DIR/last-input-*). Under atheris its SIGALRM timer is running, so
PEFT's own regex time limit stands aside and a catastrophic pattern shows up as a timeout.
"""
from __future__ import annotations

import atexit
import faulthandler
import hashlib
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PER_INPUT_S = float(os.environ.get("FUZZ_PER_INPUT_S", "60"))

try:
    import atheris
except ImportError:  # the --plain engine needs nothing
    atheris = None

if atheris is not None and not {"--plain", "--seeds", "--repro"} & set(sys.argv):
    with atheris.instrument_imports(include=["lora_convert"]):
        import lora_convert  # noqa: F401
        from lora_convert import container, formats
        from lora_convert.convert import compress_module, reconstruct
        from lora_convert.errors import BadInputError
        from lora_convert.st import LazyTensors
else:
    from lora_convert import container, formats
    from lora_convert.convert import compress_module, reconstruct
    from lora_convert.errors import BadInputError
    from lora_convert.st import LazyTensors

WORK = Path(tempfile.mkdtemp(prefix="lc-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
atexit.register(shutil.rmtree, WORK, ignore_errors=True)
ARTIFACTS = Path(os.environ.get("FUZZ_ARTIFACTS", ROOT / "fuzz" / "artifacts"))

# ---------------------------------------------------------------- adapter slots

FIX = ROOT / "fixtures"
_SLOT_SOURCES = [
    (FIX / "bad" / "_valid" / "peft", "adapter_model.safetensors"),
    (FIX / "bad" / "_valid" / "peft", "adapter_config.json"),
    (FIX / "peft-tiny-llama-patterns", "adapter_config.json"),
    (FIX / "formats" / "peft-conv-emb", "adapter_model.safetensors"),
    (FIX / "formats" / "kohya-locon.safetensors", ""),
    (FIX / "formats" / "kohya-flux.safetensors", ""),
    (FIX / "formats" / "lycoris-loha.safetensors", ""),
    (FIX / "formats" / "lycoris-lokr.safetensors", ""),
    (FIX / "formats" / "diffusers-sd15", "pytorch_lora_weights.safetensors"),
    (FIX / "formats" / "mlx-tiny-llama", "adapters.safetensors"),
    (FIX / "formats" / "mlx-tiny-llama", "adapter_config.json"),
    (FIX / "bad" / "_valid" / "kohya", "adapter.safetensors"),
    (FIX / "bad" / "_valid" / "diffusers", "adapter.safetensors"),
    (FIX / "bad" / "_valid" / "peft-pickle", "adapter_model.bin"),  # read with --allow-pickle
]
SLOTS = [(src, rel) for src, rel in _SLOT_SOURCES if (src / rel if rel else src).exists()]


def _slot_path(i: int) -> tuple[Path, Path]:
    """(input path, file to overwrite) of slot i inside WORK, restored from the fixture."""
    src, rel = SLOTS[i]
    dest = WORK / f"slot{i}" / src.name
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest)
    else:  # undo the previous input's overwrite
        for f in ([src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]):
            target = dest if src.is_file() else dest / f.relative_to(src)
            target.write_bytes(f.read_bytes())
    return dest, (dest / rel if rel else dest)


# ---------------------------------------------------------------- targets

def _write(name: str, data: bytes) -> Path:
    p = WORK / name
    p.write_bytes(data)
    return p


def _clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def target_st(data: bytes) -> None:
    lazy = LazyTensors(_write("x.safetensors", data))
    for key in lazy.keys():
        lazy.get(key)


def target_adapter(data: bytes) -> None:
    if not data:
        return
    path, target = _slot_path(data[0] % len(SLOTS))
    target.write_bytes(data[1:])
    adapter = formats.read(path, allow_pickle=True)
    for m in adapter.modules():
        compress_module(m, "random", seed=1, outer_dim=4, rank=min(2, m.rank))
    out = WORK / "out-adapter"
    _clear(out)
    formats.write(adapter, out, "peft")


def _load_mini(path: Path) -> None:
    mini = container.load(path)
    for _ in mini.modules():
        pass
    out = WORK / "out-mini"
    _clear(out)
    formats.write(reconstruct(mini), out, "peft")


def target_container(data: bytes) -> None:
    _load_mini(_write("m.safetensors", data))


_SPEC_BASE = {}


def target_spec(data: bytes) -> None:
    """data: the lora_mini document (any bytes); byte 0 picks the random or svd base file."""
    if not data:
        return
    base = (FIX / "bad" / "_valid" / ("mini_random.safetensors" if data[0] % 2 == 0 else "mini_svd.safetensors"))
    if base not in _SPEC_BASE:
        blob = base.read_bytes()
        n = struct.unpack("<Q", blob[:8])[0]
        _SPEC_BASE[base] = (json.loads(blob[8:8 + n]), blob[8 + n:])
    header, payload = _SPEC_BASE[base]
    header = json.loads(json.dumps(header))
    meta = header.pop("__metadata__")
    meta["lora_mini"] = data[1:].decode("utf-8", "replace")
    layout = {k: (v["dtype"], v["shape"]) for k, v in header.items()}
    meta[container.METADATA_SHA256] = container.metadata_digest(meta, layout)
    raw = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    _load_mini(_write("spec.safetensors", struct.pack("<Q", len(raw)) + raw + payload))


TARGETS = {"st": target_st, "adapter": target_adapter, "container": target_container, "spec": target_spec}


# Known, already reported bugs to step over so a run can find new ones: "ExceptionName@file.py"
# entries (comma-separated) match an exception of that type raised through that source file.
KNOWN = [k.split("@") for k in os.environ.get("FUZZ_KNOWN", "").split(",") if "@" in k]


def _is_known(exc: BaseException) -> bool:
    files = {Path(f.filename).name for f in traceback.extract_tb(exc.__traceback__)}
    return any(type(exc).__name__ == name and where in files for name, where in KNOWN)


def guarded(fn):
    """Only BadInputError may escape; anything else is saved to ARTIFACTS and re-raised, a slow
    input is saved (last-input-*) and the process killed by the watchdog."""
    last = ARTIFACTS / f"last-input-{fn.__name__}"

    def run(data: bytes) -> None:
        last.write_bytes(data)
        faulthandler.dump_traceback_later(PER_INPUT_S, exit=True)
        try:
            fn(data)
        except BadInputError as exc:
            msg = str(exc)
            if "\n" in msg or not msg:
                raise AssertionError(f"error message is not one line: {msg!r}") from None
        except BaseException as exc:
            kind = "known" if _is_known(exc) else "crash"
            name = f"{kind}-{fn.__name__.removeprefix('target_')}-{hashlib.sha1(data).hexdigest()[:12]}"
            (ARTIFACTS / name).write_bytes(data)
            if kind == "crash":
                print(f"saved {ARTIFACTS / name}", file=sys.stderr)
                raise
        finally:
            faulthandler.cancel_dump_traceback_later()
    return run


# ---------------------------------------------------------------- seeds

def write_seeds(out: Path) -> None:
    sts = sorted([*(FIX / "bad" / "_valid").rglob("*.safetensors"), *(FIX / "formats").rglob("*.safetensors"),
                  *(FIX / "bad").glob("st_*/adapter_model.safetensors")], key=lambda p: p.stat().st_size)
    for t in TARGETS:
        (out / t).mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(sts[:40]):
        (out / "st" / f"{i:03d}").write_bytes(p.read_bytes())
    for i, (src, rel) in enumerate(SLOTS):
        f = src / rel if rel else src
        (out / "adapter" / f"slot{i:02d}").write_bytes(bytes([i]) + f.read_bytes())
    for i, p in enumerate(sorted((FIX / "bad").glob("mini_*.safetensors")) + sorted((FIX / "bad" / "_valid").glob("mini_*"))):
        (out / "container" / f"{i:03d}").write_bytes(p.read_bytes())
    for i, name in enumerate(["mini_random.safetensors", "mini_svd.safetensors"]):
        blob = (FIX / "bad" / "_valid" / name).read_bytes()
        n = struct.unpack("<Q", blob[:8])[0]
        doc = json.loads(blob[8:8 + n])["__metadata__"]["lora_mini"]
        (out / "spec" / f"{i:03d}").write_bytes(bytes([i]) + doc.encode())


# ---------------------------------------------------------------- plain engine (no atheris)

def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[min(pos, len(b) - 1)] = rng.choice([0, 0xFF, 0x7F, 0x80, ord("-"), ord("9"), ord("["), ord('"')])
        elif op == 2:
            del b[pos:pos + rng.randint(1, 32)]
        elif op == 3:
            b[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 4:
            del b[pos:]
        elif op == 5 and pool:
            other = rng.choice(pool)
            s = rng.randrange(len(other) + 1)
            b[pos:pos] = other[s:s + rng.randint(1, 64)]
        elif op == 6:  # a number in the JSON replaced by a hostile one
            text = bytes(b)
            digits = [i for i in range(min(len(text), 4096)) if 48 <= text[i] <= 57]
            if digits:
                i = rng.choice(digits)
                j = i
                while j < len(text) and 48 <= text[j] <= 57:
                    j += 1
                b[i:j] = str(rng.choice([0, 1, 2**31, 2**40, 2**63, 2**64, 10**30])).encode()
    return bytes(b)


def plain(target: str, seconds: float, seed_dir: Path) -> int:
    fn = guarded(TARGETS[target])
    pool = [p.read_bytes() for p in sorted(seed_dir.iterdir())] or [b""]
    rng = random.Random(int(time.time()))
    end, runs, crashes = time.monotonic() + seconds, 0, 0
    while time.monotonic() < end:
        data = mutate(rng, rng.choice(pool), pool)
        runs += 1
        try:
            fn(data)
        except Exception:  # noqa: BLE001 - a finding (guarded saved the input)
            crashes += 1
            print(f"CRASH {target}\n{traceback.format_exc()}", file=sys.stderr)
    print(f"{target}: {runs} inputs in {seconds:.0f} s, {crashes} crashes")
    return 1 if crashes else 0


def main() -> int:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    if sys.argv[1:2] == ["--seeds"]:
        write_seeds(Path(sys.argv[2]))
        return 0
    if sys.argv[1:2] == ["--plain"]:
        return plain(sys.argv[2], float(sys.argv[3]), Path(sys.argv[4]))
    if sys.argv[1:2] == ["--repro"]:
        try:
            TARGETS[sys.argv[2]](Path(sys.argv[3]).read_bytes())
        except BadInputError as exc:
            print(f"OK (BadInputError): {exc}")
            return 0
        print("OK (accepted)")
        return 0
    target = sys.argv[1]
    if atheris is None:
        print("atheris is not installed: use --plain", file=sys.stderr)
        return 2
    atheris.Setup([sys.argv[0], *sys.argv[2:]], guarded(TARGETS[target]))
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
