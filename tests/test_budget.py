"""Budgets: error curves, the global allocation, --target-size / --min-fidelity / --plan, and
CompressConfig's validation."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import lora_convert as lc
from lora_convert import budget, quant
from lora_convert.budget import Curve, Option, allocate, error_curve, frontier, lower_hull
from lora_convert.cli import main
from lora_convert.config import CompressConfig, ConfigError, parse_size
from lora_convert.mathcore import difference_norm

SRC = "peft-tiny-llama"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def low_rank(out_f, in_f, r, seed, decay=0.6):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(out_f, r, generator=g, dtype=torch.float64) * decay ** torch.arange(r)
    return B, torch.randn(r, in_f, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------- curves

@pytest.mark.parametrize("whitened", [False, True])
def test_curve_errors_are_the_errors_of_the_decoded_factors(whitened):
    """Every option's predicted error equals the dense error of the factors a reader decodes."""
    B, A = low_rank(70, 50, 6, 1)
    L = None
    if whitened:
        g = torch.Generator().manual_seed(9)
        M = torch.randn(50, 50, generator=g, dtype=torch.float64)
        L = torch.linalg.cholesky(M @ M.T / 50 + torch.eye(50, dtype=torch.float64)).numpy()
    curve = error_curve("m", B, A, 0.5, bits=(3, 4, "nf4", 8, 16), group=16, whitening=L)
    F1, F2, _ = budget.svd_factors(B, A, L)
    W = torch.eye(50, dtype=torch.float64) if L is None else torch.from_numpy(L)
    for o in curve.options:
        _, (Q1, Q2) = quant.encode_many([F1[:, :o.k], F2[:o.k]], o.bits, 16)
        diff = (B @ A - torch.from_numpy(Q1).double() @ torch.from_numpy(Q2).double()) @ W
        assert o.err2 == pytest.approx(0.25 * float((diff ** 2).sum()), rel=1e-6, abs=1e-12)
        assert o.nbytes == quant.nbytes((70, o.k), o.bits, 16) + quant.nbytes((o.k, 50), o.bits, 16)
    assert curve.energy == pytest.approx(0.25 * float(((B @ A @ W) ** 2).sum()))


def test_whitening_fits_the_weighted_error():
    """With an input second moment, the whitened truncation beats the plain one in that metric."""
    B, A = low_rank(40, 30, 8, 2, decay=0.9)
    d = torch.ones(30, dtype=torch.float64)
    d[:5] = 30.0  # a few input directions carry most of the data
    L = torch.diag(d).numpy()
    plain = {(o.k, o.bits): o.err2 for o in error_curve("m", B, A, 1.0, bits=(16,), group=64).options}
    F1, F2, _ = budget.svd_factors(B, A)
    white = error_curve("m", B, A, 1.0, bits=(16,), group=64, whitening=L)
    for o in white.options[:4]:
        plain_w = float((((B @ A - torch.from_numpy(F1[:, :o.k] @ F2[:o.k])) @ torch.from_numpy(L)) ** 2).sum())
        assert o.err2 < plain_w
    assert plain  # the unwhitened curve exists for the same options


def test_random_outer_curve_matches_written_modules(fixtures):
    adapter = lc.load_adapter(fixtures / SRC)
    m = adapter.module(adapter.module_names[0])
    from lora_convert.outer import random as ro
    U, V, _ = ro.make(m, {"seed": 3, "outer_dim": 16})
    curve = error_curve(m.name, m.up, m.down, m.scale, bits=(4, 8), group=64, outers=(U, V))
    for o in curve.options[::3]:
        mini = lc.compress(adapter, "random", seed=3, outer_dim=16, rank=o.k, bits=o.bits).module(m.name)
        rel2 = mini.fidelity["rel_error"] ** 2
        assert rel2 * curve.energy == pytest.approx(o.err2, rel=1e-4, abs=1e-12)


# ---------------------------------------------------------------- hull and allocation

def test_lower_hull():
    opts = [Option(1, 4, 10, 9.0), Option(2, 4, 20, 4.0), Option(3, 4, 30, 3.5), Option(1, 8, 25, 8.0),
            Option(4, 4, 40, 0.5), Option(5, 4, 50, 0.4)]
    assert [(o.nbytes, o.err2) for o in lower_hull(opts)] == [(10, 9.0), (20, 4.0), (40, 0.5), (50, 0.4)]


def _brute(curves, budget_bytes):
    best = None
    for combo in itertools.product(*[c.options for c in curves]):
        if sum(o.nbytes for o in combo) <= budget_bytes:
            e = sum(o.err2 for o in combo)
            best = e if best is None else min(best, e)
    return best


def test_allocation_is_near_optimal_and_within_budget():
    """On small random problems the greedy hull allocation never exceeds the budget and is within
    one step of the exact optimum (a hull walk can only miss by the step it could not afford)."""
    rng = np.random.default_rng(0)
    for trial in range(30):
        curves = []
        for i in range(3):
            opts = []
            for k in range(1, 5):
                for b in (4, 8):
                    opts.append(Option(k, b, int(k * b * rng.integers(5, 15)), float(rng.random() * 10 / (k * b))))
            curves.append(Curve(f"m{i}", 10.0, opts))
        lo = sum(c.hull[0].nbytes for c in curves)
        budget_bytes = int(lo + rng.integers(0, 300))
        got = allocate(curves, budget_bytes)
        assert got.nbytes <= budget_bytes
        assert got.nbytes == sum(o.nbytes for o in got.choice.values())
        exact = _brute(curves, budget_bytes)
        worst_step = max(max(a.err2 - b.err2 for a, b in zip(c.hull, c.hull[1:])) if len(c.hull) > 1 else 0
                         for c in curves)
        assert got.err2 <= exact + worst_step + 1e-12


