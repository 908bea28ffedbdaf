import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
TAESD = SHARED / "assets" / "taesd"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def taesd_dir() -> Path:
    if not (TAESD / "taesd_decoder.safetensors").exists():
        pytest.skip(f"TAESD weights not found at {TAESD} (they live in ../shared beside the checkout; "
                    "a user's clone has none)")
    return TAESD
