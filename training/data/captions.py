"""Caption processing (kohya style): trigger word, kept tokens, tag shuffle and dropout, caption dropout."""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from ...lora_core.settings import setting

# A caption file above this size is not read (a 10 MB one made Train LoRA tokenize for minutes, past Cancel).
MAX_CAPTION_BYTES = 64 * 1024
# Captions are cut to this many characters: about 1,000 tokens, twice what the longest-reading text encoders are
# trained on (T5-XXL / UMT5: 512 tokens); CLIP reads 75 per chunk and the host would encode every chunk.
MAX_CAPTION_CHARS = 4000


@dataclass
class CaptionOptions:
    """How a raw caption becomes the text one training step sees.

    keep_tokens counts tags from the front of the caption after the trigger word has been put there,
    so the trigger word is always kept, whether it was in the caption or added.
    """

    trigger_word: str = setting("", "Put in front of every caption.")
    prefix: str = setting("", "Text put before every caption (after the trigger word).", kohya="caption_prefix")
    suffix: str = setting("", "Text put after every caption.", kohya="caption_suffix")
    shuffle_tags: bool = setting(False, "Shuffle the comma-separated tags of each caption at every step.",
                                 kohya="shuffle_caption", ss=("ss_shuffle_caption",))
    keep_tokens: int = setting(1, "Tags kept in front while shuffling, counting the trigger word (1 keeps it).",
                               min=0, max=64, kohya="keep_tokens", ss=("ss_keep_tokens",))
    caption_dropout: float = setting(0.0, "Chance that a step sees an empty caption.", min=0.0, max=1.0, step=0.01,
                                     kohya="caption_dropout_rate", ss=("ss_caption_dropout_rate",))
    tag_dropout: float = setting(0.0, "Chance that each tag is left out at a step.", min=0.0, max=1.0, step=0.01,
                                 kohya="caption_tag_dropout_rate")
    separator: str = setting(", ", "What tags are joined with.")
    keep_tokens_separator: str = setting("", "kohya's keep_tokens_separator: in a caption holding it, the tags before "
                                         "it stay in front (in place of keep_tokens), those after a second one stay "
                                         "at the end; it never reaches the text encoder. Empty: none.",
                                         kohya="keep_tokens_separator")

    def __post_init__(self) -> None:
        self.trigger_word = self.trigger_word.strip()
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
    fixed, rest, end = kept_and_free_tags(text, options)
    if options.tag_dropout > 0:
        rest = [t for t in rest if rng.random() >= options.tag_dropout]
    if options.shuffle_tags:
        rng.shuffle(rest)
    # Prefix and suffix are whole leading/trailing tags: never shuffled or dropped.
    parts = [options.prefix.strip(" ,"), *fixed, *rest, *end, options.suffix.strip(" ,")]
    return options.separator.join(p for p in parts if p)


def kept_and_free_tags(text: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """A caption's tags kept in front (the trigger word first), those shuffled and dropped, and those kept at the
    end: split at keep_tokens_separator where the caption holds it (as kohya does), else by keep_tokens."""
    trigger = split_tags(options.trigger_word)
    wanted = {t.casefold() for t in trigger}
    sep = options.keep_tokens_separator
    if sep and sep in text:
        front, _, after = text.partition(sep)
        middle, _, end = after.partition(sep)
        front_tags, rest, end_tags = ([t for t in split_tags(part) if t.casefold() not in wanted]
                                      for part in (front, middle, end))
        return trigger + front_tags, rest, end_tags
    tags = trigger + [t for t in split_tags(text) if t.casefold() not in wanted]
    fixed_count = max(options.keep_tokens, len(trigger))
    return tags[:fixed_count], tags[fixed_count:], []


def with_class(caption: str, trigger_word: str, class_word: str) -> str:
    """The caption with each whole occurrence of the trigger word (any case) said as the class instead: what the
    base model is asked for the class (output preservation)."""
    pattern = _whole_words(trigger_word)
    return pattern.sub(lambda _: class_word, caption) if pattern else caption


def with_side(caption: str, target: str, side: str) -> str:
    """A concept slider's prompt for one side: the caption with `target` (whole words, any case) said as `side`, or
    with `side` added at the end where the caption does not say `target` (or no target is given)."""
    pattern = _whole_words(target)
    if pattern and pattern.search(caption):
        return pattern.sub(lambda _: side, caption)
    return f"{caption}, {side}" if caption.strip() else side


@dataclass(frozen=True)
class SliderSides:
    """A concept slider's two sides and the word in the captions they are said in place of."""

    positive: str
    negative: str
    target: str = ""

    def of(self, caption: str) -> tuple[str, str]:
        """The caption said with the positive side and with the negative side."""
        return with_side(caption, self.target, self.positive), with_side(caption, self.target, self.negative)


def _whole_words(words: str) -> re.Pattern | None:
    """A pattern for each of the comma-separated `words` as a whole word, any case; None for no words."""
    split = split_tags(words)
    if not split:
        return None
    alternatives = "|".join(re.escape(w) for w in sorted(split, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def tag_frequency(captions_by_folder: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """How often each tag occurs per folder: the shape of kohya's ss_tag_frequency metadata."""
    return {
        folder: dict(Counter(tag for caption in captions for tag in split_tags(caption)))
        for folder, captions in captions_by_folder.items()
    }
