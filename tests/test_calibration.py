"""Calibration statistics from a base model's forward pass, and compress fitted to module outputs."""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from click.testing import CliRunner  # noqa: E402

import lora_convert as lc  # noqa: E402
from lora_convert.cli import main  # noqa: E402
from lora_convert.recovery import data as D  # noqa: E402
from lora_convert.recovery.calibration import (calibration_stats, collect_input_stats,  # noqa: E402
                                               linear_inputs)

from helpers.models import tiny_llama  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = "the cat sat on a mat while dogs ran in fields of green grass and birds sang over quiet hills".split()



def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + list("abcdefghijklmnopqrstuvwxyz .,"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_teacher(model, path: Path, r: int = 4, seed: int = 1) -> None:
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    pm.save_pretrained(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    model = tiny_llama()
    model.save_pretrained(root / "base")
    char_tokenizer().save_pretrained(root / "base")
    make_teacher(model, root / "teacher")
    rng = random.Random(0)
    (root / "calib.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
                                              for _ in range(60)) + "\n", encoding="utf-8")
    return root


def batches_for(setup, max_len=24, batch_size=4):
    tok = char_tokenizer()
    seqs = D.tokenize(tok, D.read_texts(setup / "calib.txt"), max_len, pack=False)  # ragged: padding to mask out
    return D.eval_batches(seqs, batch_size, tok.pad_token_id)


def dense_moments(model, paths: dict[str, str], batches) -> dict[str, torch.Tensor]:
    """Reference: every module's inputs at valid positions, gathered and multiplied out densely."""
    xs = {n: [] for n in paths}
    handles = []
    state = {}
    for name, path in paths.items():
        def hook(_m, args, name=name):
            xs[name].append(args[0][state["mask"]].double())
        handles.append(model.get_submodule(path).register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            state["mask"] = b["attention_mask"].bool()
            model(**b)
    for h in handles:
        h.remove()
    out = {}
    for n, parts in xs.items():
        X = torch.cat(parts)
        out[n] = X.T @ X / X.shape[0]
    return out


def test_moments_match_dense_reference_and_inputs_are_shared(setup):
    model = tiny_llama()
    adapter = lc.load_adapter(setup / "teacher")
    modules = linear_inputs(adapter, model)
    batches = batches_for(setup)
    stats = collect_input_stats(model, modules, batches)
    ref = dense_moments(model, {n: p for n, (p, _) in modules.items()}, batches)
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert set(stats) == set(modules)
    for name, st in stats.items():
        torch.testing.assert_close(st.second_moment(), ref[name], rtol=1e-10, atol=1e-12)
        assert st.tokens == n_tokens
        L = st.factor()
        assert L.shape == (st.features, st.features) and torch.equal(L, torch.tril(L))
    prefixes = {n.split("self_attn.")[0] for n in stats if "self_attn." in n}
    assert len(prefixes) == 2
    for prefix in prefixes:
        src = {n.removeprefix(prefix): st.source.removeprefix(prefix) for n, st in stats.items() if n.startswith(prefix)}
        # q, k, v read one normed hidden state, gate and up another: one statistic each
        assert src["self_attn.k_proj"] == src["self_attn.v_proj"] == src["self_attn.q_proj"] == "self_attn.q_proj"
        assert src["mlp.up_proj"] == src["mlp.gate_proj"] == "mlp.gate_proj"
        assert src["self_attn.o_proj"] == "self_attn.o_proj" and src["mlp.down_proj"] == "mlp.down_proj"


def test_layer_by_layer_passes_spill_and_agree(setup, tmp_path):
    model = tiny_llama()
    adapter = lc.load_adapter(setup / "teacher")
    modules = linear_inputs(adapter, model)
    batches = batches_for(setup)
    whole = collect_input_stats(model, modules, batches)
    calls = []
    split = collect_input_stats(model, modules, batches, max_bytes=1, spill_dir=str(tmp_path),
                                progress=lambda g, n: calls.append((g, n)))
    assert {n for _, n in calls} == {2}  # one pass per layer of the 2-layer model
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # each pass spilled to disk
    for name in whole:
        torch.testing.assert_close(split[name].second_moment(), whole[name].second_moment(), rtol=1e-12, atol=1e-14)
        assert split[name].source == whole[name].source


def output_error(adapter, mini, stats, name) -> float:
    """RMS output change of one module on the calibration data (dense reference from C)."""
    o, m = adapter.module(name), mini.module(name)
    B2, A2 = m.factors()
    E = (o.scale * o.up.double() @ o.down.double() - m.scale * B2.double() @ A2.double())
    return float(torch.trace(E @ stats[name].second_moment() @ E.T)) ** 0.5


@pytest.mark.parametrize("outer,kw", [("svd", {"rank": 1}), ("svd", {"rank": 2}),
                                      ("random", {"outer_dim": 16, "rank": 2, "seed": 3})])
def test_calibrated_compress_lowers_output_error(setup, tmp_path, outer, kw):
    model = tiny_llama()
    adapter = lc.load_adapter(setup / "teacher")
    stats = collect_input_stats(model, linear_inputs(adapter, model), batches_for(setup))
    plain = lc.compress(adapter, outer, dtype="fp32", **kw)
    cal = lc.compress(adapter, outer, dtype="fp32", calibration=stats, **kw)
    lc.save(cal, tmp_path / "mini")
    loaded = lc.load(tmp_path / "mini")
    report = lc.verify(tmp_path / "mini", setup / "teacher")
    wins = 0
    for name in adapter.module_names:
        e_plain, e_cal = output_error(adapter, plain, stats, name), output_error(adapter, loaded, stats, name)
        assert e_cal <= e_plain * (1 + 1e-6), name
        wins += e_cal < 0.97 * e_plain
        m = loaded.module(name)
        ref = float(torch.trace(adapter.module(name).scale ** 2 * (adapter.module(name).up.double()
                    @ adapter.module(name).down.double()) @ stats[name].second_moment()
                    @ (adapter.module(name).up.double() @ adapter.module(name).down.double()).T)) ** 0.5
        # the recorded calibrated error is the output error (up to the damping of the factor)
        assert m.fidelity["calibrated_rel_error"] == pytest.approx(e_cal / ref, rel=0.1, abs=1e-3)
        assert m.inner_rank == kw["rank"]
        # the recorded weight-space error is what verify --against measures
        row = next(r for r in report.modules if r.name == name)
        assert m.fidelity["rel_error"] == pytest.approx(row.rel_error, rel=1e-4, abs=1e-6)
    assert wins >= len(adapter.module_names) // 2


def test_wrong_base_model_is_refused(setup, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    adapter = lc.load_adapter(setup / "teacher")
    with pytest.raises(lc.BadInputError, match="not its base model"):
        linear_inputs(adapter, other)
    gpt = tiny_llama(layers=1)  # layer 1 of the adapter is missing
    with pytest.raises(lc.BadInputError, match="wrong base model"):
        linear_inputs(adapter, gpt)


def test_bad_calibration_text_fails_before_the_model_loads(setup, tmp_path):
    adapter = lc.load_adapter(setup / "teacher")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    for path, why in ((empty, "no text samples"), (binary, "not UTF-8"), (tmp_path / "none.txt", "no such")):
        with pytest.raises(lc.BadInputError, match=why):
            calibration_stats(adapter, str(path), str(tmp_path / "no-model-here"))


def test_cli_compress_with_calibration(setup, tmp_path):
    out = tmp_path / "mini"
    args = ["compress", str(setup / "teacher"), "-o", str(out), "--outer", "svd", "--rank", "2", "--dtype", "fp32",
            "--calibration", str(setup / "calib.txt"), "--base", str(setup / "base"), "--device", "cpu",
            "--calibration-max-len", "24", "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    mini = lc.load(out)
    assert all("calibrated_rel_error" in mini.module(n).fidelity for n in mini.module_names)
    assert json.loads(res.stdout)["output"] == str(out)


def test_cli_calibration_bad_inputs_are_one_line(setup, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    other = tmp_path / "other-base"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    cases = [(["--calibration", str(empty), "--base", str(setup / "base")], "no text samples"),
             (["--calibration", str(setup / "calib.txt"), "--base", str(other)], "not its base model"),
             (["--calibration", str(setup / "calib.txt")], "pass --base"),
             (["--base", str(setup / "base")], "--calibration")]
    for extra, why in cases:
        out = tmp_path / "out"
        res = CliRunner().invoke(main, ["compress", str(setup / "teacher"), "-o", str(out), "--outer", "svd",
                                        "--device", "cpu", *extra])
        assert res.exit_code == 2, res.output
        assert res.output.count("\n") == 1 and why in res.output, res.output
        assert not out.exists()


# ------------------------------------------------------------------ eval: effect kept

def summary(**kw) -> dict:
    s = {"loss_base": 3.0, "loss_teacher": 2.0, "loss_student": 2.5, "kl_base": 0.8, "kl_student": 0.2,
         "agree_base": 0.5, "agree_student": 0.9, "retained": 0.5, "tokens": 100}
    s.update(kw)
    return s


def test_effect_kept_is_the_kl_share():
    from lora_convert.recovery.run import with_effect_kept

    s = with_effect_kept(summary())
    assert s["effect_kept"] == pytest.approx(0.75) and s["teacher_raises_loss"] is False
    raised = with_effect_kept(summary(loss_teacher=3.4, loss_student=3.1, retained=-0.25))
    assert raised["teacher_raises_loss"] is True and raised["effect_kept"] == pytest.approx(0.75)
    assert with_effect_kept({"mse_base": 2.0, "mse_student": 0.5, "retained": 0.75, "tokens": 5})["effect_kept"] == 0.75


def test_format_eval_reports_effect_kept_and_when_the_loss_share_is_meaningless():
    from lora_convert.recovery.run import format_eval, with_effect_kept

    text = format_eval(with_effect_kept(summary()), "t")
    assert "keeps 75.0% of the teacher's effect" in text and "keeps 50.0% of the teacher's loss improvement" in text
    text = format_eval(with_effect_kept(summary(loss_teacher=3.4, loss_student=3.1, retained=-0.25)), "t")
    assert "keeps 75.0% of the teacher's effect" in text and "meaningless" in text and "-25.0%" not in text


def test_eval_command_reports_effect_kept(setup, tmp_path):
    pytest.importorskip("accelerate")
    for rank, lo, hi in ((4, 1 - 1e-4, 1 + 1e-4), (1, -1.0, 0.999)):  # full rank: exact; rank 1: a share
        lc.save(lc.compress(lc.load_adapter(setup / "teacher"), "svd", rank=rank, dtype="fp32"), tmp_path / f"m{rank}")
        res = CliRunner().invoke(main, ["eval", str(tmp_path / f"m{rank}"), "--teacher", str(setup / "teacher"),
                                        "--base", str(setup / "base"), "--data", str(setup / "calib.txt"),
                                        "--max-len", "24", "--device", "cpu", "--json"])
        assert res.exit_code == 0, res.output
        doc = json.loads(res.stdout[res.stdout.index("{"):])
        assert doc["effect_kept"] == pytest.approx(1 - doc["kl_student"] / doc["kl_base"])
        assert lo <= doc["effect_kept"] <= hi


# ---------------------------------------------------------------- calibration with quantized storage

def total_output_error2(adapter, mini, stats) -> float:
    return sum(output_error(adapter, mini, stats, n) ** 2 for n in adapter.module_names)


@pytest.fixture(scope="module")
def tiny_stats(setup):
    model = tiny_llama()
    adapter = lc.load_adapter(setup / "teacher")
    return adapter, collect_input_stats(model, linear_inputs(adapter, model), batches_for(setup))


@pytest.mark.parametrize("outer,kw", [("svd", {"rank": 2, "bits": 3}), ("svd", {"rank": 3, "bits": 4}),
                                      ("random", {"outer_dim": 24, "rank": 3, "bits": 3, "seed": 3}),
                                      ("svd", {"rank": 3, "bits": "nf4"})])
def test_calibrated_quantized_beats_plain_quantized_at_equal_bytes(setup, tiny_stats, tmp_path, outer, kw):
    adapter, stats = tiny_stats
    lc.save(lc.compress(adapter, outer, **kw), tmp_path / "plain")
    lc.save(lc.compress(adapter, outer, calibration=stats, **kw), tmp_path / "cal")
    plain, cal = lc.load(tmp_path / "plain"), lc.load(tmp_path / "cal")
    for name in adapter.module_names:  # the same rank and width everywhere: the same packed bytes
        assert (cal.module(name).inner_rank, cal.module(name).bits) == (plain.module(name).inner_rank,
                                                                        plain.module(name).bits)
    assert total_output_error2(adapter, cal, stats) < 0.9 * total_output_error2(adapter, plain, stats)
    report = lc.verify(tmp_path / "cal", setup / "teacher")
    for name in adapter.module_names:
        m, o = cal.module(name), adapter.module(name)
        assert m.bits is not None and m.inner_rank == kw["rank"]
        # recorded figures: weight-space as verify --against measures it, output-space as the data does
        row = next(r for r in report.modules if r.name == name)
        assert m.fidelity["rel_error"] == pytest.approx(row.rel_error, rel=1e-3, abs=1e-7)  # 4 digits stored
        W = o.scale * o.up.double() @ o.down.double()
        ref = float(torch.trace(W @ stats[name].second_moment() @ W.T)) ** 0.5
        assert m.fidelity["calibrated_rel_error"] == pytest.approx(output_error(adapter, cal, stats, name) / ref,
                                                                   rel=0.1, abs=1e-3)
    stored = lc.verify(tmp_path / "cal")  # the figures in the file, shown with the calibrated share
    assert stored.calibrated_retained is not None and 0 < stored.calibrated_retained < 1
    rows = stored.modules  # the whole-adapter share weighs modules by their weight-space energy
    assert stored.calibrated_retained == pytest.approx(
        1 - sum(r.energy * r.calibrated_rel_error ** 2 for r in rows) / sum(r.energy for r in rows))
    assert stored.as_dict()["summary"]["calibrated_retained"] == stored.calibrated_retained


@pytest.mark.parametrize("bits", [3, "nf4"])
def test_error_feedback_helps_the_input_side_factor(tiny_stats, monkeypatch, bits):
    """The quantized calibrated fit with error feedback against the input moment beats the same fit
    with plain rounding of that factor (same rank, bits and bytes) on the calibration data."""
    from lora_convert import calibrated

    adapter, stats = tiny_stats
    with_ef = lc.compress(adapter, "svd", rank=3, bits=bits, calibration=stats)
    e_ef = total_output_error2(adapter, with_ef, stats)
    monkeypatch.setattr(calibrated, "EF_ROUNDING", False)
    e_rtn = total_output_error2(adapter, lc.compress(adapter, "svd", rank=3, bits=bits, calibration=stats), stats)
    assert e_ef < e_rtn


@pytest.mark.parametrize("outer", ["svd", "random"])
def test_budgeted_calibrated_compress_honours_budget_and_floor(setup, tiny_stats, tmp_path, outer):
    adapter, stats = tiny_stats
    kw = {"outer_dim": 24, "seed": 3} if outer == "random" else {}
    from lora_convert.convert import source_bytes
    budget_bytes = int(source_bytes(str(setup / "teacher")) / 2)  # a tiny adapter: the header is most of it
    mini = lc.compress(adapter, outer, target_size=budget_bytes, calibration=stats, **kw)
    report = lc.save(mini, tmp_path / "small")
    written = sum(f.stat().st_size for f in (tmp_path / "small").iterdir())
    assert written <= budget_bytes
    # a byte budget spends no header bytes on the calibrated figure: its share is measured densely here
    assert report.calibrated_retained is None
    share = calibrated_share(adapter, lc.load(tmp_path / "small"), stats)
    # a calibrated floor is a floor on the calibrated share, met with the fewest bytes along the path
    floor = min(0.9, 0.98 * share)
    report2 = lc.save(lc.compress(adapter, outer, min_fidelity=floor, calibration=stats, **kw), tmp_path / "floor")
    assert report2.calibrated_retained >= floor - 1e-5
    # the reported share is the share on the data (dense reference; the damping of L aside)
    assert calibrated_share(adapter, lc.load(tmp_path / "floor"), stats) == pytest.approx(report2.calibrated_retained,
                                                                                         abs=0.02)


def test_calibrated_budget_allocates_by_weight_and_fits_outputs(setup, tiny_stats, tmp_path):
    """A calibrated --target-size: the budget's curves are the plain (weight-space) ones, each
    module's header entry counted with its calibrated fit's error figure at its longest; the written file honours the budget
    and its modules, fitted to their outputs, beat the plain file's output error. A floor on the
    calibrated share (--min-fidelity, --plan) plans in that share instead."""
    from lora_convert.config import CompressConfig
    from lora_convert.convert import calibrated_whitening, plan_curves, source_bytes
    adapter, stats = tiny_stats
    budget_bytes = int(source_bytes(str(setup / "teacher")) / 2)
    cfg = CompressConfig(outer="svd", target_size=budget_bytes)
    weighted, _ = plan_curves(adapter, cfg, budget_bytes, calibrated_whitening(adapter, stats))
    plain, _ = plan_curves(adapter, cfg, budget_bytes)
    errors = lambda curves: [[(o.k, o.bits, o.err2) for o in c.options] for c in curves]  # noqa: E731
    assert errors(weighted) == errors(plain)
    floored, _ = plan_curves(adapter, cfg, budget_bytes, calibrated_whitening(adapter, stats), floor=True)
    assert errors(floored) != errors(plain)
    with_floor = cfg.replace(min_fidelity=0.5)
    assert errors(plan_curves(adapter, with_floor, budget_bytes, calibrated_whitening(adapter, stats))[0]) == \
        errors(floored)
    assert all(w.nbytes > p.nbytes for cw, cp in zip(weighted, plain) for w, p in zip(cw.options, cp.options))
    lc.save(lc.compress(adapter, cfg, calibration=stats), tmp_path / "cal")
    lc.save(lc.compress(adapter, cfg), tmp_path / "plain")
    sizes = [sum(f.stat().st_size for f in (tmp_path / d).iterdir()) for d in ("cal", "plain")]
    assert sizes[0] <= budget_bytes and sizes[1] <= budget_bytes
    cal, plain_mini = lc.load(tmp_path / "cal"), lc.load(tmp_path / "plain")
    assert total_output_error2(adapter, cal, stats) < total_output_error2(adapter, plain_mini, stats)


def test_calibrated_budget_counts_its_header_within_the_error_figures(setup, tiny_stats, tmp_path):
    """A calibrated byte budget counts each entry exactly but for its error figure (at its longest),
    records the plan's energy figure and no calibrated figure, and refuses a figure longer than it
    counted."""
    from lora_convert import budget
    from lora_convert.budget import allocate
    from lora_convert.calibrated import ERROR_FIGURE_BOUND, budgeted_figure
    from lora_convert.container import short_figure
    from lora_convert.config import CompressConfig
    from lora_convert.convert import calibrated_whitening, plan_curves, source_bytes
    from lora_convert.errors import BadInputError
    adapter, stats = tiny_stats
    budget_bytes = int(source_bytes(str(setup / "teacher")) / 2)
    cfg = CompressConfig(outer="svd", target_size=budget_bytes)
    curves, fixed = plan_curves(adapter, cfg, budget_bytes, calibrated_whitening(adapter, stats), directory=False)
    planned = allocate(curves, budget_bytes, None, fixed, balance=budget.BALANCE)
    out = tmp_path / "m.safetensors"
    lc.save(lc.compress(adapter, cfg, calibration=stats, output=out), out)
    slack = 16 + len(curves) * (len(repr(ERROR_FIGURE_BOUND)) - len("0.0"))
    assert planned.nbytes - slack <= out.stat().st_size <= planned.nbytes <= budget_bytes
    energies = {c.name: c.energy for c in curves}
    for m in lc.load(out).modules():
        assert m.fidelity["energy"] == short_figure(energies[m.name]) and "calibrated_rel_error" not in m.fidelity
    assert budgeted_figure("m", 0.12345) == 0.1235
    for broken in (1.5e8, float("inf"), float("nan")):
        with pytest.raises(BadInputError, match="numerically broken"):
            budgeted_figure("m", broken)


def test_byte_budget_keeps_the_plain_fit_where_statistics_are_missing(setup, tiny_stats, tmp_path):
    """--target-size with statistics for some modules only (as for conv or embedding updates): those
    without get the plain fit, the budget holds; a floor on the calibrated share refuses in one line."""
    from lora_convert.convert import source_bytes
    from lora_convert.errors import BadInputError
    adapter, stats = tiny_stats
    missing = adapter.module_names[0]
    partial = {n: st for n, st in stats.items() if n != missing}
    budget_bytes = int(source_bytes(str(setup / "teacher")) / 2)
    lc.save(lc.compress(adapter, "svd", target_size=budget_bytes, calibration=partial), tmp_path / "part")
    lc.save(lc.compress(adapter, "svd", target_size=budget_bytes, calibration=stats), tmp_path / "all")
    assert sum(f.stat().st_size for f in (tmp_path / "part").iterdir()) <= budget_bytes
    m = lc.load(tmp_path / "part").module(missing)  # the plain fit at its (rank, bits)
    plain = lc.compress(adapter, "svd", rank=m.inner_rank, bits=m.quant["bits"]).module(missing)
    whitened = lc.compress(adapter, "svd", rank=m.inner_rank, bits=m.quant["bits"], calibration=stats).module(missing)
    product = lambda mod: torch.mm(*mod.factors())  # noqa: E731
    assert torch.equal(product(m), product(plain)) and not torch.equal(product(m), product(whitened))
    with pytest.raises(BadInputError, match=f"floor on the calibrated share.*{missing}"):
        lc.compress(adapter, "svd", min_fidelity=0.5, calibration=partial)


def calibrated_share(adapter, mini, stats) -> float:
    """Dense reference of the calibrated share: relative output errors weighted by weight energy."""
    num = den = 0.0
    for n in adapter.module_names:
        o = adapter.module(n)
        W = o.scale * o.up.double() @ o.down.double()
        ref2 = float(torch.trace(W @ stats[n].second_moment() @ W.T))
        energy = float((W ** 2).sum())
        num += energy * output_error(adapter, mini, stats, n) ** 2 / ref2
        den += energy
    return 1 - num / den


def test_cli_calibrated_budget_reports_the_calibrated_share(setup, tmp_path):
    common = ["--calibration", str(setup / "calib.txt"), "--base", str(setup / "base"), "--offline", "--json"]
    res = CliRunner().invoke(main, ["compress", str(setup / "teacher"), "-o", str(tmp_path / "mini"), "--outer", "svd",
                                    "--target-size", "2x", *common])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert "calibrated_retained" not in doc["summary"]  # a byte budget records weight-space figures only
    assert doc["summary"]["compressed_bytes"] <= doc["budget_bytes"]
    text = CliRunner().invoke(main, ["compress", str(setup / "teacher"), "-o", str(tmp_path / "mini2"), "--outer",
                                     "svd", "--target-size", "2x", *common[:-1]])
    assert text.exit_code == 0 and "share above understates it" in text.output
    res = CliRunner().invoke(main, ["compress", str(setup / "teacher"), "-o", str(tmp_path / "floor"), "--outer", "svd",
                                    "--min-fidelity", "0.5", *common])
    assert res.exit_code == 0, res.output
    assert 0.5 <= json.loads(res.stdout)["summary"]["calibrated_retained"] <= 1
    text = CliRunner().invoke(main, ["verify", str(tmp_path / "floor")])
    assert text.exit_code == 0 and "calibrated" in text.output
    plan = CliRunner().invoke(main, ["compress", str(setup / "teacher"), "--outer", "svd", "--plan", "--json",
                                     "--calibration", str(setup / "calib.txt"), "--base", str(setup / "base"),
                                     "--offline"])
    assert plan.exit_code == 0, plan.output
    points = json.loads(plan.stdout)
    assert points["calibrated"] and points["points"][-1]["fidelity"] > points["points"][0]["fidelity"]
    assert points["fidelity"] == "calibrated share"
