"""Packaging: the Comfy Registry metadata, what the registry archive leaves out, the ruff rules the registry runs,
the installer hook (no runtime pip outside the WebUI's own helpers) and the README's two commands in .ci/run."""

import ast
import importlib.util
import re
import shutil
import subprocess
import sys
import types

import pytest

from conftest import ROOT

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- registry metadata (the rules of comfy-cli's pyproject parser, docs.comfy.org/registry/specifications) ---

def test_registry_required_fields():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", project["name"]) and len(project["name"]) < 100
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert {"Documentation", "Issues"} <= set(project["urls"])
    assert comfy["PublisherId"] and comfy["DisplayName"]


def test_the_declared_licence_is_shipped():
    assert PYPROJECT["project"]["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text


def test_requires_comfyui_is_a_version_range_the_registry_accepts():
    part = r"(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)"
    spec = PYPROJECT["tool"]["comfy"]["requires-comfyui"]
    assert all(re.fullmatch(part, p.strip()) for p in spec.split(","))


def test_classifiers_are_ones_the_registry_reads():
    classifiers = PYPROJECT["project"]["classifiers"]
    os_values = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    env_values = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")]
    assert os_values and all(v.startswith(("Microsoft", "POSIX", "MacOS", "OS Independent")) for v in os_values)
    assert env_values and set(env_values) <= {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc",
                                              "NPU :: Huawei Ascend", "GPU :: Apple Metal"}
    # setuptools >= 77 refuses a License classifier beside an SPDX license expression
    assert isinstance(PYPROJECT["project"]["license"], str)
    assert not any(c.startswith("License ::") for c in classifiers)


def test_icon_is_a_repository_file_at_the_repository_url():
    icon = PYPROJECT["tool"]["comfy"]["Icon"]
    repo = PYPROJECT["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert icon.startswith(prefix)
    path = ROOT / icon.removeprefix(prefix)
    assert path.suffix in (".svg", ".png") and path.is_file()
    if path.suffix == ".svg":
        text = path.read_text()
        assert text.lstrip().startswith("<svg") and 'viewBox="0 0 256 256"' in text


def _ignore_patterns() -> list[str]:
    lines = (ROOT / ".comfyignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """gitwildmatch for the simple patterns .comfyignore uses: `dir/` (anything under it) and plain names."""
    parts = path.split("/")
    for pattern in patterns:
        if pattern.endswith("/"):
            if pattern[:-1] in parts[:-1]:
                return True
        elif pattern in parts:
            return True
    return False


def test_comfyignore_leaves_out_development_files_and_keeps_the_node_pack():
    patterns = _ignore_patterns()
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+/?", p) for p in patterns), "keep the patterns simple (see _ignored)"
    for dev in ("tests/test_packaging.py", "bench/gmm.py", ".ci/run", ".github/workflows/publish.yml"):
        assert _ignored(dev, patterns), dev
    for needed in ("__init__.py", "nodes/v3.py", "nodes/hook.py", "dps/guidance.py", "dps/operators/__init__.py",
                   "pyproject.toml", "requirements.txt", "README.md", "install.py",
                   "example_workflows/dps_super_resolution.json"):
        assert not _ignored(needed, patterns), needed
    if shutil.which("git") and (ROOT / ".git").exists():
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
        shipped = [f for f in tracked if not _ignored(f, patterns)]
        assert any(f.startswith("nodes/") for f in shipped) and not any(f.startswith("tests/") for f in shipped)


def test_publish_workflow_runs_only_with_the_publisher_key():
    text = (ROOT / ".github" / "workflows" / "publish.yml").read_text()
    assert "Comfy-Org/publish-node-action@" in text and "workflow_dispatch:" in text
    assert "personal_access_token: ${{ secrets.REGISTRY_ACCESS_TOKEN }}" in text
    guarded = re.findall(r"if: \$\{\{ env.REGISTRY_ACCESS_TOKEN != '' \}\}", text)
    assert len(guarded) == text.count("uses:"), "every step that checks out or publishes waits for the key"


def test_ruff_rules_of_comfy_node_validate_pass():
    """`comfy node validate` runs `ruff check . --select S102,S307,E702` (exec, eval, one-line statements)."""
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' brings it)")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", ".", "--select", "S102,S307,E702",
                          "--no-cache", "--output-format", "concise"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# --- install.py: the WebUI's launch helpers only ---

def _load_install():
    spec = importlib.util.spec_from_file_location("dps_install_under_test", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeLaunch(types.ModuleType):
    def __init__(self, installed: set[str]):
        super().__init__("launch")
        self.installed, self.pip_calls = installed, []

    def is_installed(self, name: str) -> bool:
        return name in self.installed

    def run_pip(self, command: str, desc: str | None = None) -> None:
        self.pip_calls.append(command)


def _no_processes(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"install.py started a process: {args}")
    for name in ("run", "call", "check_call", "check_output", "Popen"):
        monkeypatch.setattr(subprocess, name, refuse)
    monkeypatch.setattr("os.system", refuse)


def test_install_in_the_webui_asks_launch_for_what_is_missing_only(monkeypatch):
    _no_processes(monkeypatch)
    launch = FakeLaunch(installed={"numpy", "safetensors"})
    monkeypatch.setitem(sys.modules, "launch", launch)
    assert _load_install().main() == 0
    assert launch.pip_calls == ['install "einops>=0.7"']


def test_install_in_a_complete_webui_installs_nothing_and_never_torch(monkeypatch):
    _no_processes(monkeypatch)
    launch = FakeLaunch(installed={"numpy", "safetensors", "einops"})
    monkeypatch.setitem(sys.modules, "launch", launch)
    install = _load_install()
    assert install.main() == 0 and launch.pip_calls == []
    empty = FakeLaunch(installed=set())
    install.install(empty)
    assert empty.pip_calls and not any("torch" in call for call in empty.pip_calls)


def test_install_outside_the_webui_installs_nothing(monkeypatch, capsys):
    _no_processes(monkeypatch)
    monkeypatch.setitem(sys.modules, "launch", None)  # `import launch` raises ImportError
    assert _load_install().main() == 0
    assert "ComfyUI installs requirements.txt itself" in capsys.readouterr().err


def test_install_py_imports_no_process_module():
    tree = ast.parse((ROOT / "install.py").read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
             for alias in node.names} | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not names & {"subprocess", "os", "pip", "runpy"}, names


# --- the README's two commands are what .ci/run runs ---

BEGIN, END = "<!-- two-commands:begin -->", "<!-- two-commands:end -->"


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"README.md must hold {BEGIN} ... {END} once"
    section = text.split(BEGIN, 1)[1].split(END, 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    start = lines.index("# --- the README's two commands, verbatim ---")
    return [line for line in lines[start + 1:] if line.strip() and not line.startswith("#")]


def test_ci_runs_exactly_the_readme_two_commands():
    commands = readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    assert ci_commands() == commands


def test_the_first_command_sets_up_pytest_and_the_demo_and_pins_torch():
    setup, tests = readme_commands()
    assert setup.startswith("python3 -m venv .venv && ") and "torch==2.13.0" in setup
    assert "[test]" in setup and setup.endswith("python -m dps demo")
    assert "python -m pytest" in tests and ".venv" in tests
