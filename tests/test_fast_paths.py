"""The fast paths of compress: Gram/Cholesky math with QR fallbacks, the error of the stored
values, shared random outers, worker threads and the I/O shortcuts. Each is checked
against a slow dense reference or the path it replaces."""
import errno
import os
import threading
import time

import numpy as np
import pytest
import torch

import lora_convert as lc
from lora_convert import mathcore
from lora_convert.adapter import LoraModule, from_modules, ordered_map
from lora_convert.container import MiniAdapter, MiniModule
from lora_convert.convert import compress_module
from lora_convert.errors import BadInputError
from lora_convert.outer import random as random_outer
from lora_convert.st import LazyTensors, StreamingWriter

D = torch.float64


def factors(out, inp, r, cond=1.0, seed=0):
    """B (out×r) with condition number `cond`, A (r×in) well conditioned, both float64."""
    g = torch.Generator().manual_seed(seed)
    qb, _ = torch.linalg.qr(torch.randn(out, r, generator=g, dtype=D))
    sv = torch.logspace(0, -torch.log10(torch.tensor(cond, dtype=D)).item(), r, dtype=D)
    B = qb * sv * 0.02
    A = torch.randn(r, inp, generator=g, dtype=D) / inp**0.5
    return B, A


def dense_rel_error(m: LoraModule, mini: MiniModule) -> float:
    target = m.up.double() @ m.down.double()
    approx = mini.U.double() @ mini.X.double() @ mini.Y.double() @ mini.V.double()
    return float(torch.linalg.matrix_norm(approx - target) / torch.linalg.matrix_norm(target))


@pytest.mark.parametrize("cond", [1.0, 1e3, 1e7])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("source", ["svd", "random"])
def test_reported_error_is_the_error_of_the_stored_values(source, dtype, cond):
    B, A = factors(96, 80, 8, cond=cond)
    m = LoraModule("layers.0.q_proj", down=A.to(dtype), up=B.to(dtype), alpha=16.0)
    mini = compress_module(m, source, seed=1, outer_dim=24)
    truth = dense_rel_error(m, mini)
    assert mini.fidelity["rel_error"] == pytest.approx(truth, rel=1e-6, abs=1e-12)
    if source == "svd":  # full rank: only the rounding of U, V, X, Y to the storage dtype is lost
        assert truth < {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-6}[dtype]


@pytest.mark.parametrize("cond", [1.0, 1e6, float("inf")])
def test_cholesky_and_qr_routes_give_the_dense_svd(cond):
    B, A = factors(60, 50, 6, cond=1e3 if cond == float("inf") else cond)
    if cond == float("inf"):
        B[:, -1] = B[:, 0]  # rank-deficient: Cholesky fails, QR takes over
    upd = mathcore.Update(B, A)
    expect_gram = cond == 1.0
    assert (mathcore._chol_root(upd.gram_b) is not None) == expect_gram
    dense = torch.linalg.svdvals(B @ A).numpy()
    assert upd.spectrum[:5] == pytest.approx(dense[:5], rel=1e-9)
    assert upd.energy == pytest.approx(float((dense**2).sum()), rel=1e-12)
    u, v = upd.singular_vectors(3)
    torch.testing.assert_close(u @ torch.diag(torch.from_numpy(upd.spectrum[:3])) @ v,
                               torch.linalg.svd(B @ A)[0][:, :3] @ torch.diag(torch.from_numpy(dense[:3]))
                               @ torch.linalg.svd(B @ A)[2][:3], atol=1e-12, rtol=1e-9)


def mini_difference_norm(upd, UtB, AVt, GU, GV, X, Y) -> float | None:
    """mathcore.mini_difference_norms for one module; None when the result is too small to trust."""
    stacked = (np.asarray(m)[None] for m in (UtB, AVt, GU, GV, X, Y))
    d = float(mathcore.mini_difference_norms(upd.stack, *stacked)[0])
    return None if d != d else d


def test_gram_error_formula_refuses_what_it_cannot_resolve():
    B, A = factors(40, 30, 4)
    upd = mathcore.Update(B, A)
    U, V = upd.singular_vectors(4)
    ub, vb = mathcore.OuterBasis(U), mathcore.OuterBasis(V.T)
    X = Y = torch.diag(torch.from_numpy(upd.spectrum[:4]).sqrt())
    args = (upd, ub.m.T @ upd.B, upd.A @ vb.m, ub.gram, vb.gram)
    assert mini_difference_norm(*args, X, Y) is None  # exact: rounding noise only
    Xp = X * (1 + 1e-3)
    expect = float(torch.linalg.matrix_norm(B @ A - U @ Xp @ Y @ V))
    assert mini_difference_norm(*args, Xp, Y) == pytest.approx(expect, rel=1e-6)


