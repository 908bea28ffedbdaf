"""The Gaussian-mixture benchmark runs, prints the JSON it documents, and DPS beats unconditional sampling.

A smoke test of ``bench/gmm.py`` (not a benchmark: no timings are asserted). deepinv is optional; CI has none.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dps.app import GaussianMixture, max_sliced_wasserstein, random_problem, sliced_wasserstein

ROOT = Path(__file__).resolve().parents[1]
HAS_DEEPINV = importlib.util.find_spec("deepinv") is not None


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gmm", ROOT / "bench" / "gmm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report():
    cmd = [sys.executable, str(ROOT / "bench" / "gmm.py"), "--quick", "--json", "--samples", "300",
           "--reference", "1000", "--slices", "200", "--steps", "50", "--sweep-steps", "50", "--no-deepinv"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_json_structure(report):
    for key in ("config", "environment", "deepinv", "sweep", "best_zeta", "results", "summary"):
        assert key in report
    assert report["config"]["steps"] == [50]
    assert {"version", "included"} <= set(report["deepinv"])
    assert report["deepinv"]["included"] is False
    methods = {r["method"] for r in report["results"]}
    assert {"exact", "unconditional", "dps", "dps_paper", "schedule", "schedule_x0_only"} <= methods
    for row in report["results"]:
        assert {"dim_x", "dim_y", "seed", "steps", "method", "zeta", "sw", "max_sw", "diverged"} <= set(row)
    for row in report["sweep"]:
        assert {"method", "steps", "zeta", "sw", "max_sw", "diverged"} <= set(row)
    assert set(report["best_zeta"]["schedule"]) == {"50"}


def test_dps_beats_unconditional(report):
    per = report["summary"]["50"]
    for method in ("dps", "dps_paper", "schedule"):
        assert per[method]["sw"] < 0.6 * per["unconditional"]["sw"], (method, per)
        assert per[method]["max_sw"] < per["unconditional"]["max_sw"], (method, per)
    # the exact posterior's second draw is the floor
    assert per["exact"]["sw"] < per["schedule"]["sw"]


def test_fast_eps_and_cached_metrics_match_the_core():
    bench = load_bench()
    g = torch.Generator().manual_seed(0)
    prior = GaussianMixture.mcg_diff(8, g)
    x = 10 * torch.randn(5, 8, 1, 1, generator=g, dtype=torch.float64)
    ac = torch.rand(5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(bench.mixture_eps(prior)(x, ac), prior.eps(x, ac))
    a = random_problem(8, 2, g)
    exact = prior.posterior(a, a @ prior.sample(1, g)[0], 0.5).sample(700, g)
    samples = prior.sample(300, g)
    ref = bench.Reference(exact, 150).score(samples)
    assert ref["sw"] == pytest.approx(sliced_wasserstein(samples, exact, 150, torch.Generator().manual_seed(2)))
    assert ref["max_sw"] == pytest.approx(max_sliced_wasserstein(samples, exact, 100, torch.Generator().manual_seed(3)))


@pytest.mark.skipif(not HAS_DEEPINV, reason="deepinv is not installed (bench/requirements-peers.txt)")
def test_deepinv_dps_runs_on_the_same_problem():
    bench = load_bench()
    problem = bench.make_problem(8, 4, 0)
    ref = bench.reference(problem, 1000, 200)
    uncond = bench.run_method("unconditional", None, problem, ref, 50, 300, seed=0)
    dinv = bench.run_method("deepinv_dps", 3.0, problem, ref, 50, 300, seed=0)
    assert dinv["sw"] < 0.6 * uncond["sw"]


def test_few_steps_runs_both_paths_and_reports_psnr_and_residual():
    """``bench/few_steps.py`` (issue 11, item 2) on one digit and a few steps: both the official loop (its
    DDPM form and, with ``--official-samplers``, its deterministic DDIM form) and the host path, each with a PSNR and
    a residual over the noise floor; the host's Polyak rule ends near 1. An unknown official sampler is refused."""
    cmd = [sys.executable, "bench/few_steps.py", "--images", "1", "--steps", "8", "--official-steps", "20",
           "--tasks", "box_inpainting", "--samplers", "euler", "--json", "--threads", "1"]
    done = subprocess.run(cmd + ["--official-samplers", "ddpm,ddim"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout)["tasks"]["box_inpainting"]
    assert set(row) == {"official ddpm 20 dps:30", "official ddim 20 dps:30", "euler 8 polyak:1"}, row   # ζ 3 at 200
    assert all(math.isfinite(v["psnr"]) and v["residual"] > 0 for v in row.values()), row
    assert row["official ddpm 20 dps:30"]["psnr"] > 10 and row["euler 8 polyak:1"]["psnr"] > 10, row
    assert row["official ddpm 20 dps:30"]["psnr"] != row["official ddim 20 dps:30"]["psnr"], row     # no fresh noise
    assert 0.5 < row["euler 8 polyak:1"]["residual"] < 1.5, row                 # Polyak reaches the noise floor
    bad = subprocess.run(cmd + ["--official-samplers", "ddpm,plms"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert bad.returncode == 2 and "unknown plms; pick from ddpm, ddim" in bad.stderr, bad.stderr[-2000:]


def test_sampler_table_marks_misses_and_uses_euler_on_the_same_levels(tmp_path):
    """``bench/sampler_table.py``: a later file's rows replace an earlier one's, a sampler more than 1 dB behind
    euler or below the simple baseline is marked, and UniPC is compared with euler on its own levels."""
    def result(name, rows, discard=()):
        psnr = {s: {t: {f"baseline ({b})": base, "polyak:1": v[i]}
                    for i, (t, b, base) in enumerate([("super_resolution", "bicubic", 24.0),
                                                      ("box_inpainting", "mean fill", 13.0),
                                                      ("gaussian_deblur", "measurement", 24.0)])}
                for s, v in rows.items()}
        path = tmp_path / name
        path.write_text(json.dumps({"psnr": psnr, "discard_penultimate": list(discard)}))
        return str(path)
    full = result("full.json", {"euler": (26, 17, 26), "dpmpp_2m": (20, 17, 26), "uni_pc": (25.2, 17, 26)})
    again = result("again.json", {"dpmpp_2m": (25.5, 17, 26)})
    same = result("same.json", {"euler": (25.5, 17, 26)}, discard=["euler"])
    cmd = [sys.executable, "bench/sampler_table.py", "--grid", "normal", full, again]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "| dpmpp_2m | 25.50 (-0.50) |" in out.stdout and "| uni_pc | 25.20 (-0.80) |" in out.stdout
    assert "normal: 3 of 3 meet the target" in out.stdout
    worse = result("worse.json", {"uni_pc": (24.4, 17, 26)})
    out = subprocess.run(cmd[:-2] + [full, worse, "--grid", "karras", full, worse, same],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "| uni_pc | 24.40 (-1.60) ✗ |" in out.stdout and "24.40 (-1.10*) ✗" in out.stdout
    assert "normal: 1 of 3 meet the target; behind: dpmpp_2m, uni_pc" in out.stdout
    assert "in every grid: 1 (euler)" in out.stdout


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                    reason="set COMFYUI_PATH (and COMFYUI_PYTHON) to run the bench with ComfyUI's own samplers")
def test_host_defaults_runs_comfyuis_samplers_on_comfyuis_schedules(taesd_dir, tmp_path):
    """``bench/host_defaults.py --scheduler beta``: ComfyUI's own scheduler on the prior's schedule and ComfyUI's
    sampler functions (a CFG++ one through its post-CFG function, as ComfyUI calls it); at 8 steps guidance lifts
    super-resolution 4-7 dB above the unguided run (9-10 dB)."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    cmd = [python, "bench/host_defaults.py", "--vae", str(taesd_dir / "taesd_decoder.safetensors"), "--images", "1",
           "--offset", "0", "--steps", "8", "--tasks", "super_resolution", "--settings", "polyak:1,polyak:0",
           "--comfyui", os.environ["COMFYUI_PATH"], "--host-functions", "--threads", "1", "--json",
           "--scheduler", "beta", "--samplers", "euler,dpmpp_3m_sde,dpmpp_2m_cfg_pp"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["scheduler"] == "beta"
    for sampler in ("euler", "dpmpp_3m_sde", "dpmpp_2m_cfg_pp"):
        row = result["psnr"][sampler]["super_resolution"]
        assert row["polyak:1"] > row["polyak:0"] + 3, (sampler, row)


def test_seven_guided_steps_beat_the_baselines(taesd_dir):
    """Few steps (``dps.host.step_limit``): 7 Euler steps of the SD1.x-latent prior guided at the node's default
    beat bicubic on x4 super-resolution; before the bound on a step's move they read ~15 dB (bicubic ~25.7), the
    latent blown to several times its data RMS by moves larger than the noise left at the next level."""
    cmd = [sys.executable, "bench/host_defaults.py", "--vae", str(taesd_dir / "taesd_decoder.safetensors"),
           "--images", "2", "--offset", "0", "--steps", "7", "--tasks", "super_resolution", "--settings", "polyak:1",
           "--samplers", "euler,dpmpp_2m", "--threads", "2", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    for sampler in ("euler", "dpmpp_2m"):
        row = result["psnr"][sampler]["super_resolution"]
        assert row["polyak:1"] > row["baseline (bicubic)"] + 1, row
