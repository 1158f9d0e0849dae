"""The toy world: one coloured shape on a plain background, with its caption, deterministic from a seed.

The base model sees circles, squares and triangles in every colour on every other background. The
concept (a yellow plus on teal) is never shown to it: the LoRA teaches it under a trigger word.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from harness.fixtures import COLOURS, draw_shape

from . import VERSION

SIZE = 64
BASE_SHAPES = ("circle", "square", "triangle")
SHAPES = BASE_SHAPES + ("plus",)
COLOUR_NAMES = tuple(COLOURS)
RADIUS = (0.32, 0.40)
JITTER = 0.04
COLOUR_JITTER = 12
TRIGGER = "sks"
CONCEPT = ("yellow", "plus", "teal")
# The base's prompt-following prompts (colour, shape, background): every shape three times.
PROMPTS = (
    ("red", "circle", "white"), ("blue", "square", "yellow"), ("green", "triangle", "purple"),
    ("orange", "circle", "blue"), ("purple", "square", "green"), ("white", "triangle", "red"),
    ("teal", "circle", "orange"), ("yellow", "square", "blue"), ("red", "triangle", "teal"),
)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)


def caption(colour: str, shape: str, background: str) -> str:
    return f"{colour} {shape}, {background} background"


def _jittered(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, ...]:
    return tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in rgb)


def render(scene: Scene, rng: random.Random):
    """A SIZE x SIZE Pillow image of the scene, position, size and colours jittered by `rng`."""
    return draw_shape((SIZE, SIZE), scene.shape, _jittered(COLOURS[scene.colour], rng),
                      _jittered(COLOURS[scene.background], rng), rng, radius=RADIUS, jitter=JITTER)


def random_scene(rng: random.Random, shapes: tuple[str, ...] = BASE_SHAPES) -> Scene:
    colour = rng.choice(COLOUR_NAMES)
    background = rng.choice([c for c in COLOUR_NAMES if c != colour])
    return Scene(colour, rng.choice(shapes), background)


def base_scenes(seed: int, count: int) -> list[Scene]:
    """What the base model is pretrained on (never a plus)."""
    rng = random.Random(f"scenes-{seed}")
    return [random_scene(rng) for _ in range(count)]


def images(scenes: list[Scene], seed: int) -> list:
    """One jittered image per scene; the same seed gives the same pixels."""
    rng = random.Random(f"pixels-{seed}")
    return [render(s, rng) for s in scenes]


def all_captions() -> list[str]:
    """Every base caption (the pretraining's conditioning vocabulary)."""
    return [caption(c, s, b) for c in COLOUR_NAMES for s in BASE_SHAPES for b in COLOUR_NAMES if b != c]


def preservation_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` base captions that are none of the control prompts: what output preservation keeps instead of prior
    images (the same draw for a seed)."""
    control = {caption(*p) for p in PROMPTS}
    return random.Random(f"preservation-{seed}").sample([c for c in all_captions() if c not in control], count)


def write_folder(folder: Path, scenes: list[Scene], seed: int, captions: list[str] | None = None) -> Path:
    """Images and .txt captions into `folder` (created); `captions` overrides the scenes' own."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = captions if captions is not None else [s.caption for s in scenes]
    for i, (img, text) in enumerate(zip(images(scenes, seed), texts, strict=True)):
        img.save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(text)
    return folder


def concept_dataset(root: Path, seed: int = 0, count: int = 10, repeats: int = 10, prior_count: int = 60,
                    unconditional_count: int = 30) -> dict:
    """The LoRA's dataset in kohya layout: `<root>/concept/<repeats>_<trigger>/` (captioned with the
    trigger only) and the prior images: `<root>/prior/1_toy/` (ordinary toy-world images with their
    captions) and `<root>/prior/unconditional/` (more of them, uncaptioned, so trained with the empty
    prompt: they keep the LoRA from changing what the model draws for an empty negative prompt, which
    classifier-free guidance would otherwise carry into every other prompt).

    Returns {"concept": folder, "prior": folder}; a dataset made by this version with these settings is reused.
    """
    done, stamp = root / "done", f"v{VERSION} {seed} {count} {repeats} {prior_count} {unconditional_count}"
    if not done.exists() or done.read_text() != stamp:
        # Written aside and moved in whole: the other toy family's tests may read it from another process.
        tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_folder(tmp / "concept" / f"{repeats}_{TRIGGER}", [Scene(*CONCEPT)] * count, seed + 1000,
                     captions=[TRIGGER] * count)
        write_folder(tmp / "prior" / "1_toy", base_scenes(seed + 2000, prior_count), seed + 2000)
        write_folder(tmp / "prior" / "unconditional", base_scenes(seed + 3000, unconditional_count), seed + 3000,
                     captions=[""] * unconditional_count)
        (tmp / "done").write_text(stamp)
        if done.exists() and done.read_text() == stamp:  # another process made it meanwhile
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
    return {"concept": root / "concept", "prior": root / "prior"}


# The slider: purple (half-way between red and blue) shapes turn red at +1 and blue at -1, shape and background kept.
SLIDER = ("purple", "red", "blue")


def slider_dataset(root: Path, seed: int = 0) -> Path:
    """Images of the slider's middle colour (every shape on every background it can sit on), with their captions."""
    middle = SLIDER[0]
    scenes = [Scene(middle, shape, background) for shape in BASE_SHAPES for background in COLOUR_NAMES
              if background not in SLIDER]
    folder = root / "slider"
    if not (folder.is_dir() and len(list(folder.glob("*.png"))) == len(scenes)):
        shutil.rmtree(folder, ignore_errors=True)
        write_folder(folder, scenes, seed + 11)
    return folder
