"""What the model receives besides the noisy latent, built by the host exactly as at inference.

Captions are encoded the way ComfyUI's CLIPTextEncode does (`encode_from_tokens_scheduled`:
the cross-attention tensor plus whatever the family's encoder returns: pooled output, attention
masks, ...), and turned into the model's keyword inputs by the model's own `extra_conds`, as
`comfy.samplers` does for sampling. So SDXL gets its `y` (pooled text + size and crop embedding),
Flux its pooled vector and guidance, Chroma / Qwen-Image / Z-Image their masks; the loop knows
nothing of any family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.buckets import cover_size

# The guidance distilled models (Flux.1-dev, HunyuanVideo) are trained with, whatever users sample
# with: kohya sd-scripts' Flux recipes pass --guidance_scale 1.0 (its default is 3.5), ai-toolkit 1.0.
TRAINING_GUIDANCE = 1.0


@dataclass(frozen=True)
class ImageGeometry:
    """How a training image became its latent, for SDXL-style size conditioning (kohya's convention)."""

    width: int  # of the image file
    height: int
    crop_top: int  # the crop's corner in the resized image
    crop_left: int
    target_width: int  # of the bucket
    target_height: int

    def as_params(self) -> dict:
        """The keys CLIPTextEncodeSDXL puts into a conditioning, which SDXL's encode_adm reads."""
        return {"width": self.width, "height": self.height, "crop_h": self.crop_top, "crop_w": self.crop_left,
                "target_width": self.target_width, "target_height": self.target_height}


def size_conditioned(model) -> bool:
    """Models whose size conditioning trains with each image's original size and crop, as kohya does for SDXL.

    Other models that read `width` / `height` (PixArt, HunyuanDiT) get what sampling gives them: the latent's size.
    """
    import comfy.model_base

    return isinstance(model, (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner))


def encode_caption(clip, caption: str) -> list:
    """The host conditioning for `caption`: [[cond, {pooled_output, attention_mask, ...}]], as CLIPTextEncode."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(caption), show_pbar=False)


def to_device(conditioning: list, device) -> list:
    """The same conditioning with its tensors on `device`."""
    return [[c.to(device), {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in extras.items()}]
            for c, extras in conditioning]


def training_guidance(model, conditioning: list, noise: torch.Tensor, guidance: float = TRAINING_GUIDANCE) -> float | None:
    """`guidance` for guidance-distilled models, else whatever the host gives (None: the model takes none).

    A model is guidance-distilled when, given no guidance, its extra_conds still feeds a nonzero one
    (Flux: 3.5, HunyuanVideo: 6.0; Chroma's is 0) and its diffusion model embeds it: HunyuanImage 2.1's base is
    fed 6.0 and reads none (`params.guidance_embed`, as the host's Flux-style models say).
    """
    (_, inputs), = model_inputs(model, [conditioning], noise, [None])
    default = inputs.get("guidance")
    embedded = getattr(getattr(model.diffusion_model, "params", None), "guidance_embed", True)
    return guidance if embedded and default is not None and float(default.flatten()[0]) else None


def model_inputs(model, conditionings: list[list], noisy: torch.Tensor, geometries: list[ImageGeometry | None],
                 guidance: float | None = None, transformer_options: dict | None = None) -> list[tuple[list[int], dict]]:
    """Keyword inputs for `model.apply_model(noisy[idx], sigma[idx], **kwargs)`, as (idx, kwargs) groups.

    One conditioning per sample. Samples whose inputs the host can batch (same keys, `can_concat`,
    which pads longer captions by repetition as CONDCrossAttn does) share a group, the way
    `comfy.samplers.calc_cond_batch` batches them.
    """
    import comfy.samplers

    per_sample = []
    for index, (conditioning, geometry) in enumerate(zip(conditionings, geometries, strict=True)):
        extras = dict(geometry.as_params()) if geometry is not None and size_conditioned(model) else {}
        if guidance is not None:
            extras["guidance"] = guidance
        entry, conds = host_conds(model, conditioning, noisy[index:index + 1], extras)
        # Without an image the host feeds zeros where the model is sampled from text alone (HunyuanVideo 1.5's
        # text to video: a zero image and mask); other models get a blank image (inpainting) or a full mask.
        concat = conds.get("c_concat")
        if concat is not None and "concat_latent_image" not in entry and bool(concat.cond.any()):
            raise ValueError(
                f"{type(model.model_config).__name__} is conditioned on an image as well as text (an inpainting, "
                "image-to-video or edit model: it takes `c_concat`); Train LoRA gives that image to Wan's "
                "image-to-video models only (their start frame, as WanImageToVideo does). Train on the family's "
                "text-to-image / text-to-video model instead")
        per_sample.append({k: c.process_cond(batch_size=1, device=noisy.device, area=None) for k, c in conds.items()})
    groups: list[list[int]] = []
    for index, conds in enumerate(per_sample):
        for group in groups:
            first = per_sample[group[0]]
            if first.keys() == conds.keys() and all(first[k].can_concat(conds[k]) for k in conds):
                group.append(index)
                break
        else:
            groups.append([index])
    options = dict(transformer_options or {})
    return [(group, {**comfy.samplers.cond_cat([per_sample[i] for i in group]), "transformer_options": options})
            for group in groups]


def host_conds(model, conditioning: list, noise: torch.Tensor, extras: dict | None = None) -> tuple[dict, dict]:
    """The first entry of `conditioning` as the sampler converts it (with `extras` where unset), and the model
    inputs (`comfy.conds` objects by name) the model's own `extra_conds` makes of it for a latent like `noise`."""
    import comfy.sampler_helpers
    import comfy.samplers

    entry = comfy.sampler_helpers.convert_cond(conditioning[:1])
    for key, value in (extras or {}).items():
        entry[0].setdefault(key, value)
    entry = comfy.samplers.encode_model_conds(model.extra_conds, entry, noise, noise.device, "positive",
                                              latent_image=torch.zeros_like(noise), denoise_mask=None, seed=0)
    return entry[0], entry[0]["model_conds"]


def with_values(conditioning: list, values: dict, device) -> list:
    """`conditioning` with `values` set on each entry, as the host's nodes set them (conditioning_set_values)."""
    if not values:
        return conditioning
    moved = {k: ([t.to(device) for t in v] if isinstance(v, list) else v.to(device) if torch.is_tensor(v) else v)
             for k, v in values.items()}
    return [[c, {**extras, **moved}] for c, extras in conditioning]


def apply_model(model, noisy: torch.Tensor, sigma: torch.Tensor, inputs: list[tuple[list[int], dict]]) -> torch.Tensor:
    """The model's denoised prediction for every sample, running each group of `model_inputs` once."""
    if len(inputs) == 1:
        return model.apply_model(noisy, sigma, **inputs[0][1])
    outputs, order = [], []
    for group, kwargs in inputs:
        index = torch.tensor(group, device=noisy.device)
        outputs.append(model.apply_model(noisy[index], sigma[index], **kwargs))
        order += group
    return torch.cat(outputs)[torch.argsort(torch.tensor(order, device=noisy.device))]


def image_geometry(item, flip: bool = False) -> ImageGeometry:
    """Original size, centre-crop corner and bucket of a dataset item (the crop mirrored with the image)."""
    bucket = tuple(item.bucket)
    resized = cover_size(tuple(item.size), bucket)
    top, left = (resized[1] - bucket[1]) // 2, (resized[0] - bucket[0]) // 2
    if flip:
        left = resized[0] - bucket[0] - left
    return ImageGeometry(*item.size, top, left, *bucket)
