"""Text data for recovery, evaluation and training: read, tokenize, batch deterministically."""
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


def collate(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def split_holdout(seqs: list, fraction: float) -> tuple[list, list]:
    """(train, held-out): the last `fraction` of the sequences, at least one each, never shuffled."""
    if not 0.0 < fraction < 1.0:
        raise BadInputError(f"--eval-fraction must be in (0, 1), got {fraction}")
    if len(seqs) < 2:
        raise BadInputError(f"need at least 2 sequences to hold some out, got {len(seqs)} (more data or "
                            "--eval-data)")
    n_eval = min(len(seqs) - 1, max(1, round(len(seqs) * fraction)))
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
