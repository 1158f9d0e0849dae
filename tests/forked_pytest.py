"""A pytest process that has imported torch and the ComfyUI host once and runs each test it is given in a fork of
itself: the mutants' tests (tests/mutants.py) each start from those imports instead of paying seconds for them again.

Run in a copy of the repository (its working directory) with that copy's environment; nothing of the pack is imported
before the fork, so each test imports the copy's files as they are at that moment. Reads one JSON line per test,
[node id, log path, timeout seconds], and answers one, {"code": pytest's exit code, or null after a timeout}.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path.cwd()


def preload() -> None:
    """torch and the host's modules (never mutated); then check that none of the copy's own code was imported."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401
    from harness.comfy import setup_inprocess

    setup_inprocess()
    import comfy.model_management  # noqa: F401
    import comfy.samplers  # noqa: F401
    import comfy.sd  # noqa: F401

    sys.path.remove(str(ROOT / "scripts"))
    ours = [name for name, module in list(sys.modules.items())
            if (path := getattr(module, "__file__", None)) and Path(path).is_absolute()
            and Path(path).resolve().is_relative_to(ROOT) and name.partition(".")[0] not in ("harness", "__main__", "__mp_main__")]
    if ours:
        raise RuntimeError(f"imported before the fork, so a mutant of them would not be seen: {ours}")


def run(test: str, log: str, timeout: float) -> int | None:
    pid = os.fork()
    if pid == 0:
        try:
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(out, 2)
            import pytest

            code = int(pytest.main([test, "-x", "-q", "-p", "no:cacheprovider"]))
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(locals().get("code", 3))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def main() -> None:
    sys.path[0] = str(ROOT)  # as `python -m pytest` has it: the working directory first, not this file's folder
    preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        test, log, timeout = json.loads(line)
        print(json.dumps({"code": run(test, log, timeout)}), flush=True)


if __name__ == "__main__":
    main()
