"""convert: compress_module (one module) and compress_window (modules fitted as stacks).

The reported error must be the error of the values actually stored, whatever route the math
takes (Gram/Cholesky, QR), and stacking changes how the products are batched, never what is
computed for a module: every stack is compared with the same modules compressed one at a
time, and with a dense reference where the stack takes a different route (QR, padding,
all-zero).
"""
import gc

import pytest
import torch

import lora_convert as lc
from helpers.lowrank import D, dense_rel_error, lowrank
from lora_convert.adapter import LoraModule, from_modules
from lora_convert.convert import compress_module, compress_window


def module(name, out, inp, r, seed, cond=1.0, dtype=torch.float32, zero=False, repeat_col=False):
    B, A = lowrank(out, inp, r, seed=seed, cond=cond)
    if repeat_col:  # rank-deficient B: its Gram matrix is singular
        B[:, -1] = B[:, 0]
    if zero:
        B = torch.zeros_like(B)
    return LoraModule(name, down=A.to(dtype), up=B.to(dtype), alpha=2.0 * r)


def assert_same(stacked, alone):
    assert stacked.name == alone.name and stacked.outer == alone.outer
    for role in "UVXY":
        a, b = getattr(stacked, role), getattr(alone, role)
        assert a.shape == b.shape and a.dtype == b.dtype, role
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-9, atol=1e-12 * float(b.double().abs().max() + 1))
    assert stacked.fidelity["rel_error"] == pytest.approx(alone.fidelity["rel_error"], rel=1e-7, abs=1e-14)
    assert stacked.fidelity["energy"] == pytest.approx(alone.fidelity["energy"], rel=1e-12)


MIXED = [  # three shapes, interleaved; two dtypes of one shape form separate stacks
    module("l0.q", 48, 40, 8, 0), module("l0.up", 64, 40, 8, 1), module("l1.q", 48, 40, 8, 2),
    module("l0.down", 40, 64, 4, 3), module("l1.up", 64, 40, 8, 4), module("l2.q", 48, 40, 8, 5, dtype=torch.float16),
    module("l3.q", 48, 40, 8, 6),
]


