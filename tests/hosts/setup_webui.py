"""Set up and start a live Stable Diffusion WebUI (AUTOMATIC1111 or Forge) on a CPU machine with no internet but
the package registries, with this repository installed as an extension (a symlink in ``extensions/``).

    python3 tests/hosts/setup_webui.py setup a1111 --dest DIR --venv DIR --source GIT [--commit C] \
        [--git-mirror TEMPLATE] [--tokenizer-from COMFYUI] [--torch "torch===2.13.0 torchvision===0.28.0"]
    python3 tests/hosts/setup_webui.py start --dest DIR --venv DIR [--port 7860] [--nowebui]

``setup`` (idempotent; each step is skipped when already done):
1. clones the host from ``--source`` (a git URL, a local clone or a bare mirror) at ``--commit``;
2. clones the repositories the host's launcher would clone (read from its ``modules/launch_utils.py``: names,
   URLs and pinned commits), each from ``--git-mirror`` (a template such as ``/mirrors/{owner}+{name}/repo``; by
   default the URL itself). Snapshots that lack some large blobs (pictures) are checked out without them;
3. makes a venv with torch (``--torch``, pip requirement strings; the default takes the PyPI build, which runs on
   CPU) and the host's ``requirements_versions.txt`` with two changes: torch is left as installed, and
   ``setuptools==69.5.1`` becomes ``>=77.0.3,<81`` (torch >= 2.6 needs the newer setuptools; <81 still ships
   ``pkg_resources``). The changed file is ``DEST/requirements_live.txt``; ``start`` gives it to the launcher as
   ``REQS_FILE``, so the launcher's own requirements check passes and installs nothing;
4. AUTOMATIC1111 only: the CLIP ViT-L/14 tokenizer and text config for ``openai/clip-vit-large-patch14`` in a
   Hugging Face cache under ``DEST/.hf`` (copied from ComfyUI's source: ``comfy/sd1_tokenizer/`` and
   ``comfy/sd1_clip_config.json``; ``--tokenizer-from`` is a ComfyUI checkout or bare mirror). Forge ships them;
5. writes the random-weight SD1.5 checkpoint (``make_sd15_checkpoint.py``) to ``models/Stable-diffusion/``;
6. links this repository into ``extensions/dps-guidance``.

``start`` runs the host's own ``launch.py`` (its environment preparation included, which then only checks, and
runs the extensions' ``install.py``) with ``--skip-torch-cuda-test --use-cpu all --no-half --precision full --api``
and an offline Hugging Face cache. It runs in the foreground; stop it with Ctrl-C or ``POST /sdapi/v1/server-stop``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
EXTENSION_NAME = "dps-guidance"
CHECKPOINT = "sd15-random.safetensors"
CLIP_REPO_ID = "openai/clip-vit-large-patch14"
CLIP_REVISION = "0" * 40  # a local cache entry; the hub is never asked
DEFAULT_TORCH = "torch===2.13.0 torchvision===0.28.0"
CPU_FLAGS = ["--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--precision", "full", "--api",
             "--api-server-stop", "--no-download-sd-model", "--do-not-download-clip", "--skip-version-check"]


def log(message: str) -> None:
    print(f"[setup_webui] {message}", flush=True)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def git(*args: str, cwd: Path | None = None, capture: bool = False, input: str | None = None) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, check=True, text=True, input=input,
                         stdout=subprocess.PIPE if capture else None)
    return out.stdout if capture else ""


def checkout_tolerant(source: str, dest: Path, commit: str | None) -> list[str]:
    """Clone ``source`` into ``dest`` at ``commit`` (HEAD detached there). Files whose blobs the source lacks
    (repository snapshots leave out some large pictures) are skipped; returns their paths."""
    if (dest / ".git").exists():
        head = git("rev-parse", "HEAD", cwd=dest, capture=True).strip()
        if commit is None or head.startswith(commit) or commit.startswith(head):
            return []
        raise SystemExit(f"{dest} exists at {head}, not at {commit}; remove it or pass the right --commit")
    git("clone", "--quiet", "--no-checkout", "--config", "core.filemode=false", source, str(dest))
    commit = git("rev-parse", f"{commit or 'HEAD'}^{{commit}}", cwd=dest, capture=True).strip()
    git("update-ref", "--no-deref", "HEAD", commit, cwd=dest)
    git("read-tree", commit, cwd=dest)
    entries = git("ls-tree", "-r", "-z", commit, cwd=dest, capture=True).split("\0")
    blobs = [(e.split("\t", 1)[1], e.split()[2]) for e in entries if e and e.split()[1] == "blob"]
    check = git("cat-file", "--batch-check", cwd=dest, capture=True, input="".join(f"{sha}\n" for _, sha in blobs))
    missing = [path for (path, _), line in zip(blobs, check.splitlines()) if line.endswith("missing")]
    present = [path for path, _ in blobs if path not in set(missing)]
    subprocess.run(["git", "checkout-index", "-f", "-z", "--stdin"], cwd=dest, check=True,
                   input="\0".join(present) + "\0", text=True)
    log(f"{dest.name} at {commit[:10]}" + (f" ({len(missing)} files absent from the source: {missing[:3]}...)"
                                            if missing else ""))
    return missing


def mirror_of(url: str, template: str | None) -> str:
    if not template:
        return url
    m = re.search(r"github\.com[/:]([^/]+)/([^/]+?)(?:\.git)?/?$", url)
    if not m:
        return url
    return template.format(owner=m.group(1), name=m.group(2))


def host_repositories(root: Path) -> list[tuple[str, str, str | None]]:
    """(directory under repositories/, URL, commit) for every ``git_clone`` the launcher runs (not commented out)."""
    source = (root / "modules" / "launch_utils.py").read_text(encoding="utf-8")
    values = dict(re.findall(r"^\s*(\w+)\s*=\s*os\.environ\.get\(\s*'\w+'\s*,\s*[\"']([^\"']+)[\"']\s*\)", source, re.M))
    out = []
    for var, name, commit_var in re.findall(r"^\s*git_clone\((\w+),\s*repo_dir\('([^']+)'\),\s*[^,]+,\s*(\w+)\)",
                                            source, re.M):
        out.append((name, values[var], values.get(commit_var)))
    return out


def is_forge(root: Path) -> bool:
    return (root / "backend").is_dir()


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def pip(venv: Path, *args: str) -> None:
    run([venv_python(venv), "-m", "pip", "install", *args])


def installed_version(venv: Path, package: str) -> str | None:
    out = subprocess.run([venv_python(venv), "-c", f"import importlib.metadata as m; print(m.version('{package}'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def live_requirements(root: Path) -> Path:
    """The host's requirements, torch left out and setuptools relaxed (see the module docstring)."""
    lines = []
    for line in (root / "requirements_versions.txt").read_text(encoding="utf-8").splitlines():
        name = re.split(r"[=<>~! #\[]", line.strip(), maxsplit=1)[0].lower()
        if name in ("torch", "torchvision"):
            continue
        if name == "setuptools":
            line = "setuptools>=77.0.3,<81"
        lines.append(line)
    path = root / "requirements_live.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def setup_venv(root: Path, venv: Path, torch_spec: str) -> None:
    if not venv_python(venv).exists():
        run([sys.executable, "-m", "venv", str(venv)])
    if installed_version(venv, "torch") is None:
        pip(venv, *torch_spec.split())
    torch_v, vision_v = installed_version(venv, "torch"), installed_version(venv, "torchvision")
    constraints = root / "constraints_live.txt"
    requirements = live_requirements(root)
    # torch as installed and the host's own pins: also given to the launcher as PIP_CONSTRAINT, so that the
    # built-in extensions' installers (Forge's legacy preprocessors pull mediapipe, which wants numpy 2) keep them
    pins = [line.split("#")[0].strip() for line in requirements.read_text(encoding="utf-8").splitlines()
            if re.match(r"^[-_.A-Za-z0-9]+==", line.strip())]
    constraints.write_text("\n".join([f"torch==={torch_v}", f"torchvision==={vision_v}", *pins]) + "\n",
                           encoding="utf-8")
    # pip leaves satisfied pins alone; the constraints keep torch as it is
    pip(venv, "-r", str(requirements), "-c", str(constraints))
    if "clip_package" in (root / "modules" / "launch_utils.py").read_text(encoding="utf-8") and \
            installed_version(venv, "openai-clip") is None and installed_version(venv, "clip") is None:
        pip(venv, "openai-clip==1.0.1", "-c", str(constraints))  # the launcher's "clip" (OpenAI CLIP) from PyPI


