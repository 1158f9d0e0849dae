"""The image an image-to-video or edit model is conditioned on besides its caption, built by the host's own nodes
exactly as a sampling workflow builds it: WanImageToVideo's start frame (Wan 2.1 I2V, Wan 2.2 I2V A14B) and
ReferenceLatent's source image (Flux Kontext, Qwen-Image-Edit). Each gives conditioning values
(`concat_latent_image` + `concat_mask`, or `reference_latents`) that the model's `extra_conds` turns into inputs.
"""

from __future__ import annotations

import torch

from .conditioning import host_conds

START_FRAME = "start frame"  # the sample's own first frame (image-to-video)
REFERENCE = "reference image"  # the sample's control image (edit models)


class ImageInputError(ValueError):
    """The model and the dataset disagree on the images the model is conditioned on; the message says what to do."""


def image_input(model, conditioning: list, noise: torch.Tensor, has_control: bool) -> str | None:
    """Which image training gives `model` (a comfy.model_base.BaseModel) besides the caption, or None."""
    import comfy.model_base

    conds = host_conds(model, conditioning, noise)[1]
    family = type(model.model_config).__name__
    if "c_concat" in conds and type(model) is comfy.model_base.WAN21:
        if has_control:
            raise ImageInputError(f"control images: {family} is an image-to-video model, conditioned on each clip's "
                                  "own first frame; remove the control folder")
        return START_FRAME
    if not has_control:
        return None
    with_reference = host_conds(model, conditioning, noise, {"reference_latents": [torch.zeros_like(noise)]})[1]
    if with_reference.keys() == conds.keys():
        raise ImageInputError(f"control images: {family} takes no reference image (ReferenceLatent does nothing "
                              "for it); train an edit model (Flux Kontext, Qwen-Image-Edit) or remove the control "
                              "folder")
    return REFERENCE


def _set_values(node_output: list) -> dict:
    """The values a host node set on a one-entry conditioning."""
    return dict(node_output[0][1])


def start_frame_values(vae, clip: torch.Tensor) -> dict:
    """WanImageToVideo's values for a clip [T, H, W, 3] whose first frame starts it (the rest is what the model
    makes): the start frame then grey, through the VAE, and the mask of the frames given."""
    from comfy_extras.nodes_wan import WanImageToVideo

    frames, height, width = clip.shape[:3]
    positive, _, _ = WanImageToVideo.execute([[torch.zeros(1), {}]], [], vae, width, height, frames, 1,
                                             start_image=clip[:1]).result
    return _set_values(positive)


def reference_values(vae, source: torch.Tensor) -> dict:
    """ReferenceLatent's values for a source image [H, W, 3], VAE-encoded as VAEEncode encodes it."""
    from comfy_extras.nodes_edit_model import ReferenceLatent

    latent = {"samples": vae.encode(source[None, ..., :3])}
    (conditioning,) = ReferenceLatent.execute([[torch.zeros(1), {}]], latent).result
    return _set_values(conditioning)
