"""Training from scratch: chat / labelled data, evaluation during training, early stopping, best-state
export, classification adapters that PEFT loads (tiny models from configs, CPU, no downloads)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")

from click.testing import CliRunner  # noqa: E402

import lora_convert as lc  # noqa: E402
from lora_convert.cli import main  # noqa: E402
from lora_convert.container import MiniModule  # noqa: E402
from lora_convert.recovery import MiniLayer, inject  # noqa: E402
from lora_convert.recovery import data as D  # noqa: E402
from lora_convert.recovery.loop import TrainOptions, make_accelerator, train_inner  # noqa: E402
from lora_convert.recovery.run import DataOptions, ModelOptions, train, train_loss  # noqa: E402

TEMPLATE = ("{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }};{% endfor %}"
            "{% if add_generation_prompt %}<a>{% endif %}")



def char_tokenizer(chat: bool = True, bert: bool = False):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list("abcdefghijklmnopqrstuvwxyz .,<>;"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    if chat:
        out.chat_template = TEMPLATE
    return out


def tiny_llama_dir(path: Path, chat: bool = True) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                      bos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    char_tokenizer(chat).save_pretrained(path)
    return path


def tiny_bert_dir(path: Path) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=128, pad_token_id=0)
    BertModel(cfg).save_pretrained(path)
    char_tokenizer(chat=False).save_pretrained(path)
    return path


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------ data

def test_chat_mask_covers_exactly_the_assistant_turns():
    tok = char_tokenizer()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "ok"}, {"role": "assistant", "content": "bye"}]
    s = D.chat_sample(tok, msgs, 100)
    text = tok.decode(s)
    assert text.replace(" ", "") == "<u>hi;<a>yo;<u>ok;<a>bye;"
    learned = "".join(tok.decode([t]) for t, m in zip(s, s.loss_mask) if m)
    assert learned == "yo;bye;"  # the replies and the template's end-of-turn, not the prompts or role tags
    assert D.chat_sample(tok, msgs, 6) is None  # truncated before any reply token


def test_prompt_completion_without_a_chat_template_is_prompt_plus_reply_and_eos():
    tok = char_tokenizer(chat=False)
    s = D.chat_sample(tok, [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}], 50)
    assert list(s.loss_mask) == [0, 0, 1, 1, 1] and s[-1] == tok.eos_token_id
    with pytest.raises(lc.BadInputError, match="no chat template"):
        D.chat_sample(tok, [{"role": "system", "content": "x"}, {"role": "user", "content": "a"},
                            {"role": "assistant", "content": "b"}], 50)


def test_read_samples_kinds_and_errors(tmp_path):
    chat = D.read_samples(jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "completion": "b"},
                                                       {"messages": [{"role": "user", "content": "x"},
                                                                     {"role": "assistant", "content": "y"}]}]))
    assert chat.kind == "chat" and chat.rows[0][1] == {"role": "assistant", "content": "b"}
    lab = D.read_samples(jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "w"}]))
    assert lab.kind == "labelled" and D.label_names(lab) == ["w", "x"]
    assert D.read_samples(jsonl(tmp_path / "t.jsonl", [{"text": "a"}])).kind == "text"
    cases = {"mixed.jsonl": ([{"text": "a"}, {"text": "b", "label": 1}], "line 2: a labelled row"),
             "noasst.jsonl": ([{"messages": [{"role": "user", "content": "x"}]}], "no assistant"),
             "badlabel.jsonl": ([{"text": "a", "label": [1]}], "label"),
             "neither.jsonl": ([{"body": "a"}], "expected")}
    for name, (rows, why) in cases.items():
        with pytest.raises(lc.BadInputError, match=why):
            D.read_samples(jsonl(tmp_path / name, rows))
    with pytest.raises(lc.BadInputError, match="at least 2 labels"):
        D.label_names(D.read_samples(jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": 1}])))


def test_collate_carries_loss_mask_and_labels_and_train_loss_uses_them():
    a, b = D.Sample([5, 6, 7], loss_mask=[0, 0, 1]), D.Sample([8, 9], loss_mask=[0, 1])
    batch = D.collate([a, b], pad_id=0)
    assert batch["loss_mask"].tolist() == [[0, 0, 1], [0, 1, 0]]
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 12)
    want = torch.stack([nn.functional.cross_entropy(logits[0, 1], torch.tensor(7)),
                        nn.functional.cross_entropy(logits[1, 0], torch.tensor(9))]).mean()
    torch.testing.assert_close(train_loss(logits, batch, "causal-lm"), want)
    plain = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    assert not torch.allclose(train_loss(logits, plain, "causal-lm"), want)  # without the mask: every target
    labelled = D.collate([D.Sample([1, 2], label=1), D.Sample([3], label=0)], pad_id=0)
    assert labelled["labels"].tolist() == [1, 0]


# ------------------------------------------------------------------ the loop: evaluation, early stopping, best state

def _linear_layer() -> MiniLayer:
    torch.manual_seed(0)  # the base Linear's weights
    g = torch.Generator().manual_seed(0)
    m = MiniModule(name="lin", kind="linear", kernel={}, rank=2, alpha=2.0, use_rslora=False, dtype="float32",
                   outer={"source": "random", "a": 4, "b": 4}, U=torch.randn(6, 4, generator=g),
                   V=torch.randn(4, 5, generator=g), X=torch.zeros(4, 2), Y=torch.randn(2, 4, generator=g))
    return MiniLayer(nn.Linear(5, 6), m)


def test_layers_hold_one_copy_of_an_outer_they_share_also_after_a_move():
    from lora_convert.recovery.scratch import scratch_adapter

    torch.manual_seed(0)
    model = nn.ModuleDict({f"b{i}": nn.ModuleDict({"q": nn.Linear(12, 12), "v": nn.Linear(12, 6)}) for i in range(3)})
    mini = scratch_adapter(model, "", ["q", "v"], 2, 4, (4, 4), seed=0)  # one generator stream: outers shared
    plain = {n: MiniLayer(nn.Linear(12, model.get_submodule(n).out_features), mini.module(n)) for n in mini.module_names}
    layers = inject(model, mini)
    for n, layer in layers.items():
        plain[n].base.load_state_dict(layer.base.state_dict())
        with torch.no_grad():
            layer.X.normal_()
            plain[n].X.copy_(layer.X)
    ptrs = lambda role, kind: {getattr(l, role).data_ptr() for n, l in layers.items() if n.endswith(kind)}  # noqa: E731
    assert all(len(ptrs(r, k)) == 1 for r in ("U", "V") for k in ("q", "v"))
    assert ptrs("V", "q") == ptrs("V", "v")  # same shape (4×12): the same matrix, one copy
    x = torch.randn(3, 12)
    for n, layer in layers.items():
        torch.testing.assert_close(layer(x), plain[n](x), rtol=0, atol=0)
    model.double()  # a conversion keeps the sharing (nn.Module would convert each layer's buffers apart)
    assert all(len(ptrs(r, k)) == 1 for r in ("U", "V") for k in ("q", "v"))
    assert all(layer.U.dtype == torch.float64 for layer in layers.values())
    for n, layer in layers.items():
        torch.testing.assert_close(layer(x.double()), plain[n].double()(x.double()))
    # equal values in distinct tensors (per-module streams, SVD outers) are not merged
    shared, m = {}, mini.module("b0.q")
    a, b = (MiniLayer(nn.Linear(12, 12), dataclasses.replace(m, U=m.U.clone()), shared=shared) for _ in range(2))
    assert a.U.data_ptr() != b.U.data_ptr()


@pytest.mark.parametrize("patience", [0, 2])
def test_eval_every_keeps_the_best_state_and_early_stopping_ends_the_run(tmp_path, patience):
    layer = _linear_layer()
    layer.base.requires_grad_(False)
    acc = make_accelerator("cpu", 1)
    seqs = [[i % 7 + 1, (i * 3) % 7 + 1, 2] for i in range(16)]
    emb = nn.Embedding(8, 5)

    def step_loss(batch):
        return layer(emb(batch["input_ids"])).pow(2).mean() * -1  # any differentiable loss that moves X

    held = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    seen = {}

    def evaluate():
        seen[len(seen) + 1] = layer.X.detach().clone()
        return next(held)

    opts = TrainOptions(steps=12, batch_size=4, lr=1e-2, progress=False, eval_every=2, early_stopping=patience,
                        checkpoint_dir=str(tmp_path / "ck"))
    res = train_inner(acc, layer, {"lin": layer}, seqs, 0, step_loss, opts, {}, evaluate=evaluate)
    assert res.best_step == 4 and res.best_loss == 2.0
    assert torch.equal(layer.X, seen[2])  # the state at the best evaluation, not the last
    assert not torch.equal(seen[2], seen[len(seen)])
    if patience:
        assert res.stopped_at == 8 and len(res.losses) == 8 and [s for s, _ in res.evals] == [2, 4, 6, 8]
    else:
        assert res.stopped_at is None and len(res.losses) == 12 and len(res.evals) == 6


def test_eval_options_are_validated():
    with pytest.raises(lc.BadInputError, match="needs --eval-every"):
        TrainOptions(early_stopping=2).validate()
    layer = _linear_layer()
    with pytest.raises(lc.BadInputError, match="held-out data"):
        train_inner(make_accelerator("cpu", 1), layer, {"lin": layer}, [[1, 2]], 0, None,
                    TrainOptions(steps=2, eval_every=1, progress=False), {})


# ------------------------------------------------------------------ run.train: chat data, classification

def test_train_on_chat_data_learns_the_replies(tmp_path):
    base = tiny_llama_dir(tmp_path / "base")
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
            for w in ("cat", "dog", "sun", "hat", "red", "map") * 6]
    data = jsonl(tmp_path / "chat.jsonl", rows)
    d = DataOptions(data=str(data), max_len=48, eval_fraction=0.2)
    m = ModelOptions(base=str(base), device="cpu")
    t = TrainOptions(steps=30, batch_size=8, lr=1e-1, progress=False, eval_every=10)
    res = train(str(tmp_path / "out"), d, m, t, target_modules=["all-linear"], rank=4, outer_dim=16, log=None)
    # A random 32-wide model's logits are small (lm_head std 0.02 after a final norm): 3.71 -> 3.60 in 30 steps
    assert res.after["loss_student"] < res.before["loss_base"] - 0.05
    assert [s for s, _ in res.after["evals"]] == [10, 20, 30]
    assert res.after["loss_student"] == pytest.approx(min(v for _, v in res.after["evals"]))  # best state exported
    assert lc.load(tmp_path / "out").module("model.layers.0.mlp.up_proj").fidelity["train_steps"] == \
        res.after["best_step"]


def test_train_classifier_writes_an_adapter_peft_loads(tmp_path):
    from transformers import AutoModelForSequenceClassification

    base = tiny_bert_dir(tmp_path / "base")
    rows = [{"text": f"{w} {w} the end", "label": lab} for lab, words in
            (("animal", ("cat", "dog", "cow", "pig")), ("thing", ("hat", "map", "cup", "box"))) for w in words] * 5
    data = jsonl(tmp_path / "cls.jsonl", rows)
    d = DataOptions(data=str(data), max_len=32, eval_fraction=0.25)
    m = ModelOptions(base=str(base), device="cpu")
    t = TrainOptions(steps=25, batch_size=8, lr=3e-2, progress=False)
    res = train(str(tmp_path / "out"), d, m, t, target_modules=["query", "value"], rank=4, outer_dim=16,
                outer_seed=3, log=None)
    assert res.after["loss_student"] < res.before["loss_base"]
    assert res.after["accuracy_student"] >= 0.8 and "accuracy_base" in res.before  # 10 held-out texts, 2 classes
    mini = lc.load(tmp_path / "out")
    assert mini.source_config["task_type"] == "SEQ_CLS" and mini.source_config["modules_to_save"] == ["classifier"]
    assert sorted(mini.passthrough_names) == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    lc.save_adapter(lc.reconstruct(mini), tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=2),
                                        tmp_path / "peft").eval()
    # the same function from the LoRA-Mini file directly: its layers injected, its head copied in
    ours = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).eval()
    inject(ours, mini)
    with torch.no_grad():
        ours.classifier.weight.copy_(mini.load_passthrough("base_model.model.classifier.weight"))
        ours.classifier.bias.copy_(mini.load_passthrough("base_model.model.classifier.bias"))
    enc = char_tokenizer(chat=False)(["cat cat the end", "box box the end"], padding=True, return_tensors="pt")
    with torch.no_grad():
        got, want = pm(**enc).logits, ours(**enc).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got[0], got[1], atol=1e-3)


def test_cli_train_eval_every_and_errors(tmp_path):
    base = tiny_llama_dir(tmp_path / "base", chat=False)
    (tmp_path / "text.txt").write_text("\n".join("the cat sat on a mat, dogs ran." for _ in range(60)))
    out = tmp_path / "trained"
    args = ["train", "--base", str(base), "--data", str(tmp_path / "text.txt"), "-o", str(out), "--rank", "2",
            "--outer-dim", "8", "--steps", "12", "--max-len", "32", "--device", "cpu", "--no-progress", "--json",
            "--eval-every", "3", "--early-stopping", "1", "--lr", "0.3"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["after"]["best_step"] % 3 == 0 and len(doc["after"]["evals"]) >= 1
    assert doc["training"]["lr"] == 0.3
    assert {lc.load(out).module(n).outer["source"] for n in lc.load(out).module_names} == {"select"}  # the default
    res = CliRunner().invoke(main, [a for a in args if a not in ("--eval-every", "3", "--early-stopping", "1")]
                             + ["--outer", "random", "-o", str(tmp_path / "random")])
    assert res.exit_code == 0, res.output
    trained = lc.load(tmp_path / "random")
    assert {trained.module(n).outer["source"] for n in trained.module_names} == {"random"}
    jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "a"},
                                                  {"role": "assistant", "content": "b"}]}] * 4)
    for extra, why in ((["--data", str(tmp_path / "chat.jsonl")], "no chat template"),
                       (["--task", "seq-cls"], "not --task seq-cls"),
                       (["--early-stopping", "2", "--eval-every", "0"], "needs --eval-every")):
        bad = [a for a in args if a not in ("--eval-every", "3", "--early-stopping", "1")] + extra
        res = CliRunner().invoke(main, bad)
        last = res.output.strip().splitlines()[-1]  # (transformers may print a loading bar first)
        assert res.exit_code == 2 and why in last and "Traceback" not in res.output, res.output


def test_default_learning_rate_falls_with_the_outer_size(tmp_path):
    from lora_convert.recovery.scratch import default_lr

    rates = [default_lr((a, a)) for a in (16, 48, 96, 128, 256, 512)]
    assert rates == sorted(rates, reverse=True) and rates[0] == 3e-2 and rates[-1] == 1e-2
    assert default_lr(None) == default_lr(64)  # the default outer size
    base = tiny_llama_dir(tmp_path / "base", chat=False)
    (tmp_path / "t.txt").write_text("\n".join("the cat sat on a mat." for _ in range(20)))
    res = CliRunner().invoke(main, ["train", "--base", str(base), "--data", str(tmp_path / "t.txt"), "-o",
                                    str(tmp_path / "o"), "--outer-dim", "128", "--steps", "1", "--max-len", "16",
                                    "--device", "cpu", "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["training"]["lr"] == default_lr((128, 128))


def test_resume_continues_the_evaluation_history_and_best_state(tmp_path):
    import shutil

    emb = nn.Embedding(8, 5)
    seqs = [[i % 7 + 1, (i * 3) % 7 + 1, 2] for i in range(16)]

    def run(ckpt, resume):
        layer = _linear_layer()
        layer.base.requires_grad_(False)

        def step_loss(batch):
            return (layer(emb(batch["input_ids"])) - 1.0).pow(2).mean()

        def evaluate():  # a function of the state, so a resumed run sees the same numbers
            return float((layer.X.detach() - 0.3).pow(2).sum()) + (layer.X.detach().abs().sum() > 0.8) * 5.0

        opts = TrainOptions(steps=12, batch_size=4, lr=5e-2, progress=False, eval_every=2, checkpoint_every=4,
                            keep_checkpoints=5, checkpoint_dir=str(ckpt), resume=resume)
        res = train_inner(make_accelerator("cpu", 1), layer, {"lin": layer}, seqs, 0, step_loss, opts, {},
                          evaluate=evaluate)
        return res, layer.X.detach().clone()

    full, x_full = run(tmp_path / "a", False)
    assert full.best_step is not None and len(full.evals) == 6
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for step in (8, 12):
        shutil.rmtree(tmp_path / "b" / f"step-{step:08d}")
    resumed, x_resumed = run(tmp_path / "b", True)
    assert resumed.start_step == 4
    assert resumed.evals == full.evals and resumed.best_step == full.best_step
    assert torch.equal(x_resumed, x_full)