def test_random_outers_are_shared_by_shape_and_files_without_a_stream_still_load(tmp_path):
    shapes = {"a.q_proj": (64, 48), "b.q_proj": (64, 48), "c.up_proj": (80, 48)}
    mods = [LoraModule(n, down=factors(o, i, 4, seed=k)[1], up=factors(o, i, 4, seed=k)[0], alpha=8.0)
            for k, (n, (o, i)) in enumerate(shapes.items())]
    mini = lc.compress(from_modules("peft", mods), "random", seed=5, outer_dim=16)
    a, b, c = (mini.module(n) for n in shapes)
    assert a.outer["stream"] == "" and torch.equal(a.U, b.U) and a.outer["u_sha256"] == b.outer["u_sha256"]
    assert a.outer["u_sha256"] != c.outer["u_sha256"] and torch.equal(a.V, c.V)  # V: same b×in

    # a file written per module (no "stream"): outers keyed on the module name
    legacy = []
    for m in (a, b):
        U, u_sha = random_outer.outer_matrix(5, m.name, "U", m.out_features, 16)
        V, v_sha = random_outer.outer_matrix(5, m.name, "V", 16, m.in_features)
        spec = {k: v for k, v in m.outer.items() if k != "stream"} | {"u_sha256": u_sha, "v_sha256": v_sha}
        legacy.append(MiniModule(name=m.name, kind="linear", kernel={}, rank=4, alpha=8.0, use_rslora=False,
                                 dtype="float64", outer=spec, U=U, V=V, X=m.X, Y=m.Y))
    table = {m.name: m for m in legacy}
    lc.save(MiniAdapter(source_format="peft", module_names=list(table), load_module=table.__getitem__), tmp_path / "old")
    loaded = lc.load(tmp_path / "old")
    la, lb = loaded.module("a.q_proj"), loaded.module("b.q_proj")
    assert "stream" not in la.outer and not torch.equal(la.U, lb.U) and not torch.equal(la.U, a.U)
    assert lc.verify(tmp_path / "old").modules  # fingerprints of the per-module streams check out


def test_output_does_not_depend_on_the_number_of_workers(tmp_path, monkeypatch):
    mods = [LoraModule(f"layers.{i}.{p}", down=A.half(), up=B.half(), alpha=16.0)
            for i in range(6) for p, (B, A) in {"q_proj": factors(64, 48, 8, seed=i),
                                                "down_proj": factors(48, 64, 8, seed=i + 9)}.items()]
    threads = torch.get_num_threads()
    outputs = []
    for n in ("1", "3"):
        monkeypatch.setenv("LORA_CONVERT_WORKERS", n)
        for source in ("svd", "random"):
            lc.save(lc.compress(from_modules("peft", mods), source, seed=3), tmp_path / f"{source}-{n}")
            outputs.append((tmp_path / f"{source}-{n}" / "lora_mini.safetensors").read_bytes())
    assert outputs[0] == outputs[2] and outputs[1] == outputs[3]
    assert torch.get_num_threads() == threads  # workers pin their own OpenMP threads, not the caller's


def test_ordered_map_keeps_order_bounds_work_in_flight_and_raises_in_turn():
    live, peak, lock = [0], [0], threading.Lock()

    class Result:
        def __init__(self, i):
            with lock:
                live[0] += 1
                peak[0] = max(peak[0], live[0])
            self.i = i

        def release(self):
            with lock:
                live[0] -= 1

    def work(i):
        time.sleep(0.002 * (i % 3))
        if i == 7:
            raise ValueError("item 7")
        return Result(i)

    seen = []
    with pytest.raises(ValueError, match="item 7"):
        for r in ordered_map(work, range(20), workers=3):
            seen.append(r.i)
            r.release()
    assert seen == list(range(7))
    assert peak[0] <= 3 + 1  # one per worker, and the one the caller holds


def test_spool_copy_falls_back_when_the_kernel_copy_is_refused(tmp_path, monkeypatch):
    def refuse(*_):
        raise OSError(errno.EXDEV, "cross-device")

    t = {"a": torch.arange(10_000, dtype=torch.float32), "b": torch.ones(3, 5, dtype=torch.float16)}
    for attr in ("copy_file_range", "sendfile"):
        monkeypatch.setattr(os, attr, refuse, raising=False)
        with StreamingWriter(tmp_path / f"{attr}.safetensors") as w:
            for k, v in t.items():
                w.add(k, v)
            w.finish({"x": "y"})
        lazy = LazyTensors(tmp_path / f"{attr}.safetensors")
        assert all(torch.equal(lazy.get(k), v) for k, v in t.items()) and lazy.metadata == {"x": "y"}


