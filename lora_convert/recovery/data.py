"""Text data for recovery, evaluation and training: read, tokenize, batch deterministically.

Training data (`read_samples`) may also be chat / instruction JSONL (rendered with the
tokenizer's chat template, loss on the assistant's tokens only) or labelled JSONL
(sequence classification); recovery and evaluation read plain text (`read_texts`).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BadInputError


def read_texts(path: str | os.PathLike) -> list[str]:
    """Samples from a .txt file (paragraphs when it has blank lines, else one per line) or a .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError("no such data file", path)
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path) from None
    if path.suffix == ".jsonl":
        texts = _jsonl_texts(raw, path)
    elif path.suffix in (".txt", ".md", ".text"):
        texts = _txt_samples(raw)
    else:
        raise BadInputError("data must be a .txt (one sample per line or per paragraph) or .jsonl "
                            "file (a \"text\" field per line)", path)
    if not texts:
        raise BadInputError("no text samples in the data file", path)
    return texts


def _txt_samples(raw: str) -> list[str]:
    if re.search(r"\n[ \t]*\n", raw.strip()):
        parts = re.split(r"\n[ \t]*\n", raw)
    else:
        parts = raw.splitlines()
    return [p.strip() for p in parts if p.strip()]


def _jsonl_texts(raw: str, path: Path) -> list[str]:
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise BadInputError(f"line {n}: invalid JSON ({exc})", path) from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise BadInputError(f"line {n}: expected an object with a string \"text\" field", path)
        if row["text"].strip():
            texts.append(row["text"])
    return texts


def tokenize(tokenizer, texts: list[str], max_len: int, pack: bool) -> list[list[int]]:
    """Token id sequences of at most `max_len`.

    With `pack` (causal LMs) samples are joined with EOS and cut into full blocks,
    as run_clm's group_texts does, so no compute is spent on padding; otherwise each
    sample is one (truncated) sequence with the tokenizer's special tokens.
    """
    if max_len < 2:
        raise BadInputError(f"--max-len must be at least 2, got {max_len}")
    if not pack:
        enc = tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]
        return [ids for ids in enc if len(ids) >= 2]
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + ([eos] if eos is not None else []))
    blocks = [stream[i:i + max_len] for i in range(0, len(stream), max_len)]
    return [b for b in blocks if len(b) >= 2]


class Sample(list):
    """Token ids (a list, so plain sequences and samples mix) with an optional per-token loss mask
    (1 where the token is a training target: the assistant's reply in chat data) or class label."""

    def __init__(self, ids, loss_mask: list[int] | None = None, label: int | None = None):
        super().__init__(ids)
        self.loss_mask, self.label = loss_mask, label


def collate(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask; also loss_mask / labels when the samples carry them."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if any(getattr(s, "loss_mask", None) is not None for s in seqs):
        lm = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            m = getattr(s, "loss_mask", None)
            lm[i, :len(s)] = torch.tensor(m if m is not None else [1] * len(s), dtype=torch.long)
        out["loss_mask"] = lm
    if any(getattr(s, "label", None) is not None for s in seqs):
        out["labels"] = torch.tensor([s.label for s in seqs], dtype=torch.long)
    return out


def split_holdout(seqs: list, fraction: float, shuffle: bool = False) -> tuple[list, list]:
    """(train, held-out): the last `fraction` of the sequences, at least one each; with `shuffle`, of a
    fixed permutation (for rows whose file order may group classes or sources)."""
    if not 0.0 < fraction < 1.0:
        raise BadInputError(f"--eval-fraction must be in (0, 1), got {fraction}")
    if len(seqs) < 2:
        raise BadInputError(f"need at least 2 sequences to hold some out, got {len(seqs)} (more data or "
                            "--eval-data)")
    n_eval = min(len(seqs) - 1, max(1, round(len(seqs) * fraction)))
    if shuffle:
        order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(0)).tolist()
        seqs = [seqs[i] for i in order]
    return seqs[:-n_eval], seqs[-n_eval:]


