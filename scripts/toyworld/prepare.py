"""Make both toy bases and their judges (each cached once): what the toy-world tests and the main job read.

Usage (from scripts/): ../.venv/bin/python -m toyworld.prepare [--seed 0]

The test controller runs it under pytest-xdist before the workers start.
"""

from __future__ import annotations

import argparse

FAMILIES = ("sd15", "sd3")


def prepare(seed: int = 0, log=print, families: tuple[str, ...] = FAMILIES) -> None:
    """Make the base of each of `families` and its judge (each cached once)."""
    from . import flow, pretrain
    from .judge import train_judge

    makers = {"sd15": pretrain.pretrain, "sd3": flow.pretrain}
    for family in families:
        train_judge(makers[family](seed, log=log), seed, log=log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    prepare(parser.parse_args().seed, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
