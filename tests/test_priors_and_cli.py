"""The embedded priors, their loading, the demo and the command line."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT
from dps import DPSGuidance, Gaussian, SuperResolution, alphas_cumprod_from_betas, linear_betas
from dps.app import SmallUNet, heldout_digits, load_prior, load_taesd, read_image, train_sample_digits, write_png
from dps.app.train import train


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dps", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_short_training_run_lowers_the_loss():
    model = SmallUNet(1, 8, (1, 2))
    _, history = train(train_sample_digits(), model, steps=60, batch=16, log_every=10, log=lambda m: None)
    assert history[-1] < 0.5 * history[0], history


def test_heldout_digits_are_not_in_the_training_sample():
    held = heldout_digits()
    sample = train_sample_digits()
    assert held.shape == (100, 1, 28, 28) and held.min() >= -1 and held.max() <= 1
    flat_h, flat_s = held.flatten(1), sample.flatten(1)
    assert not any(bool((flat_s == row).all(1).any()) for row in flat_h)


def test_bundled_pixel_prior_loads_and_denoises():
    prior = load_prior(kind="pixel")
    x0 = heldout_digits(8)
    t = torch.full((8,), 300)
    ac = float(alphas_cumprod_from_betas(linear_betas())[300])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = prior.model(ac**0.5 * x0 + (1 - ac) ** 0.5 * noise, t)
    # the prior predicts the noise far better than chance on digits it never saw
    assert float((eps - noise).square().mean()) < 0.2


def test_loading_the_wrong_file_is_a_clear_error(tmp_path, taesd_dir):
    with pytest.raises(ValueError, match="not a DPS prior"):
        load_prior(taesd_dir / "taesd_decoder.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad), metadata={"unet": json.dumps({"channels": 1, "base": 16, "mults": [1, 2, 4]}),
                                                          "shape": "[1, 28, 28]"})
    with pytest.raises(ValueError, match="missing"):
        load_prior(bad)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_prior(pickle)


def test_png_round_trip(tmp_path):
    x = torch.rand(3, 9, 7) * 2 - 1
    write_png(tmp_path / "a.png", x)
    back = read_image(tmp_path / "a.png")
    assert back.shape == (3, 9, 7) and float((back - x).abs().max()) < 1 / 127


def test_latent_gradient_reaches_the_latent_through_taesd(taesd_dir):
    vae = load_taesd(taesd_dir / "taesd_decoder.safetensors", "decoder")
    truth = torch.rand(1, 3, 64, 64) * 2 - 1
    op = SuperResolution(4)
    guidance = DPSGuidance(op, Gaussian(0.05), op(truth), decoder=lambda z: vae(z) * 2 - 1, mode="x0_only")
    z = torch.randn(1, 4, 8, 8)
    res = guidance.evaluate(z, lambda z_: z_)
    assert torch.isfinite(res.grad).all() and float(res.grad.abs().sum()) > 0
    # the gradient is the true derivative: a small step along -grad lowers the distance as predicted
    step = 1e-2 * res.grad / res.grad.norm()
    with torch.no_grad():
        d0, d1 = guidance.distance(z), guidance.distance(z - step)
    predicted = float((res.grad * step).sum())
    assert abs(float(d0 - d1) - predicted) < 0.1 * abs(predicted)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    grid = tmp_path_factory.mktemp("demo") / "grid.png"
    out = run_cli("demo", "--json", "--images", "8", "--steps", "200", "--output", str(grid), timeout=1800)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_demo_json_has_the_documented_shape(quick_demo):
    tasks = quick_demo["tasks"]
    assert set(tasks) == {"super_resolution", "box_inpainting", "random_inpainting", "gaussian_deblur",
                          "motion_deblur", "phase_retrieval"}
    for scores in tasks.values():
        assert all(isinstance(scores[k], float) for k in ("dps", "baseline", "unguided"))


@pytest.mark.parametrize("task", ["super_resolution", "box_inpainting", "random_inpainting", "gaussian_deblur",
                                  "motion_deblur", "phase_retrieval"])
def test_dps_beats_unguided_sampling(quick_demo, task):
    r = quick_demo["tasks"][task]
    assert r["dps"] > r["unguided"] + 1.0, r


@pytest.mark.parametrize("task", ["super_resolution", "box_inpainting", "gaussian_deblur"])
def test_dps_beats_the_best_baseline(quick_demo, task):
    r = quick_demo["tasks"][task]
    assert r["dps"] > r["baseline"], r


def test_restore_super_resolution_end_to_end(tmp_path):
    truth = heldout_digits(1)
    low = SuperResolution(4)(truth)
    write_png(tmp_path / "low.png", low[0])
    out = run_cli("restore", "--task", "super_resolution", "--input", str(tmp_path / "low.png"),
                  "--output", str(tmp_path / "out.png"), "--steps", "50")
    assert out.returncode == 0, out.stderr
    restored = read_image(tmp_path / "out.png")
    assert restored.shape == (1, 28, 28)
    up = torch.nn.functional.interpolate(low, scale_factor=4, mode="bicubic")
    assert float((restored - truth[0]).square().mean()) < float((up[0] - truth[0]).square().mean())


@pytest.mark.parametrize("task", ["super_resolution", "gaussian_deblur"])
def test_restore_with_the_proximal_sampler_beats_the_baseline_in_30_steps(tmp_path, task):
    """``--sampler proximal`` (its default 30 steps) restores better than the simple baseline: bicubic for
    super-resolution, the blurred measurement itself for deblurring."""
    from dps.app.tasks import make_operator

    truth = heldout_digits(1)
    op = make_operator(task, tuple(truth.shape), seed=0)
    y = Gaussian(0.05).sample(op(truth), torch.Generator().manual_seed(2))
    write_png(tmp_path / "y.png", y[0].clamp(-1, 1))
    out = run_cli("restore", "--task", task, "--sampler", "proximal", "--input", str(tmp_path / "y.png"),
                  "--output", str(tmp_path / "out.png"))
    assert out.returncode == 0, out.stderr
    assert "30 steps (proximal)" in out.stderr
    restored = read_image(tmp_path / "out.png")
    baseline = (torch.nn.functional.interpolate(y, scale_factor=4, mode="bicubic") if task == "super_resolution"
                else y)[0].clamp(-1, 1)
    assert float((restored - truth[0]).square().mean()) < 0.7 * float((baseline - truth[0]).square().mean())


@pytest.mark.parametrize("args,message", [
    (["--task", "super_resolution", "--input", "{tmp}/big.png"], "must be 7x7"),
    (["--task", "gaussian_deblur", "--input", "{tmp}/img.png", "--sampler", "proximal", "--rule", "dps"],
     "leave --rule out"),
    (["--task", "gaussian_deblur", "--input", "{tmp}/img.png", "--sampler", "proximal", "--steps", "3"],
     "30 with --sampler proximal"),
    (["--task", "box_inpainting", "--input", "{tmp}/img.png"], "needs --mask"),
    (["--task", "box_inpainting", "--input", "{tmp}/img.png", "--mask", "{tmp}/big.png"], "resize the mask"),
    (["--task", "gaussian_deblur", "--input", "{tmp}/junk.png"], "cannot read"),
    (["--task", "gaussian_deblur", "--input", "{tmp}/missing.png"], "not found"),
])
def test_restore_bad_input_is_a_clear_error(tmp_path, args, message):
    write_png(tmp_path / "big.png", torch.zeros(1, 32, 32))
    write_png(tmp_path / "img.png", torch.zeros(1, 28, 28))
    (tmp_path / "junk.png").write_bytes(b"definitely not an image")
    out = run_cli("restore", *[a.format(tmp=tmp_path) for a in args], "--output", str(tmp_path / "o.png"))
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