@dataclass
class BatchPlan:
    """Deterministic batch order: micro-batch j is a pure function of (seed, j).

    Each epoch is a fresh permutation drawn from seed + epoch, so resuming at step s
    needs no replay of the data order. With several processes, the global
    micro-batch (batch_size · world sequences) is split by rank.
    """

    n: int
    batch_size: int
    seed: int
    world: int = 1
    rank: int = 0

    @property
    def per_epoch(self) -> int:
        return max(1, self.n // (self.batch_size * self.world))

    def indices(self, j: int) -> list[int]:
        epoch, pos = divmod(j, self.per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        global_batch = self.batch_size * self.world
        chosen = [perm[(pos * global_batch + i) % self.n] for i in range(global_batch)]
        return chosen[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]


def eval_batches(seqs: list[list[int]], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Held-out data in fixed order (no shuffling, so every evaluation sees the same batches)."""
    return [collate(seqs[i:i + batch_size], pad_id) for i in range(0, len(seqs), batch_size)]


# ------------------------------------------------------------------ training data: text, chat, labelled

DATA_KINDS = ("text", "chat", "labelled")


@dataclass
class Records:
    """The rows of a training data file, all of one kind: "text" (str), "chat" (list of
    {role, content} messages; prompt/completion rows become a user and an assistant message)
    or "labelled" ((text, label))."""

    kind: str
    rows: list
    path: str = ""


def read_samples(path: str | os.PathLike) -> Records:
    """Training rows from .txt (plain text) or .jsonl: {"text"}, {"text", "label"}, {"messages": [...]}
    or {"prompt", "completion"}; one kind per file, so a stray row is an error, not a silent skip."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return Records("text", read_texts(path), str(path))
    if not path.is_file():
        raise BadInputError("no such data file", path)
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path) from None
    kind, rows = None, []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise BadInputError(f"line {n}: invalid JSON ({exc})", path) from None
        this, value = _row(row, n, path)
        if kind is not None and this != kind:
            raise BadInputError(f"line {n}: a {this} row in a file of {kind} rows (one kind per file)", path)
        kind = this
        rows.append(value)
    if not rows:
        raise BadInputError("no samples in the data file", path)
    return Records(kind, rows, str(path))


def _row(row, n: int, path: Path):
    if not isinstance(row, dict):
        raise BadInputError(f"line {n}: expected a JSON object", path)
    if "messages" in row:
        msgs = row["messages"]
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
        if not ok:
            raise BadInputError(f"line {n}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} "
                                "objects with string values", path)
        if not any(m["role"] == "assistant" for m in msgs):
            raise BadInputError(f"line {n}: no assistant message to learn from", path)
        return "chat", msgs
    if "prompt" in row or "completion" in row:
        if not (isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str)):
            raise BadInputError(f"line {n}: \"prompt\" and \"completion\" must both be strings", path)
        return "chat", [{"role": "user", "content": row["prompt"]},
                        {"role": "assistant", "content": row["completion"]}]
    if not isinstance(row.get("text"), str):
        raise BadInputError(f"line {n}: expected \"text\", \"messages\" or \"prompt\"/\"completion\"", path)
    if "label" in row:
        label = row["label"]
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise BadInputError(f"line {n}: \"label\" must be a string or an integer", path)
        return "labelled", (row["text"], label)
    return "text", row["text"]


def label_names(records: Records) -> list:
    """The classes of labelled rows, sorted (integers numerically, names alphabetically)."""
    labels = {label for _, label in records.rows}
    if len({type(x) for x in labels}) > 1:
        raise BadInputError("labels mix strings and integers", records.path)
    names = sorted(labels)
    if len(names) < 2:
        raise BadInputError(f"classification needs at least 2 labels, found {len(names)}", records.path)
    return names


def tokenize_samples(tokenizer, records: Records, max_len: int, pack: bool,
                     labels: list | None = None) -> list[list[int]]:
    """Token sequences of at most `max_len` for any kind of training rows (see tokenize for text)."""
    if records.kind == "text":
        return tokenize(tokenizer, records.rows, max_len, pack)
    if max_len < 2:
        raise BadInputError(f"--max-len must be at least 2, got {max_len}")
    if records.kind == "labelled":
        index = {name: i for i, name in enumerate(labels or label_names(records))}
        unknown = sorted({str(lab) for _, lab in records.rows if lab not in index})
        if unknown:
            raise BadInputError(f"labels not in the training data: {', '.join(unknown[:5])}", records.path)
        enc = tokenizer([t for t, _ in records.rows], truncation=True, max_length=max_len)["input_ids"]
        return [Sample(ids, label=index[lab]) for ids, (_, lab) in zip(enc, records.rows)]
    out = [chat_sample(tokenizer, msgs, max_len, records.path) for msgs in records.rows]
    return [s for s in out if s is not None]


def chat_sample(tokenizer, messages: list[dict], max_len: int, path: str = "") -> Sample | None:
    """One conversation as a Sample whose loss mask covers the assistant's turns.

    Each assistant turn's tokens are found by rendering the conversation up to it (with the
    generation prompt) and up to its end: the difference is what the model must produce.
    Without a chat template, a user/assistant pair is plain prompt + completion + EOS.
    None when truncation to `max_len` leaves no assistant token.
    """
    if getattr(tokenizer, "chat_template", None):
        def render(msgs, gen):
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        ids, mask = [], []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = render(messages[:i], True), render(messages[:i + 1], False)
            if upto[:len(before)] != before or before[:len(ids)] != ids:
                raise BadInputError("the tokenizer's chat template does not render a conversation as a prefix of "
                                    "its continuation; cannot tell the assistant's tokens apart", path)
            mask += [0] * (len(before) - len(ids)) + [1] * (len(upto) - len(before))
            ids = upto
    else:
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise BadInputError("the tokenizer has no chat template: only prompt/completion rows (one user and one "
                                "assistant message) can be used", path)
        prompt = tokenizer(messages[0]["content"], add_special_tokens=False)["input_ids"]
        reply = tokenizer(messages[1]["content"], add_special_tokens=False)["input_ids"]
        reply += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids, mask = prompt + reply, [0] * len(prompt) + [1] * len(reply)
    ids, mask = ids[:max_len], mask[:max_len]
    # Position t predicts token t+1: a target at position 0 is never predicted.
    return Sample(ids, loss_mask=mask) if len(ids) >= 2 and any(mask[1:]) else None
