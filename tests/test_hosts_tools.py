"""The live-WebUI tools in tests/hosts/ (the live run itself is a documented command, not a CI test): the random
SD1.5 checkpoint has the real architecture, the setup script reads the host's launcher and requirements right and
checks out repository snapshots that lack some blobs, and the driver reads the infotext as the host writes it."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HOSTS = Path(__file__).resolve().parent / "hosts"
sys.path.insert(0, str(HOSTS))

import make_sd15_checkpoint as ckpt  # noqa: E402
import setup_webui  # noqa: E402


def _count(shapes) -> int:
    return sum(math.prod(shape) for _, shape in shapes)


def test_checkpoint_has_the_published_sd15_parameter_counts():
    # SD1.5: UNet 859,520,964; KL VAE 83,653,863; CLIP ViT-L/14 text encoder 123,060,480 parameters
    assert _count(ckpt.unet_shapes()) == 859_520_964
    assert _count(ckpt.vae_shapes()) == 83_653_863
    assert _count(ckpt.clip_shapes()) == 123_060_480
    shapes = ckpt.all_shapes()
    assert len(shapes) == 1130  # + position_ids + 12 schedule buffers = the 1143 keys of LatentDiffusion's state dict
    assert shapes["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)  # SD1.x: conv proj
    assert shapes["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] == (640, 768)
    assert shapes["model.diffusion_model.output_blocks.8.2.conv.weight"] == (640, 640, 3, 3)
    assert shapes["first_stage_model.decoder.up.1.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)


def test_checkpoint_schedule_and_initialisation():
    buffers = ckpt.schedule_buffers()
    assert buffers["alphas_cumprod"].shape == (1000,)
    assert buffers["alphas_cumprod"][0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    assert buffers["alphas_cumprod"][-1].item() == pytest.approx(0.0047, abs=1e-4)  # SD1.5's final alpha-bar
    g = torch.Generator().manual_seed(0)
    weight = ckpt.random_tensor("model.diffusion_model.out.2.weight", (4, 320, 3, 3), g)
    assert weight.std().item() == pytest.approx(1 / math.sqrt(320 * 9), rel=0.05)
    assert torch.equal(ckpt.random_tensor("first_stage_model.decoder.norm_out.weight", (128,), g), torch.ones(128))
    assert torch.equal(ckpt.random_tensor("model.diffusion_model.out.2.bias", (4,), g), torch.zeros(4))


LAUNCH_UTILS = '''
def prepare_environment():
    assets_repo = os.environ.get('ASSETS_REPO', "https://github.com/AUTOMATIC1111/stable-diffusion-webui-assets.git")
    # stable_diffusion_repo = os.environ.get('STABLE_DIFFUSION_REPO', "https://github.com/Stability-AI/stablediffusion.git")
    blip_repo = os.environ.get('BLIP_REPO', 'https://github.com/salesforce/BLIP.git')
    assets_commit_hash = os.environ.get('ASSETS_COMMIT_HASH', "6f7db241d2f8ba7457bac5ca9753331f0c266917")
    blip_commit_hash = os.environ.get('BLIP_COMMIT_HASH', "48211a1594f1321b00f14c9f7a5b4813144b2fb9")
    git_clone(assets_repo, repo_dir('stable-diffusion-webui-assets'), "assets", assets_commit_hash)
    # git_clone(stable_diffusion_repo, repo_dir('stable-diffusion-stability-ai'), "Stable Diffusion", x)
    git_clone(blip_repo, repo_dir('BLIP'), "BLIP", blip_commit_hash)
'''


def test_setup_reads_the_launchers_repositories_and_relaxes_the_requirements(tmp_path):
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "launch_utils.py").write_text(LAUNCH_UTILS)
    assert setup_webui.host_repositories(tmp_path) == [
        ("stable-diffusion-webui-assets", "https://github.com/AUTOMATIC1111/stable-diffusion-webui-assets.git",
         "6f7db241d2f8ba7457bac5ca9753331f0c266917"),
        ("BLIP", "https://github.com/salesforce/BLIP.git", "48211a1594f1321b00f14c9f7a5b4813144b2fb9")]
    assert setup_webui.mirror_of("https://github.com/salesforce/BLIP.git", "/m/{owner}+{name}/repo") == \
        "/m/salesforce+BLIP/repo"
    assert setup_webui.mirror_of("https://github.com/salesforce/BLIP.git", None).startswith("https://")
    (tmp_path / "requirements_versions.txt").write_text(
        "setuptools==69.5.1  # temp fix\nGitPython==3.1.32\ntorch\ngradio==3.41.2\n")
    lines = setup_webui.live_requirements(tmp_path).read_text().splitlines()
    assert lines == ["setuptools>=77.0.3,<81", "GitPython==3.1.32", "gradio==3.41.2"]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_snapshot_checkout_skips_absent_blobs(tmp_path):
    def git(*args, cwd):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                              capture_output=True, text=True).stdout.strip()

    src = tmp_path / "src"
    src.mkdir()
    git("init", "-q", cwd=src)
    (src / "code.py").write_text("x = 1\n")
    (src / "picture.gif").write_bytes(b"GIF89a" + bytes(range(256)))
    git("add", ".", cwd=src)
    git("commit", "-q", "-m", "one", cwd=src)
    commit = git("rev-parse", "HEAD", cwd=src)
    blob = git("rev-parse", "HEAD:picture.gif", cwd=src)
    (src / ".git" / "objects" / blob[:2] / blob[2:]).unlink()  # a snapshot without the large file
    missing = setup_webui.checkout_tolerant(str(src), tmp_path / "dest", commit)
    assert missing == ["picture.gif"]
    assert (tmp_path / "dest" / "code.py").read_text() == "x = 1\n"
    assert git("rev-parse", "HEAD", cwd=tmp_path / "dest") == commit
    assert setup_webui.checkout_tolerant(str(src), tmp_path / "dest", commit) == []  # idempotent


def test_driver_reads_the_infotext_as_the_host_writes_it():
    pytest.importorskip("PIL", reason="the driver decodes PNGs with PIL")
    import drive_webui

    infotext = ('a photo\nSteps: 4, Sampler: Euler, Seed: 1, Size: 64x64, Model: sd15-random, DPS: "task: '
                'super_resolution, sr_factor: 4, zeta: 1, rule: polyak, mode: full, y: ac7b577f1f", '
                'DPS error: "ValueError: DPS: no measurement image, upload one", Version: v1.10.1')
    assert drive_webui.dps_entry(infotext) == ("task: super_resolution, sr_factor: 4, zeta: 1, rule: polyak, "
                                               "mode: full, y: ac7b577f1f")
    assert drive_webui.error_entry(infotext) == "ValueError: DPS: no measurement image, upload one"
    assert drive_webui.dps_entry("a photo\nSteps: 4, Seed: 1") is None
    line = "[DPS Guidance] measurement distance 20.29 -> 14.72 over 4 guided denoiser calls (0 skipped)"
    assert drive_webui.DISTANCE.findall(line) == [("20.29", "14.72", "4", "0")]


def test_driver_speaks_gradio_4_file_protocol():
    """Forge's gradio 4 takes images as uploaded files: ``/upload`` (multipart, field ``files``) answers the
    server-side paths, and an image output is a ``FileData`` whose ``url`` serves the file."""
    pytest.importorskip("PIL", reason="the driver decodes PNGs with PIL")
    import email.parser
    import http.server
    import json
    import threading

    import drive_webui

    assert drive_webui.gradio_major({"version": "4.40.0"}) == 4
    assert drive_webui.gradio_major({"version": "3.41.2"}) == 3
    assert drive_webui.gradio_major({}) == 3  # gradio 3 pages without a version: the old protocol
    received: dict = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
            message = email.parser.BytesParser().parsebytes(head + body)
            parts = message.get_payload()
            received.update(path=self.path, field=parts[0].get_param("name", header="content-disposition"),
                            filename=parts[0].get_filename(), content=parts[0].get_payload(decode=True))
            self._answer(json.dumps(["cache/gradio/abc/degraded.png"]).encode())

        def do_GET(self):
            received["get"] = self.path
            self._answer(b"PNGBYTES")

        def _answer(self, data: bytes):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        webui = drive_webui.WebUI(url, None, timeout=30)
        content = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) + b"\r\n--not-the-boundary\r\n"
        assert webui.upload("degraded.png", content) == "cache/gradio/abc/degraded.png"
        assert received == {"path": "/upload", "field": "files", "filename": "degraded.png", "content": content}
        assert webui.file_bytes({"path": "cache/gradio/abc/after.png"}) == b"PNGBYTES"
        assert received["get"] == "/file=cache/gradio/abc/after.png"
        assert webui.file_bytes({"path": "x", "url": f"{url}/file=outputs/after.png"}) == b"PNGBYTES"
        assert received["get"] == "/file=outputs/after.png"
    finally:
        server.shutdown()
