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


def pytest_configure(config):
    # The suite multiplies many tiny matrices; on a shared 2-core machine torch's intra-op
    # threads make each call far slower (oversubscription), so run single-threaded.
    import torch

    torch.set_num_threads(1)
