"""The core never imports a host nor the demo application; the repository imports outside ComfyUI and the WebUI."""

import ast
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
        "import dps, dps.operators, dps.noise, dps.guidance, dps.sampling, dps.host, dps.app, dps.app.cli, dps.app.train\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _imported_modules(path, package):
    """Absolute names of the modules that ``path`` (a module of ``package``) imports, relative imports resolved."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]  # ``from .. import app``
    return names


def test_core_never_imports_the_app():
    core = sorted((ROOT / "dps").glob("*.py")) + sorted((ROOT / "dps" / "operators").glob("*.py"))
    assert ROOT / "dps" / "guidance.py" in core and ROOT / "dps" / "operators" / "base.py" in core
    offenders = {}
    for path in core:
        parts = path.relative_to(ROOT).with_suffix("").parts
        package = ".".join(parts if parts[-1] == "__init__" else parts[:-1]).removesuffix(".__init__")
        bad = [m for m in _imported_modules(path, package) if m == "dps.app" or m.startswith("dps.app.")]
        if bad and path.name != "__main__.py":  # ``python -m dps`` hands over to the app's command line
            offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, offenders


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
