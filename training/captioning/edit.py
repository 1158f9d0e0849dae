"""Caption editing that is written to the sidecars: trigger word, prefix/suffix, find/replace, blacklist, limits."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..data.captions import split_tags


@dataclass(frozen=True)
class EditOptions:
    """What to change in every caption; the defaults change nothing but tag spacing.

    With a class_word, the trigger word replaces that whole word (any case) wherever it occurs;
    captions without the class word get the trigger word in front instead.
    max_tags counts the caption's own tags, not the trigger word, prefix or suffix.
    """

    trigger_word: str = ""
    class_word: str = ""
    prefix: str = ""
    suffix: str = ""
    replacements: tuple[tuple[str, str], ...] = ()
    blacklist: tuple[str, ...] = ()
    deduplicate: bool = True
    max_tags: int = 0

    def __post_init__(self) -> None:
        if self.max_tags < 0:
            raise ValueError(f"max_tags must be 0 (no limit) or more, got {self.max_tags}")


def parse_replacements(text: str) -> tuple[tuple[str, str], ...]:
    """Lines of `old => new` (an empty new deletes); blank lines are ignored."""
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        old, sep, new = line.partition("=>")
        if not sep or not old.strip():
            raise ValueError(f"find/replace line {number} {line!r}: write it as 'old text => new text'")
        pairs.append((old.strip(), new.strip()))
    return tuple(pairs)


def parse_tag_list(text: str) -> tuple[str, ...]:
    """Tags separated by commas or new lines."""
    return tuple(tag for line in text.splitlines() for tag in split_tags(line))


def tag_key(tag: str) -> str:
    """How tags compare: case, underscores and repeated spaces do not matter."""
    return " ".join(tag.replace("_", " ").split()).casefold()


def edit_caption(text: str, options: EditOptions) -> str:
    """The edited caption (comma-separated tags, or a sentence kept whole when it has no commas)."""
    for old, new in options.replacements:
        text = text.replace(old, new)
    trigger = split_tags(options.trigger_word)
    replaced = 0
    if trigger and options.class_word.strip():
        word = re.escape(" ".join(options.class_word.split()))
        joined = ", ".join(trigger)
        text, replaced = re.subn(rf"(?<!\w){word}(?!\w)", lambda _: joined, text, flags=re.IGNORECASE)
    tags = split_tags(text)
    patterns = [tag_key(p) for p in options.blacklist]
    tags = [t for t in tags if not any(fnmatchcase(tag_key(t), p) for p in patterns)]
    if options.deduplicate:
        seen: set[str] = set()
        tags = [t for t in tags if not (tag_key(t) in seen or seen.add(tag_key(t)))]
    front: list[str] = []
    if trigger and not replaced:
        wanted = {tag_key(t) for t in trigger}
        front, tags = trigger, [t for t in tags if tag_key(t) not in wanted]
    if options.max_tags:
        tags = tags[: options.max_tags]
    parts = [options.prefix.strip(" ,"), *front, *tags, options.suffix.strip(" ,")]
    return ", ".join(p for p in parts if p)
