"""Run ``python -m dps ...`` many times quickly: one interpreter imports torch and dps once, then forks a child per
command, which runs the ``dps`` package's ``__main__`` exactly as ``python -m dps`` does (runpy), with its own
working directory, stdout and stderr. An uncaught exception prints its traceback and exits 1, as the interpreter
would. Used by tests/test_bad_inputs.py (a plain subprocess per case would spend ~2 s importing torch each time).

Protocol: one JSON request per line on stdin, ``{"argv": [...], "cwd": "...", "mode": "forbid"}``, one JSON
reply per line on stdout, ``{"rc": int, "stdout": str, "stderr": str}``. ``mode``:

* ``"forbid"``: sampling and training must not start (each case must fail first); if they do, the child raises
  ``AssertionError("... started")``, which the command line does not catch: a traceback, so the case fails.
* ``"allow"``: run normally.
* ``"interrupt"`` / ``"runtime_error"`` / ``"os_error"``: sampling raises KeyboardInterrupt / a torch-like
  RuntimeError / an IsADirectoryError at once.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import traceback

import dps.app.cli  # noqa: F401  (imported once here, shared by every child)
import dps.app.demo
import dps.app.restore
import dps.app.train
import torch  # noqa: F401

PATCHED = {"sampling": [(dps.app.restore, "draw"), (dps.app.demo, "draw")],
           "training": [(dps.app.train, "train")]}


def _raiser(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc
    return fail


def _patch(mode: str) -> None:
    for what, targets in PATCHED.items():
        for module, name in targets:
            if not hasattr(module, name):
                raise RuntimeError(f"cli_forkserver: {module.__name__}.{name} is gone; update PATCHED")
            if mode == "forbid":
                setattr(module, name, _raiser(AssertionError(f"{what} started ({module.__name__}.{name})")))
            elif mode == "interrupt" and what == "sampling":
                setattr(module, name, _raiser(KeyboardInterrupt()))
            elif mode == "runtime_error" and what == "sampling":
                setattr(module, name, _raiser(RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")))
            elif mode == "os_error" and what == "sampling":
                setattr(module, name, _raiser(IsADirectoryError(21, "Is a directory", "/some/folder")))


def _child(request: dict, out_path: str, err_path: str) -> None:
    code = 1
    try:
        for fd, path in ((1, out_path), (2, err_path)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd)
            os.close(f)
        sys.stdin = open(os.devnull)
        os.environ.pop("DPS_TRACEBACK", None)
        os.chdir(request["cwd"])
        _patch(request.get("mode", "forbid"))
        sys.argv = ["python -m dps", *request["argv"]]
        try:
            runpy.run_module("dps", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001  as the interpreter: print the traceback, exit 1
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="dps_cli_")
    out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
    protocol = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request, out_path, err_path)
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        with open(out_path, errors="replace") as f_out, open(err_path, errors="replace") as f_err:
            reply = {"rc": rc, "stdout": f_out.read(), "stderr": f_err.read()}
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()


if __name__ == "__main__":
    main()