@pytest.mark.parametrize("source", ["random", "select", "svd"])
def test_a_window_of_mixed_shapes_equals_its_modules_one_by_one_in_order(source):
    stacked = compress_window(MIXED, source, seed=3, outer_dim=16 if source != "svd" else None)
    assert [m.name for m in stacked] == [m.name for m in MIXED]
    for m, s in zip(MIXED, stacked):
        assert_same(s, compress_module(m, source, seed=3, outer_dim=16 if source != "svd" else None))
        assert s.fidelity["rel_error"] == pytest.approx(dense_rel_error(m, s), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("source", ["random", "svd"])
def test_ill_conditioned_and_rank_deficient_members_take_the_qr_route_inside_a_stack(source):
    ms = [module("a", 60, 50, 6, 0), module("b", 60, 50, 6, 1, cond=1e7), module("c", 60, 50, 6, 2, repeat_col=True),
          module("d", 60, 50, 6, 3)]
    stacked = compress_window(ms, source, seed=1, outer_dim=20)  if source == "random" else compress_window(ms, source)
    for m, s in zip(ms, stacked):
        alone = compress_module(m, source, seed=1, outer_dim=20) if source == "random" else compress_module(m, source)
        assert_same(s, alone)
        assert s.fidelity["rel_error"] == pytest.approx(dense_rel_error(m, s), rel=1e-6, abs=1e-12)
    if source == "svd":  # rank 5 of 6: the svd outers find it and lose nothing but rounding
        assert stacked[2].fidelity["rel_error"] < 1e-6


@pytest.mark.parametrize("source", ["random", "svd"])
def test_modules_narrower_than_their_rank_stack_through_qr(source):
    ms = [module(f"m{i}", 4, 6, 8, i) for i in range(3)]  # out < r: every Gram matrix is singular
    stacked = compress_window(ms, source, seed=2, outer_dim=3) if source == "random" else compress_window(ms, source)
    for m, s in zip(ms, stacked):
        assert s.fidelity["rel_error"] == pytest.approx(dense_rel_error(m, s), rel=1e-6, abs=1e-12)
    if source == "svd":
        assert max(s.fidelity["rel_error"] for s in stacked) < 1e-6


@pytest.mark.parametrize("source", ["random", "svd"])
def test_per_module_ranks_differ_inside_one_stack(source):
    """keep_energy picks each module's rank; the stack pads to the largest and trims back."""
    ms = [module(f"m{i}", 50, 40, 8, i, cond=c) for i, c in enumerate([1.0, 1e2, 1e4, 3.0])]
    kw = dict(seed=4, keep_energy=0.9, outer_dim=64) if source == "random" else dict(keep_energy=0.9)
    stacked = compress_window(ms, source, **kw)
    ranks = [s.inner_rank for s in stacked]
    assert len(set(ranks)) > 1, ranks
    for m, s in zip(ms, stacked):
        assert_same(s, compress_module(m, source, **kw))
        assert s.fidelity["rel_error"] == pytest.approx(dense_rel_error(m, s), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("source", ["random", "svd"])
def test_an_all_zero_update_inside_a_stack_keeps_one_zero_direction(source):
    ms = [module("live", 30, 20, 4, 0), module("dead", 30, 20, 4, 1, zero=True)]
    stacked = compress_window(ms, source, seed=5, outer_dim=8) if source == "random" else compress_window(ms, source)
    dead = stacked[1]
    assert dead.inner_rank == 1 and not dead.X.abs().sum() * dead.Y.abs().sum()
    assert dead.fidelity["rel_error"] == 0.0 and dead.fidelity["energy"] == 0.0
    assert stacked[0].fidelity["rel_error"] == pytest.approx(dense_rel_error(ms[0], stacked[0]), rel=1e-6)


def test_windows_cover_every_module_once_in_order(monkeypatch, tmp_path):
    import lora_convert.convert as convert
    monkeypatch.setattr(convert, "WINDOW", 3)  # 7 modules: windows of 3, 3, 1
    adapter = from_modules("peft", list(MIXED), config={"r": 8, "lora_alpha": 16, "peft_type": "LORA"})
    mini = lc.compress(adapter, "random", seed=3, outer_dim=16)
    assert mini.window == 3
    got = list(mini.modules())
    assert [m.name for m in got] == [m.name for m in MIXED]
    for m, s in zip(MIXED, got):
        assert_same(s, compress_module(m, "random", seed=3, outer_dim=16))
    assert mini.module("l1.up").fidelity == got[4].fidelity  # single-module access goes through a window of one


def test_a_stack_over_the_byte_cap_is_split_without_changing_results(monkeypatch):
    import lora_convert.convert as convert
    ms = [module(f"m{i}", 48, 40, 8, i) for i in range(5)]
    whole = compress_window(ms, "random", seed=6, outer_dim=16)
    monkeypatch.setattr(convert, "STACK_BYTES", 2 * 8 * 8 * (48 + 40))  # two modules per stack: 2 + 2 + 1
    calls = []
    real = convert._compress_stack
    monkeypatch.setattr(convert, "_compress_stack", lambda ms, *a: calls.append(len(ms)) or real(ms, *a))
    split = compress_window(ms, "random", seed=6, outer_dim=16)
    assert calls == [2, 2, 1]
    for s, w in zip(split, whole):
        assert_same(s, w)


def test_ill_conditioned_members_leave_the_gram_route_and_keep_orthonormal_singular_vectors():
    """Gram matrices square the condition number: past cond 1e4 a member must take QR, or its
    singular vectors lose orthogonality (here by ~1e-2) and its small singular values."""
    from lora_convert import factored, mathcore
    ms = [module(f"m{i}", 300, 200, 8, i, cond=c) for i, c in enumerate([1.0, 1e7, 10.0, 1e9])]
    upd = mathcore.Updates(torch.stack([m.up.double() for m in ms]), torch.stack([m.down.double() for m in ms]))
    _, _, ok = factored.chol_roots(upd.gram_b)
    assert ok.tolist() == [True, False, True, False]
    U, V = upd.singular_vectors(8)
    for i, m in enumerate(ms):
        eye = torch.eye(8, dtype=D)
        assert float((U[i].T @ U[i] - eye).abs().max()) < 1e-10 and float((V[i] @ V[i].T - eye).abs().max()) < 1e-10
        dense = torch.linalg.svdvals(m.up.double() @ m.down.double())[:8].numpy()
        assert abs(upd.spectrum[i] - dense).max() < 1e-12 * dense[0]


@pytest.mark.parametrize("source", ["random", "svd"])
def test_results_do_not_share_memory_with_the_reused_float64_buffers(source):
    kw = dict(seed=1, outer_dim=16) if source == "random" else {}
    first = compress_window([module(f"a{i}", 48, 40, 8, i) for i in range(3)], source, **kw)
    kept = [{r: getattr(m, r).clone() for r in "UVXY"} for m in first]
    compress_window([module(f"b{i}", 48, 40, 8, 10 + i) for i in range(3)], source, **kw)
    for m, k in zip(first, kept):
        assert all(torch.equal(getattr(m, r), k[r]) for r in "UVXY")


def test_per_module_outer_streams_give_each_module_its_own_outers_and_the_optimal_fit(tmp_path):
    """--outer-stream module: U, V keyed on (seed, module name, shape), independent outers per
    layer as in the LoRA-Mini paper; each fit is the closed-form optimum for its own outers."""
    from helpers.fits import fit_inner
    from lora_convert.outer.rng import random_matrix

    mods = [module(f"layers.{i}.q_proj", 48, 40, 4, seed=i) for i in range(3)]
    adapter = from_modules("peft", mods, config={"r": 4, "lora_alpha": 8, "peft_type": "LORA"})
    mini = lc.compress(adapter, outer="random", seed=5, outer_dim=8, outer_stream="module", dtype="fp32")
    shared = lc.compress(adapter, outer="random", seed=5, outer_dim=8, dtype="fp32")
    lc.save(mini, tmp_path / "m")
    loaded = {m.name: m for m in lc.load(tmp_path / "m").modules()}  # regenerated, fingerprints checked
    for m, s in zip(mods, shared.modules()):
        got = loaded[m.name]
        assert got.outer["stream"] == m.name
        assert torch.equal(got.U, torch.from_numpy(random_matrix(5, m.name, "U", 48, 8)))
        assert torch.equal(got.V, torch.from_numpy(random_matrix(5, m.name, "V", 8, 40)))
        assert not torch.equal(got.U, s.U)
        best = (1 - fit_inner(m.up, m.down, got.U, got.V).retained_energy()) ** 0.5
        assert got.fidelity["rel_error"] == pytest.approx(best, rel=1e-9)
        assert dense_rel_error(m, got) == pytest.approx(best, rel=1e-5)
    with pytest.raises(lc.BadInputError, match="outer-stream"):
        lc.compress(adapter, outer="svd", outer_stream="module")


# ---------------------------------------------------------------- one module at a time

@pytest.mark.parametrize("cond", [1.0, 1e3, 1e7])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("source", ["svd", "random"])
def test_reported_error_is_the_error_of_the_stored_values(source, dtype, cond):
    B, A = lowrank(96, 80, 8, cond=cond)
    m = LoraModule("layers.0.q_proj", down=A.to(dtype), up=B.to(dtype), alpha=16.0)
    mini = compress_module(m, source, seed=1, outer_dim=24)
    truth = dense_rel_error(m, mini)
    assert mini.fidelity["rel_error"] == pytest.approx(truth, rel=1e-6, abs=1e-12)
    if source == "svd":  # full rank: only the rounding of U, V, X, Y to the storage dtype is lost
        assert truth < {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-6}[dtype]


def test_output_does_not_depend_on_the_number_of_workers(tmp_path, monkeypatch):
    mods = [LoraModule(f"layers.{i}.{p}", down=A.half(), up=B.half(), alpha=16.0)
            for i in range(6) for p, (B, A) in {"q_proj": lowrank(64, 48, 8, seed=i),
                                                "down_proj": lowrank(48, 64, 8, seed=i + 9)}.items()]
    threads = torch.get_num_threads()
    outputs = []
    for n in ("1", "3"):
        monkeypatch.setenv("LORA_CONVERT_WORKERS", n)
        for source in ("svd", "random"):
            lc.save(lc.compress(from_modules("peft", mods), source, seed=3), tmp_path / f"{source}-{n}")
            outputs.append((tmp_path / f"{source}-{n}" / "lora_mini.safetensors").read_bytes())
    assert outputs[0] == outputs[2] and outputs[1] == outputs[3]
    assert torch.get_num_threads() == threads  # workers pin their own OpenMP threads, not the caller's


def test_ill_conditioned_square_outers_do_not_fool_the_error_formula():
    # modules no wider than --outer-dim get square random outers; seed 15739's 16×16 V has
    # cond 7.9e4, and the Gram formula's rounding then exceeds its result
    g = torch.Generator().manual_seed(15739 * 7 + 1)
    m = LoraModule("m", down=torch.randn(1, 16, generator=g), up=torch.randn(16, 1, generator=g), alpha=8.0)
    mini = compress_module(m, "random", seed=15739, dtype="fp32")
    assert mini.fidelity["rel_error"] == pytest.approx(dense_rel_error(m, mini), rel=1e-6)


def test_inner_matrices_that_overflow_the_storage_dtype_are_refused_naming_the_adapter():
    g = torch.Generator().manual_seed(0)
    m = LoraModule("m", down=torch.randn(4, 16, generator=g).half(), up=torch.randn(16, 4, generator=g).half(),
                   alpha=8.0)
    adapter = from_modules("peft", [m], source="/adapters/small")
    with pytest.raises(lc.BadInputError, match="overflow float16.*--dtype fp32") as info:
        list(lc.compress(adapter, "random", seed=1579).modules())  # seed 1579: a 16×16 outer with cond ~1e5
    assert str(info.value.path) == "/adapters/small"
    assert lc.compress(adapter, "random", seed=1579, dtype="fp32").module("m").fidelity["rel_error"] < 1.0


@pytest.mark.parametrize("source", ["svd", "random"])
def test_compress_leaves_no_reference_cycles(source):
    """Cycles are freed only by the cyclic GC: any in the per-module path would keep modules'
    float64 factors alive between GC passes, and peak memory would grow with the adapter."""
    B, A = lowrank(64, 48, 8, cond=1e6)  # ill-conditioned: takes the QR route too
    m = LoraModule("layers.0.q_proj", down=A.half(), up=B.half(), alpha=16.0)
    compress_module(m, source, seed=2)  # warm caches
    gc.collect()
    gc.disable()
    try:
        for cond in (1.0, 1e6):
            B, A = lowrank(64, 48, 8, cond=cond)
            compress_module(LoraModule("layers.0.q_proj", down=A.half(), up=B.half(), alpha=16.0), source, seed=2)
        assert gc.collect() == 0
    finally:
        gc.enable()
