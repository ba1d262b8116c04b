"""Fixtures shared by the whole suite.

The helpers behind `cli` and `lowrank` live in tests/helpers/ so that module-level code
(parametrize lists, shared module tables) can import them too; tests take the fixtures.
"""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture
def cli():
    """cli(*args, env=None): `lora-convert ARGS` in-process; a crash raises, it is not an exit code."""
    from helpers.cli import run_cli

    return run_cli


@pytest.fixture
def lowrank():
    """lowrank(out, inp, r, seed=0, cond=1.0, scale=0.02) -> float64 B, A with condition number `cond`."""
    from helpers.lowrank import lowrank

    return lowrank


def pytest_configure(config):
    # The suite multiplies many tiny matrices; with few cores torch's intra-op threads make
    # each call far slower (oversubscription), so the whole suite runs single-threaded.
    import torch

    torch.set_num_threads(1)