def test_balance_weighs_each_module_by_a_power_of_its_energy():
    """allocate(balance=b) makes the choices of the plain walk over curves whose errors are scaled
    by energy^(b − 1), and reports the unscaled error; b < 1 moves bytes to small updates."""
    mods = [low_rank(64, 64, 8, s, decay=d) for s, d in ((1, 0.3), (2, 0.9), (3, 0.6), (4, 0.95))]
    curves = [error_curve(f"m{i}", B * 4.0 ** i, A, 1.0, bits=(3, 4, 8, 16), group=64) for i, (B, A) in enumerate(mods)]
    scaled = [Curve(c.name, c.energy, [Option(o.k, o.bits, o.nbytes, o.err2 * c.energy ** -0.5) for o in c.options])
              for c in curves]
    lo, hi = sum(c.hull[0].nbytes for c in curves), sum(c.hull[-1].nbytes for c in curves)
    moved = False
    for budget_bytes in np.linspace(lo, hi, 7).astype(int)[1:-1]:
        got = allocate(curves, int(budget_bytes), balance=0.5)
        want = allocate(scaled, int(budget_bytes)).choice
        assert {n: (o.k, o.bits) for n, o in got.choice.items()} == {n: (o.k, o.bits) for n, o in want.items()}
        assert got.err2 == pytest.approx(sum(o.err2 for o in got.choice.values()), rel=1e-9)
        plain = allocate(curves, int(budget_bytes))
        moved |= got.choice["m0"].nbytes > plain.choice["m0"].nbytes  # m0: the smallest update
    assert moved
    assert budget.balance_for(0.95) == 1.0 and budget.balance_for(None) == budget.BALANCE


def test_allocation_beats_one_choice_for_all():
    """Modules with different spectra: the global allocation keeps more than the best uniform (k, bits)
    that fits the same bytes."""
    mods = [low_rank(64, 64, 8, s, decay=d) for s, d in ((1, 0.3), (2, 0.9), (3, 0.6), (4, 0.95))]
    curves = [error_curve(f"m{i}", B, A, 1.0, bits=(3, 4, 8, 16), group=64) for i, (B, A) in enumerate(mods)]
    energy = sum(c.energy for c in curves)
    for k, b in [(2, 4), (4, 4), (3, 8)]:
        uniform = [next(o for o in c.options if o.k == k and o.bits == b) for c in curves]
        spent = sum(o.nbytes for o in uniform)
        got = allocate(curves, spent)
        assert got.err2 <= sum(o.err2 for o in uniform) * (1 + 1e-12)
        assert got.fidelity >= 1 - sum(o.err2 for o in uniform) / energy


def _rank_one(values, seed, out_f=256, in_f=192):
    """A rank-1 update whose SVD factors hold `values`-distributed entries (u·vᵀ: F1 ∝ u, F2 ∝ vᵀ)."""
    rng = np.random.default_rng(seed)
    draw = rng.standard_normal if values == "normal" else (lambda n: rng.uniform(-1, 1, n))
    return torch.from_numpy(draw(out_f))[:, None], torch.from_numpy(draw(in_f))[None, :]


@pytest.mark.parametrize("values,better", [("normal", "nf4"), ("uniform", 4)])
def test_allocator_picks_nf4_where_it_is_better(values, better, tmp_path):
    """int4 and NF4 cost the same bytes; the allocation takes whichever decodes closer: NF4 for
    bell-shaped factors, int4 for flat ones (so it follows the measured error, not a preference)."""
    B, A = _rank_one(values, 3)
    curve = error_curve("m", B, A, 1.0, bits=(4, "nf4"), group=64)
    err = {o.bits: o.err2 for o in curve.options}
    assert len(curve.options) == 2 and len({o.nbytes for o in curve.options}) == 1
    assert min(err, key=err.get) == better and err[4] != err["nf4"]
    assert [o.bits for o in curve.hull] == [better]
    assert allocate([curve], curve.options[0].nbytes).choice["m"].bits == better
    # end to end: compress --target-size with both widths allowed stores the better one (the
    # header names NF4 in 6 bytes more than int4: a budget that affords either)
    from lora_convert.adapter import LoraModule, from_modules
    mod = LoraModule(name="model.layers.0.self_attn.q_proj", down=A.float(), up=B.float(), alpha=1.0)
    adapter = from_modules("peft", [mod], config={"peft_type": "LORA", "r": 1, "lora_alpha": 1})
    mini = lc.compress(adapter, "svd", target_size="100KB", allowed_bits=(4, "nf4"))
    assert mini.module(mod.name).quant == {"bits": better, "group": quant.DEFAULT_GROUP}


def test_min_fidelity_takes_the_fewest_bytes_along_the_path():
    mods = [low_rank(48, 40, 6, s) for s in range(3)]
    curves = [error_curve(f"m{i}", B, A, 1.0, bits=(4, 8, 16), group=64) for i, (B, A) in enumerate(mods)]
    got = allocate(curves, min_fidelity=0.99)
    assert got.fidelity >= 0.99
    path = frontier(curves)
    first = next(b for b, f in path if f >= 0.99)
    assert got.nbytes == first
    assert all(b1 <= b2 for (b1, _), (b2, _) in zip(path, path[1:]))


def test_budget_errors_name_the_best():
    curves = [error_curve("m", *low_rank(32, 32, 4, 0), 1.0, bits=(4, 8), group=64)]
    with pytest.raises(budget.BudgetError, match="smallest file") as info:
        allocate(curves, 10, fixed=100)
    assert info.value.best.nbytes > 10
    with pytest.raises(budget.BudgetError, match="out of reach"):
        allocate(curves, curves[0].hull[0].nbytes, min_fidelity=0.9999999)


