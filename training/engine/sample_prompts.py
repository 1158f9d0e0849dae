"""Sample prompts as kohya's sd-scripts reads them: `a prompt --n negative --w 768 --h 512 --s 20 --l 4.5 --d 1`."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

OPTIONS = {"n": "negative prompt", "w": "width", "h": "height", "s": "steps", "l": "CFG scale", "d": "seed"}
# kohya's options that previews here do not use (they sample with euler / normal and the run's own adapter)
KOHYA_IGNORED = {"ss": "sampler", "g": "guidance scale", "cn": "ControlNet image", "am": "network multipliers"}
_OPTION = re.compile(r"(?:^|\s)--(?=\S)")  # an option starts at ` --` followed by its letter, as in sd-scripts


@dataclass(frozen=True)
class SampleDefaults:
    """What a prompt line leaves unset falls back to: the first bucket's size, sample_steps, sample_cfg, seed + i."""

    width: int
    height: int
    steps: int
    cfg: float
    seed: int
    multiple: int = 8  # pixels per latent cell (the VAE's downscale): sizes round down to a multiple of it


@dataclass(frozen=True)
class SamplePrompt:
    """One sample: the prompt, its negative, the image size in pixels, sampler steps, CFG scale and noise seed."""

    prompt: str
    negative: str
    width: int
    height: int
    steps: int
    cfg: float
    seed: int


def parse_sample_prompts(text_lines: list[str], defaults: SampleDefaults) -> list[SamplePrompt]:
    """One SamplePrompt per line; blank lines and lines starting with # are skipped, a bad option raises ValueError."""
    prompts = []
    for number, line in enumerate(text_lines, 1):
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(_parse_line(line, number, defaults, len(prompts)))
    return prompts


def check_sample_prompts(text: str) -> None:
    """Raise the ValueError a bad line of `text` would give (line numbers as the user sees them), sampling nothing."""
    parse_sample_prompts(text.splitlines(), SampleDefaults(64, 64, 1, 1.0, 0))


def _parse_line(line: str, number: int, defaults: SampleDefaults, index: int) -> SamplePrompt:
    prompt, *options = _OPTION.split(line)
    values: dict[str, str] = {}
    for option in options:
        name, *value = option.split(None, 1)
        if name.lower() in KOHYA_IGNORED:
            logging.info("sample_prompts line %d: --%s (kohya's %s) is ignored", number, name,
                         KOHYA_IGNORED[name.lower()])
            continue
        if name.lower() not in OPTIONS:
            raise ValueError(f"sample_prompts line {number}: unknown option --{name} (known: "
                             f"{', '.join(f'--{k} {v}' for k, v in OPTIONS.items())})")
        values[name.lower()] = value[0].strip() if value else ""

    def get(key: str, default):
        return _number(values[key], key, number, defaults.multiple) if key in values else default

    m = defaults.multiple
    return SamplePrompt(prompt.strip(), values.get("n", ""), get("w", defaults.width) // m * m,
                        get("h", defaults.height) // m * m, get("s", defaults.steps), get("l", defaults.cfg),
                        get("d", defaults.seed + index))


def _number(text: str, key: str, line: int, multiple: int) -> int | float:
    """The value of a number option, checked against its range."""
    kind, least, most = {"w": (int, multiple, 16384), "h": (int, multiple, 16384), "s": (int, 1, 10000),
                         "l": (float, 0.0, 100.0), "d": (int, 0, 2**64 - 1)}[key]
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not least <= value <= most:  # `not <=` also refuses nan
        wanted = "a whole number" if kind is int else "a number"
        raise ValueError(f"sample_prompts line {line}: --{key} ({OPTIONS[key]}) needs {wanted} from {least} to {most}, "
                         f"got {text!r}")
    return value