def comfy_file(source: Path, relative: str) -> bytes:
    if (source / relative).is_file():
        return (source / relative).read_bytes()
    return subprocess.run(["git", "--git-dir", str(source), "show", f"HEAD:{relative}"], check=True,
                          capture_output=True).stdout


def install_tokenizer(root: Path, comfyui: Path) -> None:
    """A Hugging Face cache entry for openai/clip-vit-large-patch14: tokenizer files and the text config."""
    snapshot = root / ".hf" / "hub" / ("models--" + CLIP_REPO_ID.replace("/", "--")) / "snapshots" / CLIP_REVISION
    if (snapshot / "config.json").exists():
        return
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        (snapshot / name).write_bytes(comfy_file(comfyui, f"comfy/sd1_tokenizer/{name}"))
    config = json.loads(comfy_file(comfyui, "comfy/sd1_tokenizer/tokenizer_config.json"))
    config["model_max_length"] = 77  # as on the hub (ComfyUI raises it for its own chunking)
    config.pop("special_tokens_map_file", None)
    (snapshot / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (snapshot / "config.json").write_bytes(comfy_file(comfyui, "comfy/sd1_clip_config.json"))
    refs = snapshot.parents[1] / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text(CLIP_REVISION, encoding="utf-8")
    log(f"CLIP tokenizer and text config in {snapshot}")


def setup(args: argparse.Namespace) -> None:
    root, venv = args.dest.resolve(), args.venv.resolve()
    if REPO in root.parents or root == REPO or REPO in venv.parents:
        raise SystemExit("put the host and its venv outside this repository")
    checkout_tolerant(args.source, root, args.commit)
    (root / "repositories").mkdir(exist_ok=True)
    for name, url, commit in host_repositories(root):
        checkout_tolerant(mirror_of(url, args.git_mirror), root / "repositories" / name, commit)
    setup_venv(root, venv, args.torch)
    if not is_forge(root):
        if args.tokenizer_from is None:
            raise SystemExit("AUTOMATIC1111 needs the CLIP tokenizer files: pass --tokenizer-from COMFYUI (a ComfyUI "
                             "checkout or mirror; its comfy/sd1_tokenizer/ holds them)")
        install_tokenizer(root, args.tokenizer_from)
    checkpoint = root / "models" / "Stable-diffusion" / CHECKPOINT
    if not checkpoint.exists():
        run([venv_python(venv), HERE / "make_sd15_checkpoint.py", checkpoint, "--seed", str(args.seed)])
    link = root / "extensions" / EXTENSION_NAME
    link.parent.mkdir(exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(REPO, target_is_directory=True)
    log(f"ready: python3 {Path(__file__).relative_to(REPO)} start --dest {root} --venv {venv}")


def start(args: argparse.Namespace) -> None:
    root, venv = args.dest.resolve(), args.venv.resolve()
    env = dict(os.environ)
    env.update(HF_HOME=str(root / ".hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               GRADIO_ANALYTICS_ENABLED="False", DO_NOT_TRACK="1", REQS_FILE=str(root / "requirements_live.txt"),
               PIP_CONSTRAINT=str(root / "constraints_live.txt"),
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv))
    flags = CPU_FLAGS + ["--port", str(args.port), "--ckpt", str(root / "models" / "Stable-diffusion" / CHECKPOINT)]
    if is_forge(root):
        flags.append("--always-cpu")  # Forge's backend picks its device itself (backend/args.py)
    if args.nowebui:
        flags.append("--nowebui")
    cmd = [str(venv_python(venv)), "launch.py", *flags, *args.extra]
    log("$ " + " ".join(cmd))
    os.chdir(root)
    os.execve(cmd[0], cmd, env)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("setup", help="clone, install and prepare a host")
    s.add_argument("host", choices=("a1111", "forge"), help="which WebUI (checked against the source's layout)")
    s.add_argument("--dest", type=Path, required=True, help="where the host goes (outside this repository)")
    s.add_argument("--venv", type=Path, required=True, help="the host's virtual environment")
    s.add_argument("--source", required=True, help="the host's git URL, local clone or bare mirror")
    s.add_argument("--commit", help="the host commit (default: the source's HEAD)")
    s.add_argument("--git-mirror", help="template for the launcher's repositories, e.g. '/m/{owner}+{name}/repo'")
    s.add_argument("--tokenizer-from", type=Path, help="a ComfyUI checkout or bare mirror (AUTOMATIC1111 only)")
    s.add_argument("--torch", default=DEFAULT_TORCH, help=f"pip requirements for torch (default {DEFAULT_TORCH!r})")
    s.add_argument("--seed", type=int, default=0, help="seed of the random checkpoint")
    t = sub.add_parser("start", help="run the host's launch.py on CPU with the API")
    t.add_argument("--dest", type=Path, required=True)
    t.add_argument("--venv", type=Path, required=True)
    t.add_argument("--port", type=int, default=7860)
    t.add_argument("--nowebui", action="store_true", help="API only (no page for the browser check)")
    t.add_argument("extra", nargs="*", help="more launch.py flags (after --)")
    args = parser.parse_args(argv)
    if args.command == "setup":
        setup(args)
        root = args.dest.resolve()
        if (args.host == "forge") != is_forge(root):
            raise SystemExit(f"{root} does not look like {args.host}")
    else:
        start(args)


if __name__ == "__main__":
    main()