# ---------------------------------------------------------------- end to end

@pytest.mark.parametrize("target", ["2x", "3.5x", "15KB", "20000"])
def test_target_size_is_honoured_by_the_output(fixtures, tmp_path, target):
    out = tmp_path / "m"
    res = run("compress", fixtures / SRC, "--outer", "svd", "--target-size", target, "-o", out, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    written = sum(f.stat().st_size for f in out.iterdir())
    assert written <= doc["budget_bytes"] and doc["summary"]["compressed_bytes"] == written
    kind, value = parse_size(target)
    original = (fixtures / SRC / "adapter_model.safetensors").stat().st_size
    assert doc["budget_bytes"] == int(original / value if kind == "ratio" else value)
    assert all(m["bits"] is not None for m in doc["modules"])
    assert lc.verify(out, fixtures / SRC).retained_energy == pytest.approx(doc["summary"]["retained_energy"], rel=1e-6)


@pytest.mark.parametrize("outer", ["svd", "random"])
@pytest.mark.parametrize("single_file", [True, False])
@pytest.mark.parametrize("group", [None, 32])
def test_planned_bytes_are_the_written_bytes(fixtures, tmp_path, outer, single_file, group):
    """The plan counts the header exactly (module entries, defaults, packed tensors), up to the
    digits of offsets and the data's 8-byte alignment: the budget is spent, not guessed at. (Group
    32: several groups per vector of the fixture's factors, which the default group does not give.)"""
    from lora_convert.convert import plan_curves
    adapter = lc.load_adapter(fixtures / SRC)
    extra = {"outer_dim": 32} if outer == "random" else {}
    if group:
        extra["group_size"] = group
    for budget_bytes in ((5000, 9000, 14000) if outer == "svd" else (9000, 14000, 20000)):
        out = tmp_path / (f"m{budget_bytes}.safetensors" if single_file else f"m{budget_bytes}")
        cfg = CompressConfig(outer=outer, target_size=budget_bytes, **extra)
        curves, fixed = plan_curves(adapter, cfg, budget_bytes, directory=not single_file)
        planned = allocate(curves, budget_bytes, None, fixed, balance=budget.BALANCE)  # what compress walks
        report = lc.save(lc.compress(adapter, cfg, output=out), out)
        written = out.stat().st_size if single_file else sum(f.stat().st_size for f in out.iterdir())
        slack = 16 if single_file else 16 + 150  # the summary file's floats are counted at their longest
        assert planned.nbytes - slack <= written <= planned.nbytes <= budget_bytes
        assert report.retained_energy == pytest.approx(planned.fidelity, abs=1e-3)


def test_more_budget_keeps_more(fixtures):
    adapter = lc.load_adapter(fixtures / SRC)
    from lora_convert.convert import stored_report
    kept = [stored_report(lc.compress(adapter, "svd", target_size=t)).retained_energy
            for t in ("12KB", "16KB", "24KB", "40KB")]
    assert kept == sorted(kept) and kept[-1] > kept[0]


def test_min_fidelity_end_to_end(fixtures, tmp_path):
    out = tmp_path / "m.safetensors"
    res = run("compress", fixtures / SRC, "--outer", "svd", "--min-fidelity", "0.99", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["summary"]["retained_energy"] >= 0.99


def test_random_outer_budget(fixtures, tmp_path):
    out = tmp_path / "m.safetensors"
    res = run("compress", fixtures / SRC, "--outer-dim", "32", "--target-size", "4x", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    assert out.stat().st_size <= 62880 // 4
    assert {m["outer"] for m in json.loads(res.stdout)["modules"]} == {"random"}


@pytest.mark.parametrize("args,words", [
    (["--target-size", "1000x"], ["smallest file", "over the budget"]),
    (["--target-size", "100B"], ["smallest file"]),
    (["--min-fidelity", "0.99999999999"], ["out of reach", "the best is"]),
    (["--target-size", "4x", "--min-fidelity", "0.999999"], ["out of reach", "within"]),
    (["--bits", "5"], ["--bits", "unknown bit width"]),
    (["--target-size", "big"], ["--target-size", "32x"]),
    (["--target-size", "4x", "--rank", "2"], ["--rank", "drop"]),
    (["--bits", "4", "--dtype", "fp16"], ["--dtype"]),
    (["--group-size", "0"], ["--group-size"]),
    (["--min-fidelity", "1.5"], ["--min-fidelity"]),
    (["--bits", "3,nf4"], ["--bits", "a budget"]),
    (["--target-size", "4x", "--bits", "3,5"], ["--bits", "unknown bit width 5"]),
])
def test_unmeetable_budgets_and_bad_options(fixtures, tmp_path, args, words):
    out = tmp_path / "m"
    res = run("compress", fixtures / SRC, "--outer", "svd", "-o", out, *args)
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.output
    for w in words:
        assert w in res.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_plan_prints_the_curve_and_writes_nothing(fixtures, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curve.png"
    res = run("compress", fixtures / SRC, "--outer", "svd", "--plan", "--plot", png)
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.stdout.splitlines()[2:]]
    sizes = [int(r[0].replace(",", "")) for r in rows]
    kept = [float(r[2].rstrip("%")) for r in rows]
    assert len(rows) >= 4 and sizes == sorted(sizes) and kept == sorted(kept)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]
    doc = json.loads(run("compress", fixtures / SRC, "--outer", "svd", "--plan", "--json").stdout)
    assert [p["bytes"] for p in doc["points"]] == sizes and doc["fidelity"] == "weight-space energy"


# ---------------------------------------------------------------- CompressConfig

def test_config_names_parameters():
    with pytest.raises(ConfigError) as info:
        CompressConfig(rank=0)
    assert info.value.param == "rank" and str(info.value).startswith("rank (--rank)")
    for kwargs, param in [({"keep_energy": 2.0}, "keep_energy"), ({"seed": -1}, "seed"),
                          ({"outer": "svd", "outer_dim": 4}, "outer_dim"), ({"outer_dim": (1, 2, 3)}, "outer_dim"),
                          ({"outer": "nope"}, "outer"), ({"dtype": "int8"}, "dtype"), ({"bits": 7}, "bits"),
                          ({"target_size": "0.5x"}, "target_size"), ({"min_fidelity": 0}, "min_fidelity"),
                          ({"outer": "svd", "outer_stream": "module"}, "outer_stream"), ({"bits": "nf3"}, "bits"),
                          ({"bits": "4"}, "bits"), ({"allowed_bits": (4, "fp4")}, "allowed_bits"),
                          ({"allowed_bits": "nf4"}, "allowed_bits")]:
        with pytest.raises(ConfigError) as info:
            CompressConfig(**kwargs)
        assert info.value.param == param, kwargs


def test_config_and_keywords_are_the_same_compress(fixtures, tmp_path):
    adapter = lc.load_adapter(fixtures / SRC)
    a = lc.save(lc.compress(adapter, "random", seed=5, outer_dim=16, rank=3), tmp_path / "a.safetensors")
    b = lc.save(lc.compress(adapter, CompressConfig(seed=5, outer_dim=16, rank=3)), tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert a.retained_energy == b.retained_energy
    cfg = CompressConfig(outer="svd", bits=4)
    assert cfg.replace(bits=8).bits == 8 and cfg.bits == 4
    with pytest.raises(ConfigError):
        cfg.replace(bits=9)


def test_nf4_is_a_width_everywhere_bits_is(fixtures, tmp_path):
    """bits="nf4" in the API, --bits nf4 (any case) on the CLI; budgets allow it by default, and
    width sets sort with it after int4."""
    assert CompressConfig(outer="svd", bits="nf4").bits == "nf4"
    assert CompressConfig(allowed_bits=(16, "nf4", 3, 4)).allowed_bits == (3, 4, "nf4", 16)
    assert "nf4" in CompressConfig().allowed_bits
    for flag_value in ("nf4", "NF4"):
        out = tmp_path / f"{flag_value}.safetensors"
        res = run("compress", fixtures / SRC, "--outer", "svd", "--rank", 2, "--bits", flag_value, "-o", out)
        assert res.exit_code == 0, res.output
        assert all(m.quant["bits"] == "nf4" for m in lc.load(out).modules())
    res = run("compress", fixtures / SRC, "--outer", "svd", "--plan")
    assert "bits 3, nf4, 8, 16" in res.stdout


def test_budget_chooses_among_the_widths_of_bits(fixtures, tmp_path):
    """compress --target-size --bits 2,3: every module at one of those widths, the budget honoured,
    and the same file as the API's allowed_bits."""
    out = tmp_path / "m.safetensors"
    res = run("compress", fixtures / SRC, "--outer", "svd", "--target-size", "6x", "--bits", "2, 3", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert out.stat().st_size <= doc["budget_bytes"]
    widths = {m.quant["bits"] for m in lc.load(out).modules()}
    assert widths <= {2, 3} and widths
    api = tmp_path / "api.safetensors"
    lc.save(lc.compress(lc.load_adapter(fixtures / SRC), "svd", target_size="6x", allowed_bits=(3, 2), output=api), api)
    assert api.read_bytes() == out.read_bytes()
    for extra in (["--target-size", "6x"], []):
        res = run("compress", fixtures / SRC, "--outer", "svd", "--plan", *extra, "--bits", "nf4")
        assert "bits nf4;" in res.stdout, res.output


def test_ratio_needs_a_known_input_size(fixtures):
    import dataclasses
    adapter = dataclasses.replace(lc.load_adapter(fixtures / SRC), source="")
    with pytest.raises(ConfigError, match="ratio"):
        lc.compress(adapter, "svd", target_size="4x")


def test_quantized_error_is_exact(fixtures):
    adapter = lc.load_adapter(fixtures / SRC)
    mini = lc.compress(adapter, "svd", bits=3, rank=5)
    for m in mini.modules():
        o = adapter.module(m.name)
        B2, A2 = m.factors()
        rel = difference_norm(o.up.double(), o.down.double(), B2, A2) / float(
            torch.linalg.matrix_norm(o.up.double() @ o.down.double()))
        assert m.fidelity["rel_error"] == pytest.approx(rel, rel=5.01e-4)  # recorded to 4 significant digits


# ---------------------------------------------------------------- the planning fast path

def _rounded_cases():
    rng = np.random.default_rng(3)
    for shape in [(70, 6), (6, 50), (300, 16), (16, 1000), (5, 5), (130, 3), (3, 1000)]:
        for group in (16, 64, 7):
            yield rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 2, shape), group
    for scale in (1e-9, 1e-7, 3e-6, 1e-5):  # groups whose float16 scale is subnormal (clamped codes)
        M = rng.standard_normal((12, 300)) * scale
        M[:, ::7] *= 1e-3
        yield M, 16


def test_planning_rounding_is_quants_bit_for_bit():
    """budget.rounded_vectors (torch, the plan) gives exactly quant.rounded_widths' values (numpy,
    what the writer encodes) at every width, in either vector orientation."""
    widths = quant.WIDTHS
    for M, group in _rounded_cases():
        ref = quant.rounded_widths(M, widths, group)
        got = budget.rounded_vectors(M, widths, group)
        tall = M.shape[0] >= M.shape[1]
        for r, g in zip(ref, got):
            assert np.array_equal(r.T if tall else r, g.numpy())
        if tall:  # by rows: the vectors a wide matrix has
            rows = budget.rounded_vectors(M.T.copy(), widths, group, by_rows=True)
            assert all(np.array_equal(r.T, g.numpy()) for r, g in zip(ref, rows))


def test_planning_codes_are_quantizes():
    """The codes and scales the plan keeps (rounded_vectors' codes_out) are quant.quantize's, and a
    recipe's encoded factors are quant.encode_many's bytes and values at every rank they cover."""
    for M, group in _rounded_cases():
        codes: dict = {}
        budget.rounded_vectors(M, quant.WIDTHS, group, codes_out=codes)
        assert sorted(map(str, codes)) == sorted(str(b) for b in quant.WIDTHS if b != 16)
        for bits, (q, s) in codes.items():
            ref_q, ref_s = quant.quantize(M, bits, group)
            assert q.dtype == np.int8 and np.array_equal(q, ref_q) and np.array_equal(s, ref_s)
    g = torch.Generator().manual_seed(2)
    B, A = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(6, 30, generator=g, dtype=torch.float64)
    c = budget.error_curve("m", B, A, 1.0, bits=(3, "nf4"), group=16, exact_bits=(3, "nf4"), max_k=4)
    assert not c.factors.codes  # kept only when asked
    c = budget.error_curves([budget.CurveInput("m", B, A, 1.0, exact_bits=(3, "nf4"), max_k=4)], bits=(3, "nf4"),
                            group=16, keep_codes=lambda codes: codes)[0]
    F1, F2 = c.factors.factors(B, A)
    for bits in (3, "nf4"):
        for k in range(1, 5):
            blob, (Q1, Q2) = c.factors.encoded(bits, k, (40, 30), 16)
            ref, (R1, R2) = quant.encode_many([F1[:, :k], F2[:k]], bits, 16)
            assert blob == ref and np.array_equal(Q1, R1) and np.array_equal(Q2, R2)
        assert c.factors.encoded(bits, 5, (40, 30), 16) is None  # beyond the rows the plan rounded
    one = c.factors.only("nf4", 2)
    assert list(one.codes) == ["nf4"]
    assert one.encoded("nf4", 2, (40, 30), 16)[0] == c.factors.encoded("nf4", 2, (40, 30), 16)[0]
    assert one.encoded("nf4", 3, (40, 30), 16) is None and one.encoded(3, 1, (40, 30), 16) is None
    assert c.factors.encoded(3, 4, (40, 4), 16) is None  # at rank in_features F2 is stored by columns


def test_code_arena_copies_until_full():
    from lora_convert.convert import _Arena
    arena = _Arena(64)
    a, b = np.arange(5, dtype=np.int8), np.array([1.5, -2.0, 3.0], dtype=np.float16)
    got = arena.take([a, b])
    assert np.array_equal(got[0], a) and np.array_equal(got[1], b) and got[1].dtype == np.float16
    a[0] = 9  # copies, not views
    assert got[0][0] == 0 and arena.used == 16
    assert arena.take([np.zeros(49, dtype=np.int8)]) is None and arena.used == 16  # 16 + 56 > 64: refused whole
    assert arena.take([np.zeros((6, 8), dtype=np.int8)])[0].shape == (6, 8) and arena.used == 64


def test_plan_frees_its_code_buffer(fixtures, tmp_path, monkeypatch):
    """Once compress has planned, only each module's chosen codes remain: the buffer the plan kept
    every module's codes in is freed when compress returns, not when the cycle collector runs."""
    import gc
    import weakref

    from lora_convert import convert
    adapter = lc.load_adapter(_wide_rank_adapter(fixtures, tmp_path / "r32"))
    arenas, init = [], convert._Arena.__init__

    def recorded(self, size):
        init(self, size)
        arenas.append(weakref.ref(self))
    monkeypatch.setattr(convert._Arena, "__init__", recorded)
    gc.disable()
    try:
        mini = lc.compress(adapter, "svd", target_size="40x", output=tmp_path / "a.safetensors")
        assert arenas and all(r() is None for r in arenas)
    finally:
        gc.enable()
    lc.save(mini, tmp_path / "a.safetensors")


def test_float16_rounding_matches_numpy_at_ties_and_subnormals():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 0x7BFF, 20000).astype(np.uint16).view(np.float16).astype(np.float64)  # finite halves
    up = np.nextafter(h.astype(np.float16), np.float16(np.inf)).astype(np.float64)
    mid = (h + up) / 2  # exact ties, and their neighbours either side
    x = np.concatenate([h, mid, np.nextafter(mid, 0), np.nextafter(mid, 1e9), -mid, [0.0, -0.0, 2.0 ** -26, 65504.0],
                        rng.standard_normal(20000) * 10.0 ** rng.uniform(-12, 4, 20000)])
    x = x[np.abs(x) <= 65504]
    assert np.array_equal(budget._fp16_values(torch.from_numpy(x.copy())).numpy(), x.astype(np.float16).astype(np.float64))


def test_square_input_factor_curve_is_the_written_rounding():
    """A module reading fewer inputs than its rank: F2[:k] is wide below full rank (groups along
    its rows) and square at full rank (groups along its columns); the curve follows the writer."""
    B, A = low_rank(40, 8, 8, 5, decay=0.8)
    curve = error_curve("m", B, A, 1.0, bits=(3, 4, 8), group=4)
    F1, F2, _ = budget.svd_factors(B, A)
    assert F2.shape == (8, 8)
    for o in curve.options:
        _, (Q1, Q2) = quant.encode_many([F1[:, :o.k], F2[:o.k]], o.bits, 4)
        diff = B @ A - torch.from_numpy(Q1).double() @ torch.from_numpy(Q2).double()
        assert o.err2 == pytest.approx(float((diff ** 2).sum()), rel=1e-9, abs=1e-13)


def test_svd_recipe_recomputes_the_planned_factors():
    """The fit after a plan recomputes the plan's factors bit for bit from B and A alone."""
    B, A = low_rank(90, 70, 8, 6)
    B32, A32 = B.float(), A.float()
    for max_k in (None, 3):
        curve = error_curve("m", B32, A32, 1.0, bits=(4,), group=16, max_k=max_k)
        F1, F2 = curve.factors.factors(B32, A32)
        assert F1.shape[1] == F2.shape[0] == (max_k or 8)
        Q1, Q2 = quant.rounded(F1, 4, 16, np.float64), quant.rounded(F2, 4, 16, np.float64)
        for o in curve.options:  # the curve's errors are those of these very factors
            diff = B32.double() @ A32.double() - torch.from_numpy(Q1[:, :o.k] @ Q2[:o.k])
            assert o.err2 == pytest.approx(float((diff ** 2).sum()), rel=1e-9)


def _partial_modules():
    g = torch.Generator().manual_seed(11)
    mods = []
    for i, (out_f, in_f, r, decay) in enumerate([(96, 64, 12, 0.5), (64, 128, 16, 0.8), (160, 96, 8, 0.95),
                                                 (80, 80, 16, 0.7), (128, 64, 12, 0.3)]):
        B = torch.randn(out_f, r, generator=g, dtype=torch.float64) * decay ** torch.arange(r) * (1 + i)
        mods.append((f"m{i}", B, torch.randn(r, in_f, generator=g, dtype=torch.float64)))
    return mods


def test_partial_curves_bound_and_keep_the_hull():
    """Pending options lie below their true error and bytes; every certain step of a partial curve
    is a step of the complete curve's hull."""
    bits = (3, 4, 8, 16)
    for name, B, A in _partial_modules():
        full = error_curve(name, B, A, 0.7, bits=bits, group=16)
        exact = {(o.k, o.bits): o for o in full.options}
        for max_k in (1, 2, 4, 7):
            part = error_curve(name, B, A, 0.7, bits=bits, group=16, exact_bits=(3, 4), max_k=max_k)
            assert part.pending and len(part.options) + len(part.pending) == len(full.options)
            for o in part.options:
                assert o.err2 == pytest.approx(exact[o.k, o.bits].err2, rel=1e-9, abs=1e-12 * full.energy)
            for p in part.pending:
                assert p.nbytes <= exact[p.k, p.bits].nbytes and p.err2 <= exact[p.k, p.bits].err2
            steps = [(o.k, o.bits) for o in part.hull[:part.certain + 1]] if part.certain >= 0 else []
            assert steps == [(o.k, o.bits) for o in full.hull[:len(steps)]]


def test_pending_bounds_count_the_rounding_so_far():
    """A pending option of a width whose first ranks are computed is bounded through the residual
    of those ranks (their rounding noise included), not by the Eckart–Young floor alone: its bound
    lies between the floor and the true error, and far nearer the true error."""
    bits = (3, 4, 8, 16)
    gap_floor = gap_bound = 0.0
    for name, B, A in _partial_modules():
        s2 = 0.7 ** 2
        full = error_curve(name, B, A, 0.7, bits=bits, group=16)
        exact = {(o.k, o.bits): o.err2 for o in full.options}
        sigma2 = np.linalg.svd((B @ A).numpy(), compute_uv=False) ** 2
        for max_k in (1, 2, 4):
            part = error_curve(name, B, A, 0.7, bits=bits, group=16, exact_bits=(3, 4), max_k=max_k)
            for p in part.pending:
                floor = s2 * sigma2[p.k:].sum()
                assert floor * (1 - 1e-6) - 1e-9 * full.energy <= p.err2 <= exact[p.k, p.bits]
                if p.bits in (3, 4) and p.k <= max_k + 2:
                    gap_floor += exact[p.k, p.bits] - floor
                    gap_bound += exact[p.k, p.bits] - p.err2
    assert gap_bound < 0.5 * gap_floor


def test_pending_bounds_hold_for_square_and_lopsided_factors():
    """The residual bound stays below the true error where the input-side factor is square at full
    rank (stored by columns, not by the rows rounded so far) and where B and A differ in size by
    many orders (the same B·A: the Gram matrices' round-off must not eat the slack)."""
    cases = []
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        cases.append((torch.randn(256, 8, generator=g, dtype=torch.float64),
                      torch.randn(8, 8, generator=g, dtype=torch.float64), (8,), 64, 7))
    rng = np.random.default_rng(1)
    B0, A0 = rng.standard_normal((96, 32)), rng.standard_normal((32, 256))
    for c in (1.0, 1e-3, 1e-5, 1e-7):
        cases.append((torch.from_numpy(B0 * c), torch.from_numpy(A0 / c), (4, 16), 16, 8))
    for B, A, bits, group, max_k in cases:
        full = error_curve("m", B, A, 1.0, bits=bits, group=group)
        exact = {(o.k, o.bits): o.err2 for o in full.options}
        part = error_curve("m", B, A, 1.0, bits=bits, group=group, exact_bits=bits, max_k=max_k)
        assert part.pending
        for p in part.pending:
            assert p.err2 <= exact[p.k, p.bits], (p, exact[p.k, p.bits])


def test_rank_deficient_adapter_plans_to_its_numerical_rank(fixtures, tmp_path):
    """An adapter whose factors have fewer independent columns than its nominal rank (e.g. an
    inner rank zero-padded back to r) gets a plan: a partial curve that already reaches its
    numerical rank is computed whole when the allocation asks for more. The file is the one a
    complete plan writes."""
    from lora_convert import convert
    src = _wide_rank_adapter(fixtures, tmp_path / "r32")
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(src / "adapter_model.safetensors"))
    for key, t in tensors.items():  # 6 live directions of 32
        if key.endswith("lora_A.weight"):
            t[6:] = 0
        else:
            t[:, 6:] = 0
    save_file(tensors, str(src / "adapter_model.safetensors"))
    adapter = lc.load_adapter(src)
    for target in ("25x", "8x"):
        a, b = tmp_path / f"a{target}.safetensors", tmp_path / f"b{target}.safetensors"
        lc.save(lc.compress(adapter, "svd", target_size=target, output=a), a)
        complete_plan = convert._plan
        convert._plan = lambda *args, partial=False: complete_plan(*args)
        try:
            lc.save(lc.compress(adapter, "svd", target_size=target, output=b), b)
        finally:
            convert._plan = complete_plan
        assert a.read_bytes() == b.read_bytes()


def test_partial_allocation_is_the_complete_allocation():
    """allocate() on partial curves, completing those it walks off, picks exactly what it picks
    on the complete curves, at budgets that need no completion and at budgets that need many."""
    bits = (3, 4, 8, 16)
    mods = _partial_modules()
    full = [error_curve(n, B, A, 1.0, bits=bits, group=16) for n, B, A in mods]
    by_name = {c.name: c for c in full}
    asked = []

    def complete(curves):
        asked.extend(c.name for c in curves)
        return [by_name[c.name] for c in curves]

    lo = sum(c.hull[0].nbytes for c in full)
    hi = sum(c.hull[-1].nbytes for c in full)
    for max_k in (1, 2, 5):
        part = [error_curve(n, B, A, 1.0, bits=bits, group=16, exact_bits=(3, 4), max_k=max_k) for n, B, A in mods]
        for budget_bytes in np.linspace(lo, hi, 9).astype(int):
            asked.clear()
            for balance in (1.0, budget.BALANCE):
                want = allocate(full, int(budget_bytes), None, 0, balance=balance)
                got = allocate(part, int(budget_bytes), None, 0, complete=complete, balance=balance)
                # the same options; a curve computed to another rank sums its errors in another order
                assert {n: (o.k, o.bits, o.nbytes) for n, o in got.choice.items()} == \
                    {n: (o.k, o.bits, o.nbytes) for n, o in want.choice.items()}
                assert got.err2 == pytest.approx(want.err2, rel=1e-12)
        assert asked  # the largest budgets walked off the partial curves
        want = allocate(full, min_fidelity=0.999)
        got = allocate(part, min_fidelity=0.999, complete=complete)
        assert [(o.k, o.bits) for o in got.choice.values()] == [(o.k, o.bits) for o in want.choice.values()]
    with pytest.raises(ValueError, match="partial"):
        allocate(part, hi)  # no way to complete them


def test_next_step_bound_is_not_an_ulp_below_the_step():
    """The bound a partial curve queues for its uncertain next step rounds like the step's own gain:
    an exact tie against another module's identical step is broken as the complete curves break it
    (balance < 1 weighs gains, and weight·(d/e) can round an ulp below weight·d/e)."""
    import random
    rng, E = random.Random(1), 1000.0
    w = E ** (budget.BALANCE - 1.0)
    while True:  # a step whose two roundings differ
        e0 = rng.uniform(100, 900)
        e1, d = rng.uniform(1, e0 - 1), rng.randint(3, 500)
        if w * ((e0 - e1) / d) < w * (e0 - e1) / d:
            break
    n0, n1, nbp = 100, 100 + d, 100 + d // 2
    line = e0 + (e1 - e0) * (nbp - n0) / (n1 - n0)
    lb = line + 0.5e-9 * E  # a pending option just above the step's line keeps the step uncertain
    full = [Option(1, 3, n0, e0), Option(2, 3, n1, e1), Option(1, 8, nbp, lb + 1e-3)]
    part = Curve("x", E, full[:2], pending=[Option(1, 8, nbp, lb)])
    assert part.certain == 0
    other = Curve("y", E, list(full))
    budget_bytes = 2 * n0 + d  # room for one of the two tied steps
    want = allocate([Curve("x", E, full), other], budget_bytes, balance=budget.BALANCE)
    got = allocate([part, other], budget_bytes, complete=lambda cs: [Curve("x", E, full) for _ in cs],
                   balance=budget.BALANCE)
    assert got.choice == want.choice


def _wide_rank_adapter(fixtures, dest, r=32):
    """The fixture's modules at rank r (decaying spectra, fp32): small budgets leave most of
    each curve to the partial plan."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    src = fixtures / SRC
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for key, t in load_file(str(src / "adapter_model.safetensors")).items():
        if key.endswith("lora_A.weight"):
            tensors[key] = torch.randn(r, t.shape[1], generator=g)
        else:
            tensors[key] = torch.randn(t.shape[0], r, generator=g) * 0.85 ** torch.arange(r)
    dest.mkdir()
    save_file(tensors, str(dest / "adapter_model.safetensors"))
    config = json.loads((src / "adapter_config.json").read_text())
    (dest / "adapter_config.json").write_text(json.dumps({**config, "r": r, "lora_alpha": 2 * r}))
    shutil.copy(src / "README.md", dest / "README.md")
    return dest


def test_partial_plan_writes_the_same_file(fixtures, tmp_path, monkeypatch):
    """compress --target-size plans partial curves; the file is byte for byte the one a complete
    plan gives, whether the allocation stays within the partial curves or has to complete some."""
    from lora_convert import convert
    adapter = lc.load_adapter(_wide_rank_adapter(fixtures, tmp_path / "r32"))
    complete_plan = convert._plan
    seen = []

    def watched(*args, partial=False):
        curves, fixed, complete, heads = complete_plan(*args, partial=partial)
        seen.append(sum(1 for c in curves if c.pending))

        def completing(cs):
            seen.append(-len(cs))
            return complete(cs)
        return curves, fixed, completing, heads

    for target in ("40x", "60x"):
        a, b = tmp_path / f"a{target}.safetensors", tmp_path / f"b{target}.safetensors"
        monkeypatch.setattr(convert, "_plan", watched)
        lc.save(lc.compress(adapter, "svd", target_size=target, output=a), a)
        monkeypatch.setattr(convert, "_plan", lambda *args, partial=False: complete_plan(*args))
        lc.save(lc.compress(adapter, "svd", target_size=target, output=b), b)
        assert a.read_bytes() == b.read_bytes()
    assert seen[0] == len(adapter.module_names)  # every curve started partial


def test_writer_packs_the_plans_codes(fixtures, tmp_path, monkeypatch):
    """A budgeted compress writes each module from the codes its plan rounded the factors to,
    without reading the module again; without room for the codes it encodes with the group scales
    the plan searched (no second search); the file is byte for byte the one a search at write
    time gives."""
    from lora_convert import convert
    adapter = lc.load_adapter(_wide_rank_adapter(fixtures, tmp_path / "r32"))
    given, reads = [], []
    real, load = quant.quantize, adapter.load_module
    monkeypatch.setattr(quant, "quantize", lambda M, bits, group, scales=None:
                        given.append(scales is not None and quant.clipped(bits)) or real(M, bits, group, scales))
    monkeypatch.setattr(adapter, "load_module", lambda name: reads.append(name) or load(name))
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    mini = lc.compress(adapter, "svd", target_size="40x", output=files[0])
    reads.clear()
    lc.save(mini, files[0])
    # packed from the plan's codes without a read, but for modules whose SVD the plan did not keep
    # (square full-rank factors: Householder QR)
    assert len(reads) < len(adapter.module_names) and len(given) == 2 * len(reads)
    monkeypatch.setattr(convert, "CODES_BYTES", 0)
    mini = lc.compress(adapter, "svd", target_size="40x", output=files[1])
    reads.clear()
    lc.save(mini, files[1])
    assert len(reads) == len(adapter.module_names) and any(given)  # read and encoded again, with the plan's scales
    monkeypatch.setattr(budget.SvdRecipe, "scales_at", lambda self, bits, k, n: None)
    given.clear()
    lc.save(lc.compress(adapter, "svd", target_size="40x", output=files[2]), files[2])
    assert given and not any(given)
    assert files[0].read_bytes() == files[1].read_bytes() == files[2].read_bytes()


def test_completion_reaches_every_rank(monkeypatch, fixtures, tmp_path):
    """A partial plan that starts too short is completed where the allocation needs it, and the
    result is still the complete plan's."""
    from lora_convert import convert
    adapter = lc.load_adapter(_wide_rank_adapter(fixtures, tmp_path / "r32"))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    lc.save(lc.compress(adapter, "svd", target_size="25x", output=b), b)
    monkeypatch.setattr(convert, "PARTIAL_SPAN", 0)  # rank PARTIAL_EXTRA at most: the allocation walks off it
    completed = []
    real = budget._completed
    monkeypatch.setattr(budget, "_completed", lambda curves, complete, needed: completed.append(len(needed)) or
                        real(curves, complete, needed))
    lc.save(lc.compress(adapter, "svd", target_size="25x", output=a), a)
    assert completed and a.read_bytes() == b.read_bytes()


def test_curves_of_modules_planned_together_are_their_own():
    """error_curves rounds the vectors of equal length of several modules' factors in one call:
    every curve, partial or whole, whitened or with random outers, is exactly error_curve's alone."""
    from lora_convert import calibrated
    from lora_convert.budget import CurveInput, error_curves

    mods = _partial_modules()
    g = torch.Generator().manual_seed(5)
    M = torch.randn(64, 64, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(M @ M.T / 64 + torch.eye(64, dtype=torch.float64)).numpy()
    U, V = torch.randn(96, 10, generator=g, dtype=torch.float64), torch.randn(12, 64, generator=g, dtype=torch.float64)
    inputs = [CurveInput(n, B, A, 0.5 + i, exact_bits=(3, 4) if i % 2 else None, max_k=3 if i % 2 else None)
              for i, (n, B, A) in enumerate(mods)]
    Bs, As = torch.randn(40, 16, generator=g, dtype=torch.float64), torch.randn(16, 12, generator=g, dtype=torch.float64)
    Lt = torch.from_numpy(L)
    inputs += [CurveInput("white", *mods[0][1:], 1.0, whitening=L), CurveInput("random", *mods[0][1:], 1.0, outers=(U, V)),
               CurveInput("again", *mods[0][1:], 2.0),
               CurveInput("square", Bs, As, 1.0),  # rank 12 = in_features: the full-rank F2 is stored by columns
               CurveInput("feedback", *mods[4][1:], 1.0, whitening=L,  # rounded with error feedback, as a floor plans
                          input_rounding=calibrated.input_rounding(Lt, None))]
    bits = (3, 4, "nf4", 8, 16)
    together = error_curves(inputs, bits=bits, group=16)
    for x, c in zip(inputs, together):
        alone = error_curve(x.name, x.B, x.A, x.scale, bits=bits, group=16, outers=x.outers, whitening=x.whitening,
                            input_rounding=x.input_rounding, exact_bits=x.exact_bits, max_k=x.max_k)
        assert (c.name, c.energy, c.options, c.pending) == (alone.name, alone.energy, alone.options, alone.pending)
    assert any(c.pending for c in together) and all(c.options for c in together)
