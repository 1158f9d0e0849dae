"""Both toy bases (SD1.5 and the flow base), pretrained where they are not cached; in the background for the tests.

Usage (from scripts/): ../.venv/bin/python -m toyworld.bases

The test session starts this at the lowest CPU priority (`start_in_background`) and runs the toy-world tests last:
the rest of the suite keeps about three quarters of a core idle on 2 cores (server start-ups, HTTP round trips,
browsers), which the pretraining takes without slowing the other tests; the toy-world fixtures `wait` for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_job: subprocess.Popen | None = None


def cached(seed: int = 0) -> bool:
    from . import flow, pretrain

    return pretrain.checkpoint_path(seed).exists() and flow.checkpoint_path(seed).exists()


def start_in_background(seed: int = 0) -> None:
    """Pretrain the bases not cached yet in a process at the lowest priority (once per session)."""
    global _job
    if _job is not None or cached(seed):
        return
    from .pretrain import cache_dir

    scripts = Path(__file__).resolve().parents[1]
    log = open(cache_dir() / "bases.log", "ab")  # noqa: SIM115 (the child writes to it until it ends)
    _job = subprocess.Popen([sys.executable, "-m", "toyworld.bases", "--seed", str(seed)], cwd=scripts, stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ), preexec_fn=lambda: os.nice(19))
    log.close()


def wait() -> None:
    """Until the background pretraining (if any) has ended; a failed one leaves the pretraining to the caller."""
    if _job is not None:
        _job.wait()


def stop() -> None:
    """End the background pretraining (the session is over); its atomic writes leave no partial file."""
    if _job is not None and _job.poll() is None:
        _job.terminate()
        _job.wait()


def main() -> None:
    import argparse

    from . import flow, pretrain

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    seed = parser.parse_args().seed
    pretrain.pretrain(seed, log=lambda m: print(m, flush=True))
    flow.pretrain(seed, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
