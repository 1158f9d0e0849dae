"""Caption processing (kohya style): trigger word, kept tokens, tag shuffle and dropout, caption dropout."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass


@dataclass
class CaptionOptions:
    """How a raw caption becomes the text one training step sees.

    keep_tokens counts tags from the front of the caption after the trigger word has been put there,
    so the trigger word is always kept, whether it was in the caption or added.
    """

    trigger_word: str = ""
    prefix: str = ""
    suffix: str = ""
    shuffle_tags: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    tag_dropout: float = 0.0
    separator: str = ", "

    def __post_init__(self) -> None:
        for name in ("caption_dropout", "tag_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be 0 or more, got {self.keep_tokens}")


def split_tags(text: str) -> list[str]:
    """Comma-separated tags, whitespace-normalised, empty ones dropped."""
    tags = (" ".join(part.split()) for part in text.split(","))
    return [tag for tag in tags if tag]


def process_caption(text: str, options: CaptionOptions, rng: random.Random) -> str:
    """The caption for one step; the same rng state gives the same result."""
    if options.caption_dropout > 0 and rng.random() < options.caption_dropout:
        return ""
    tags = split_tags(text)
    trigger = split_tags(options.trigger_word)
    if trigger:
        wanted = {t.casefold() for t in trigger}
        tags = trigger + [t for t in tags if t.casefold() not in wanted]
    fixed_count = max(options.keep_tokens, len(trigger))
    fixed, rest = tags[:fixed_count], tags[fixed_count:]
    if options.tag_dropout > 0:
        rest = [t for t in rest if rng.random() >= options.tag_dropout]
    if options.shuffle_tags:
        rng.shuffle(rest)
    # Prefix and suffix are whole leading/trailing tags: never shuffled or dropped.
    parts = [options.prefix.strip(" ,"), *fixed, *rest, options.suffix.strip(" ,")]
    return options.separator.join(p for p in parts if p)


def tag_frequency(captions_by_folder: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """How often each tag occurs per folder: the shape of kohya's ss_tag_frequency metadata."""
    return {
        folder: dict(Counter(tag for caption in captions for tag in split_tags(caption)))
        for folder, captions in captions_by_folder.items()
    }