def test_a_file_that_shrinks_after_its_header_was_read_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    with StreamingWriter(path) as w:
        w.add("a", torch.ones(1000))
        w.finish()
    lazy = LazyTensors(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)
    with pytest.raises(BadInputError, match="file ends inside"):
        lazy.get("a")


def test_ill_conditioned_square_outers_do_not_fool_the_error_formula():
    # modules no wider than --outer-dim get square random outers; seed 15739's 16×16 V has
    # cond 7.9e4, and the Gram formula's rounding then exceeds its result (review finding)
    g = torch.Generator().manual_seed(15739 * 7 + 1)
    m = LoraModule("m", down=torch.randn(1, 16, generator=g), up=torch.randn(16, 1, generator=g), alpha=8.0)
    mini = compress_module(m, "random", seed=15739, dtype="fp32")
    assert mini.fidelity["rel_error"] == pytest.approx(dense_rel_error(m, mini), rel=1e-6)


def test_inner_matrices_that_overflow_the_storage_dtype_are_refused_naming_the_adapter():
    g = torch.Generator().manual_seed(0)
    m = LoraModule("m", down=torch.randn(4, 16, generator=g).half(), up=torch.randn(16, 4, generator=g).half(),
                   alpha=8.0)
    adapter = from_modules("peft", [m], source="/adapters/small")
    with pytest.raises(BadInputError, match="overflow float16.*--dtype fp32") as info:
        list(lc.compress(adapter, "random", seed=1579).modules())  # seed 1579: a 16×16 outer with cond ~1e5
    assert str(info.value.path) == "/adapters/small"
    assert lc.compress(adapter, "random", seed=1579, dtype="fp32").module("m").fidelity["rel_error"] < 1.0


@pytest.mark.parametrize("source", ["svd", "random"])
def test_compress_leaves_no_reference_cycles(source):
    """Cycles are freed only by the cyclic GC: any in the per-module path would keep modules'
    float64 factors alive between GC passes, and peak memory would grow with the adapter."""
    import gc

    B, A = factors(64, 48, 8, cond=1e6)  # ill-conditioned: takes the QR route too
    m = LoraModule("layers.0.q_proj", down=A.half(), up=B.half(), alpha=16.0)
    compress_module(m, source, seed=2)  # warm caches
    gc.collect()
    gc.disable()
    try:
        for cond in (1.0, 1e6):
            B, A = factors(64, 48, 8, cond=cond)
            compress_module(LoraModule("layers.0.q_proj", down=A.half(), up=B.half(), alpha=16.0), source, seed=2)
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_shared_cache_makes_a_value_once_for_concurrent_askers_and_passes_errors_on():
    from concurrent.futures import ThreadPoolExecutor

    from lora_convert.lru import BytesLRU
    cache, made, gate = BytesLRU(1 << 20, size=lambda v: 8), [], threading.Event()

    def make():
        made.append(1)
        gate.wait(5)
        return object()

    with ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(cache.get, "k", make) for _ in range(4)]
        time.sleep(0.05)
        gate.set()
        values = [f.result(5) for f in futures]
    assert len(made) == 1 and all(v is values[0] for v in values)

    def fail():
        raise ValueError("boom")
    with pytest.raises(ValueError):
        cache.get("bad", fail)
    assert cache.get("bad", lambda: "ok") == "ok"  # a failure is not cached


def test_reads_larger_than_one_read_call_and_without_preadv(tmp_path, monkeypatch):
    """Linux returns at most ~2 GiB per read call: a tensor is read in as many calls as it takes."""
    from lora_convert import st
    from safetensors.torch import save_file
    t = torch.arange(10_000, dtype=torch.float32).reshape(100, 100)
    save_file({"w": t}, tmp_path / "a.safetensors")
    real, calls = os.preadv, []

    def short_preadv(fd, buffers, offset):
        calls.append(offset)
        return real(fd, [buffers[0][:4096]], offset)  # at most 4 KiB per call
    monkeypatch.setattr(st.os, "preadv", short_preadv)
    assert torch.equal(LazyTensors(tmp_path / "a.safetensors").get("w"), t)
    assert len(calls) == 10
    monkeypatch.delattr(st.os, "preadv")  # platforms without it read through a file object
    assert torch.equal(LazyTensors(tmp_path / "a.safetensors").get("w"), t)


def test_shared_cache_recovers_from_a_failed_store_and_allows_reentrant_makes():
    from lora_convert.lru import BytesLRU
    fail = [True]

    def size(v):
        if fail.pop() if fail else False:
            raise MemoryError("while measuring")
        return 8
    cache = BytesLRU(1 << 20, size=size)
    with pytest.raises(MemoryError):
        cache.get("k", lambda: 1)
    done = []
    t = threading.Thread(target=lambda: done.append(cache.get("k", lambda: 2)))
    t.start()
    t.join(5)
    assert done == [2]  # not left waiting for the failed attempt
    assert cache.get("outer", lambda: cache.get("outer", lambda: "inner") + "+outer") == "inner+outer"


