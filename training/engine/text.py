"""The captions a run trains with and their host conditioning: the frozen text encoder's outputs encoded once and
kept, or computed through the text-encoder adapters while those train."""

from __future__ import annotations

import random
from dataclasses import replace

import torch

from ..data.captions import CaptionOptions, SliderSides, process_caption, with_class
from ..data.text_cache import TextCache
from .conditioning import encode_caption, to_device, with_values


class TextConditioning:
    """Captions as trained (trigger word, shuffles and dropouts applied) and the host conditioning of each."""

    def __init__(self, clip, options: CaptionOptions, reg_empty_prompt: bool = False, classes: tuple[str, ...] = (),
                 disk: TextCache | None = None, slider: SliderSides | None = None, blank: bool = False):
        self.clip, self.options, self.reg_empty_prompt = clip, options, reg_empty_prompt
        self.classes = tuple(classes)  # output preservation's classes: the trigger word said as one of them
        self.blank = blank  # blank prompt preservation: the empty prompt is asked every step
        self.slider = slider  # a concept slider's two sides, each caption is also said with
        self.disk = disk  # fixed captions' outputs kept on disk too (latent_cache = disk)
        self.cache: dict[str, list] = {}  # host conditioning of captions that never change
        self.train_clip = None  # the CLIP clone carrying text-encoder adapters, while training them

    @property
    def changes(self) -> bool:
        """Whether a caption can differ from one epoch to the next (then its conditioning is not kept)."""
        c = self.options
        return bool(c.shuffle_tags or c.caption_dropout or c.tag_dropout)

    def encode(self, caption: str, cache: bool = True) -> list:
        """The frozen text encoder's host conditioning for `caption` (on the CPU), kept when `cache` (and read from /
        written to the disk cache then). Cancel is honoured before each caption: encoding a dataset's captions up
        front is a long loop."""
        if caption in self.cache:
            return self.cache[caption]
        conditioning = self.disk.load(caption) if cache and self.disk is not None else None
        if conditioning is None:
            import comfy.model_management as mm

            mm.throw_exception_if_processing_interrupted()
            with torch.no_grad():
                conditioning = to_device(encode_caption(self.clip, caption), "cpu")
            if cache and self.disk is not None:
                self.disk.save(caption, conditioning)
        if cache:
            self.cache[caption] = conditioning
        return conditioning

    def encode_fixed(self, items, validation) -> None:
        """Encode the captions up front when they never change, so the text encoder and the model don't alternate;
        the held-out images' and the empty prompt of blank prompt preservation always (they never change)."""
        if not self.changes:
            rng = random.Random(0)
            for item in items:
                caption = self.caption(item, self.options, rng)
                self.encode(caption)
                for asked in self.asked_besides(caption):
                    self.encode(asked)
        for item in validation:
            self.encode(self.fixed_caption(item))
        if self.blank:
            self.encode("")

    def caption(self, item, options: CaptionOptions, rng: random.Random) -> str:
        """The caption an item trains with: regularisation images keep their own (no trigger word: it is what they
        must not learn), or the empty prompt with reg_empty_prompt (what the sampler's empty negative encodes)."""
        if item.is_reg and self.reg_empty_prompt:
            return ""
        return process_caption(item.caption, replace(options, trigger_word="") if item.is_reg else options, rng)

    def asked_besides(self, caption: str) -> list[str]:
        """The other prompts a step asks the base model for beside `caption`: its class, its slider sides."""
        asked = [with_class(caption, self.options.trigger_word, c) for c in self.classes]
        return asked + list(self.slider.of(caption)) if self.slider else asked

    def as_class(self, caption: str, rng: random.Random) -> str:
        """The caption with the trigger word said as a preservation class (drawn from `rng` when there are several)."""
        word = self.classes[0] if len(self.classes) == 1 else rng.choice(self.classes)
        return with_class(caption, self.options.trigger_word, word)

    def fixed_caption(self, item) -> str:
        """The caption with trigger word, prefix and suffix, and nothing random (for validation)."""
        c = replace(self.options, shuffle_tags=False, caption_dropout=0.0, tag_dropout=0.0)
        return self.caption(item, c, random.Random(0))

    def conditioning(self, captions: list[str], device, values: list[dict] | None = None) -> list[list]:
        """Host conditioning per caption (with each sample's image values); through the text-encoder adapters
        (uncached) while they train."""
        if self.train_clip is not None:
            conditionings = [to_device(encode_caption(self.train_clip, c), device) for c in captions]
        else:
            cache = not self.changes
            conditionings = [to_device(self.encode(c, cache), device) for c in captions]
        values = values or [{} for _ in captions]
        return [with_values(c, v, device) for c, v in zip(conditionings, values, strict=True)]
