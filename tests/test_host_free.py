"""The core never imports a host; the repository imports outside ComfyUI and the WebUI."""

import importlib.util
import json
import subprocess
import sys

from conftest import ROOT

HOSTS = ["comfy", "comfy_extras", "comfy_api", "folder_paths", "modules", "launch", "gradio", "server", "execution"]


def test_dps_imports_with_hosts_blocked():
    code = (
        "import sys, importlib.abc\n"
        f"blocked = {HOSTS!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in blocked: raise ImportError('host import: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import dps, dps.operators, dps.noise, dps.guidance, dps.sampling, dps.gmm, dps.metrics, dps.cli\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_repository_root_imports_as_a_comfyui_package():
    spec = importlib.util.spec_from_file_location("dps_guidance_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dps_guidance_pack"] = module
    try:
        spec.loader.exec_module(module)
        # V3 pack: ComfyUI calls comfy_entrypoint, which only exists when comfy_api is importable; a V1
        # NODE_CLASS_MAPPINGS would make ComfyUI skip the entry point.
        assert not hasattr(module, "NODE_CLASS_MAPPINGS")
        hook = importlib.import_module("dps_guidance_pack.nodes.hook")
        builders = importlib.import_module("dps_guidance_pack.nodes.builders")
        assert callable(hook.apply_dps) and callable(builders.measure)
    finally:
        for name in [n for n in sys.modules if n == "dps_guidance_pack" or n.startswith("dps_guidance_pack.")]:
            sys.modules.pop(name, None)


def test_smoke_command_prints_json_where_dps_beats_unconditional():
    out = subprocess.run([sys.executable, "-m", "dps", "smoke", "--json", "--steps", "50"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    sw = json.loads(out.stdout)["sliced_wasserstein_to_exact_posterior"]
    assert sw["dps"] < 0.5 * sw["unconditional"]


def test_install_never_names_torch():
    text = (ROOT / "install.py").read_text()
    requirements = text.split("REQUIREMENTS = ", 1)[1].split("\n", 1)[0]
    assert "torch" not in requirements