@pytest.mark.parametrize("reserve", [0, 8, 4096, 1 << 20])
@pytest.mark.parametrize("refuse_kernel_copy", [False, True])
def test_header_room_writes_data_once_and_falls_back_when_the_header_outgrows_it(tmp_path, monkeypatch, reserve,
                                                                                 refuse_kernel_copy):
    """8 bytes are too few for this header and 1 MiB would pad ~55% of the file (the data
    moves behind a compact header in both cases); 4096 holds it with padding under 3%."""
    from safetensors import safe_open
    if refuse_kernel_copy:
        for attr in ("copy_file_range", "sendfile"):
            monkeypatch.setattr(os, attr, lambda *_: (_ for _ in ()).throw(OSError(errno.EXDEV, "x")), raising=False)
    t = {"a": torch.arange(200_000, dtype=torch.float32), "b": torch.ones(3, 5, dtype=torch.float16)}
    path = tmp_path / "t.safetensors"
    with StreamingWriter(path, reserve=reserve) as w:
        for k, v in t.items():
            w.add(k, v)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors" if reserve else "t.safetensors.spool"]
        w.finish({"x": "y"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0 and (header_len == 4096) == (reserve == 4096)
    assert len(raw[8:8 + header_len]) - len(raw[8:8 + header_len].rstrip(b" ")) <= 0.03 * len(raw)
    lazy = LazyTensors(path)
    assert all(torch.equal(lazy.get(k), v) for k, v in t.items()) and lazy.metadata == {"x": "y"}
    with safe_open(path, framework="pt") as fh:  # the reference reader accepts the padded header
        assert torch.equal(fh.get_tensor("a"), t["a"]) and fh.metadata() == {"x": "y"}


def test_peek_does_not_keep_the_first_item_alive():
    import weakref

    from lora_convert.st import peek

    class Item:
        pass
    refs = []

    def items():
        for _ in range(3):
            item = Item()
            refs.append(weakref.ref(item))
            yield item
    first, again = peek(items())
    del first
    alive = [[r() is not None for r in refs] for _ in again]
    assert alive[1][0] is False and alive[2][:2] == [False, False]
    assert peek(iter([]))[0] is None and list(peek(iter([]))[1]) == []


def test_header_room_is_removed_on_abort(tmp_path):
    with pytest.raises(RuntimeError):
        with StreamingWriter(tmp_path / "t.safetensors", reserve=1024) as w:
            w.add("a", torch.ones(4))
            raise RuntimeError("interrupted")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("source", ["svd", "random"])
def test_stored_outers_are_written_behind_header_room_and_tiny_files_are_not_padded(tmp_path, source):
    from lora_convert.container import FILE_NAME
    ms = [LoraModule(f"layers.{i}.q_proj", *factors(4096, 4096, 16, seed=i)[::-1], alpha=32.0) for i in range(6)]
    for m in ms:
        m.down, m.up = m.down.half(), m.up.half()
    lc.save(lc.compress(from_modules("peft", ms, config={"r": 16, "lora_alpha": 32}), source, seed=1), tmp_path / "m")
    raw = (tmp_path / "m" / FILE_NAME).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    padding = len(raw[8:8 + n]) - len(raw[8:8 + n].rstrip(b" "))
    assert (padding > 1000) == (source == "svd") and padding < 0.03 * len(raw)
    lc.verify(tmp_path / "m")  # checks every checksum and fingerprint
    assert lc.load(tmp_path / "m").module("layers.3.q_proj").U.shape[0] == 4096


def test_large_peft_adapters_are_written_behind_header_room_and_load_in_safetensors(tmp_path):
    from safetensors import safe_open
    ms = [LoraModule(f"model.layers.{i}.self_attn.q_proj", *[t.half() for t in factors(4096, 4096, 16, seed=i)[::-1]],
                     alpha=32.0) for i in range(6)]
    cfg = {"r": 16, "lora_alpha": 32, "peft_type": "LORA", "target_modules": ["q_proj"]}
    lc.save_adapter(from_modules("peft", ms, config=cfg), tmp_path / "a", "peft")
    raw = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert len(raw[8:8 + n]) - len(raw[8:8 + n].rstrip(b" ")) > 500  # written once, behind padded room
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", framework="pt") as fh:
        for m in ms:
            key = f"base_model.model.{m.name}.lora_B.weight"
            assert torch.equal(fh.get_tensor(key), m.up)
    back = lc.load_adapter(tmp_path / "a")
    assert torch.equal(back.module(ms[2].name).down, ms[2].down)
