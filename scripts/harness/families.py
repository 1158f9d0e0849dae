"""Tiny-but-real models of each model family, built from a seed with the ComfyUI host's own classes.

`build_family(name, seed)` gives what the host's loaders give for that family (a ModelPatcher of the
diffusion model, a `comfy.sd.CLIP`, a `comfy.sd.VAE`), small enough to build, run and train on CPU.
The diffusion model is built by `comfy.supported_models.<Family>(unet_config).get_model` and, where the
host's detection allows a small model, round-tripped through `comfy.sd.load_diffusion_model_state_dict`
so that detection picks the family. The text encoders are the host's classes for the family, shrunk
through the host's own `<name>_model_config` model option, with the host's real tokenizers.
Everything is float32 and deterministic from the seed: the diffusion model uses `seed`, the text
encoders `seed + 1` and the VAE `seed + 2` (as in `fixtures`). Nothing is cached on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .comfy import setup_inprocess
from .fixtures import build_taesd, build_unet, init_weights_

if TYPE_CHECKING:
    import torch

FAMILIES = ("sd15", "sd2v", "sdxl", "sd3", "flux", "flux2", "chroma", "chroma_radiance", "qwen_image", "zimage",
            "lumina2", "pixart_sigma", "auraflow", "hidream", "omnigen2", "cosmos_predict2", "hunyuan_image21", "hunyuan_video15",
            "ltxv", "wan21", "wan22_5b")
IMAGE_CONDITIONED = ("wan21_i2v",)  # families conditioned on an image as well (issue 16's tests)

# A CLIP text model of width 64; three layers since SDXL and SD3 take the penultimate one.
SMALL_CLIP = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
              "num_hidden_layers": 3, "projection_dim": 64}
SMALL_T5 = {"d_model": 64, "d_kv": 32, "num_heads": 2, "d_ff": 128, "num_layers": 2}
# Llama-style encoders keep the host's fixed head_dim (128); three layers since Z-Image takes the penultimate one.
SMALL_QWEN = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
              "num_key_value_heads": 1, "num_hidden_layers": 3}
# Flux.2's Mistral 3 at the same width: it stacks the outputs of layers 10, 20 and 30, so it keeps 31 of its 40.
SMALL_MISTRAL = {**SMALL_QWEN, "num_hidden_layers": 31, "vocab_size": 512}


@dataclass
class Family:
    """One family's models, as the host's loaders would give them."""

    name: str
    model: Any  # comfy.model_patcher.ModelPatcher
    clip: Any | None  # comfy.sd.CLIP
    vae: Any | None  # comfy.sd.VAE
    latent_channels: int
    video: bool  # 5-D latents [B, C, T, H, W]
    detected: str  # class name of the model_config the host detected; "" when built directly
    notes: str
    resolution: int = 64  # the side the tests train at: the smallest the host's model runs at, at least 64


def build_family(name: str, seed: int = 0) -> Family:
    """Build family `name` (one of FAMILIES) from `seed`."""
    if name not in FAMILIES + IMAGE_CONDITIONED:
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES + IMAGE_CONDITIONED}")
    setup_inprocess()
    return _BUILDERS[name](seed)


# --- weights ------------------------------------------------------------------------------


def init_module_(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """`fixtures.init_weights_`, then every norm's scale set to 1 and its shift to 0.

    init_weights_ only knows torch's GroupNorm/LayerNorm; the host's RMS norms (T5, Llama, Flux, Wan...)
    would get zero (1-D) or random (Wan's [C,1,1]) scales, which zero or scramble what passes through them.
    """
    import torch

    init_weights_(module, seed, std)
    with torch.no_grad():
        for m in module.modules():
            if "norm" not in type(m).__name__.lower():
                continue
            for pname, p in m.named_parameters(recurse=False):
                if pname in ("weight", "scale", "gamma"):
                    p.fill_(1.0)
                elif pname in ("bias", "beta"):
                    p.zero_()


def _patcher(model):
    import comfy.model_management as mm
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _new_model(config_cls, unet_config: dict, seed: int):
    """The host's BaseModel subclass for `config_cls`, float32, deterministically initialised."""
    import comfy.model_management as mm
    import torch

    model_config = config_cls(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "", device=mm.unet_offload_device())
    init_module_(model.diffusion_model, seed)
    return model


def _detected(state_dict: dict):
    """Load a diffusion model state dict the way UNETLoader does; the host's detection picks the family."""
    import comfy.sd
    import torch

    patcher = comfy.sd.load_diffusion_model_state_dict(dict(state_dict), model_options={"dtype": torch.float32})
    if patcher is None:
        raise RuntimeError("the host did not detect a model in the state dict")
    return patcher, type(patcher.model.model_config).__name__


# --- text encoders ------------------------------------------------------------------------


def _clip(clip_cls, tokenizer_cls, seed: int, model_options: dict, tokenizer_data: dict | None = None):
    """A comfy.sd.CLIP of the host's `clip_cls`/`tokenizer_cls`, float32, deterministically initialised."""
    import comfy.sd
    import comfy.supported_models_base
    import torch

    target = comfy.supported_models_base.ClipTarget(tokenizer_cls, clip_cls)
    clip = comfy.sd.CLIP(target=target, embedding_directory=None, tokenizer_data=tokenizer_data or {},
                         parameters=0, model_options={"dtype": torch.float32, **model_options})
    init_module_(clip.cond_stage_model, seed)
    return clip


def _qwen25_vl_small_vision(device="cpu", dtype=None, model_options=None, **kwargs):
    """The host's Qwen2.5-VL text model with a one-block vision tower of width 32.

    The host builds the vision tower at a fixed 32 blocks x 1280 (~670M parameters) whatever the text
    config, so the model is built on the meta device, the tower swapped, and then materialised.
    """
    import comfy.text_encoders.qwen_image
    import comfy.text_encoders.qwen_vl

    te = comfy.text_encoders.qwen_image.Qwen25_7BVLIModel(device="meta", dtype=dtype,
                                                           model_options=model_options or {}, **kwargs)
    lm = te.transformer
    lm.visual = comfy.text_encoders.qwen_vl.Qwen2VLVisionTransformer(
        hidden_size=32, output_hidden_size=lm.model.config.hidden_size, intermediate_size=64, num_heads=2,
        num_layers=1, device="meta", dtype=dtype, ops=te.operations)
    return te.to_empty(device=device)


def umt5_spiece_stand_in() -> bytes:
    """The host's pile-T5 sentencepiece model renumbered to UMT5's special ids (pad 0, eos 1, unk 2).

    Wan's UMT5 tokenizer does not ship with the host (ComfyUI reads it from the text encoder file);
    renumbering keeps the host's padding, end-of-text detection and attention mask working as with UMT5.
    """
    return _spiece_stand_in(pad=0, eos=1, unk=2)


def gemma_spiece_stand_in() -> bytes:
    """The host's pile-T5 sentencepiece model renumbered to Gemma's special ids the host uses (pad 0, eos 1, bos 2;
    unk on its last piece: id 3 on is pile-T5's byte fallback): Gemma's tokenizer, like UMT5's, ships inside the text
    encoder file."""
    return _spiece_stand_in(pad=0, eos=1, bos=2, unk=31999)


TEKKEN_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                   "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")


def tekken_stand_in(merges: tuple[bytes, ...] = ()) -> torch.Tensor:
    """A Tekken vocabulary (Mistral's tokenizer format) as a Flux.2 text encoder file stores it ("tekken_model", the
    JSON's bytes as uint8): Mistral's special tokens at their ids (<s> 1, [INST] 3, <pad> 11) and a byte-level
    vocabulary, every byte plus `merges`, whose ids follow the specials. The real one (131072 entries) ships only
    inside the 24B encoder's file."""
    import base64
    import json

    import torch

    pieces = [bytes([b]) for b in range(256)] + list(merges)
    tekken = {"config": {"pattern": r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s+(?!\S)|\s+",
                         "num_vocab_tokens": len(pieces), "default_num_special_tokens": len(TEKKEN_SPECIALS),
                         "default_vocab_size": len(pieces) + len(TEKKEN_SPECIALS)},
              "vocab": [{"rank": i, "token_bytes": base64.b64encode(p).decode()} for i, p in enumerate(pieces)],
              "special_tokens": [{"rank": i, "token_str": t, "is_control": True} for i, t in enumerate(TEKKEN_SPECIALS)]}
    return torch.frombuffer(bytearray(json.dumps(tekken).encode()), dtype=torch.uint8)


def _spiece_stand_in(pad: int, eos: int, unk: int, bos: int = -1) -> bytes:
    import comfy.text_encoders.aura_t5
    from sentencepiece import sentencepiece_model_pb2 as spm

    proto = spm.ModelProto()
    path = Path(comfy.text_encoders.aura_t5.__file__).parent / "t5_pile_tokenizer" / "tokenizer.model"
    proto.ParseFromString(path.read_bytes())
    kinds = spm.ModelProto.SentencePiece
    specials = {pad: ("<pad>", kinds.CONTROL), eos: ("</s>", kinds.CONTROL), bos: ("<s>", kinds.CONTROL),
                unk: ("<unk>", kinds.UNKNOWN)}
    for i, (piece, kind) in specials.items():
        if i >= 0:
            proto.pieces[i].piece = piece
            proto.pieces[i].type = kind
    spec = proto.trainer_spec
    spec.pad_id, spec.eos_id, spec.unk_id, spec.bos_id = pad, eos, unk, bos
    spec.pad_piece, spec.eos_piece, spec.unk_piece, spec.bos_piece = "<pad>", "</s>", "<unk>", "<s>"
    return proto.SerializeToString()


# --- VAEs ---------------------------------------------------------------------------------


def _taesd_module(seed: int, latent_channels: int):
    """fixtures.build_taesd, with the latent width of taesd3/taef1 when `latent_channels` is 16."""
    import comfy.taesd.taesd
    import torch

    if latent_channels == 4:
        return build_taesd(seed)
    module = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    init_weights_(module, seed + 2, std=0.05)
    with torch.no_grad():
        module.vae_scale.fill_(1.0)
        module.vae_shift.fill_(0.0)
    return module


def _taesd_vae(seed: int, latent_channels: int):
    """A TAESD-shaped VAE (taesd_encoder./taesd_decoder. keys, as VAELoader gives taesd/taesd3/taef1)."""
    import comfy.sd
    import torch

    return comfy.sd.VAE(sd=_taesd_module(seed, latent_channels).state_dict(), dtype=torch.float32)


def _wan21_vae(seed: int, dim: int = 8):
    """The Wan 2.1 VAE at base width `dim` (the host reads it from decoder.head.0.gamma; real: 96)."""
    import comfy.ldm.wan.vae
    import comfy.sd
    import torch

    # The same config comfy.sd.VAE builds for a Wan 2.1 state dict.
    module = comfy.ldm.wan.vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                      temperal_downsample=[False, True, True], dropout=0.0)
    init_module_(module, seed + 2, std=0.05)
    return comfy.sd.VAE(sd=module.state_dict(), dtype=torch.float32)


def _wrapped_video_vae(seed: int, module, latent_channels: int):
    """`module` (the host's VAE module of a family whose file config the host fixes at its real widths), initialised
    and wrapped as comfy.sd.VAE wraps such a file: a small Wan 2.1 VAE taking `module` and the ratios comfy.sd.VAE sets
    for 16x spatial, 4x temporal latents."""
    import math

    vae = _carrying(_wan21_vae(seed), module, seed)
    vae.latent_channels = latent_channels
    vae.upscale_ratio, vae.upscale_index_formula = (lambda a: max(0, a * 4 - 3), 16, 16), (4, 16, 16)
    vae.downscale_ratio = (lambda a: max(0, math.floor((a + 3) / 4)), 16, 16)
    vae.downscale_index_formula = (4, 16, 16)
    return vae


def _carrying(vae, module, seed: int):
    """`vae` (a comfy.sd.VAE) with `module`, initialised from the seed, as its model, the way comfy.sd.VAE holds the
    one it builds from a file (its first stage and its patcher)."""
    import comfy.model_management
    import comfy.model_patcher
    import torch

    init_module_(module, seed + 2, std=0.05)
    vae.first_stage_model = module.eval().to(torch.float32)
    vae.patcher = comfy.model_patcher.ModelPatcher(module, load_device=vae.device,
                                                   offload_device=comfy.model_management.vae_offload_device())
    return vae


def _wan22_vae(seed: int, dim: int = 8):
    """The Wan 2.2 VAE (48 channels, 16x spatial, 4x temporal) at base width `dim` (the host fixes a file's at dim
    160: 705M parameters)."""
    import comfy.ldm.wan.vae2_2

    module = comfy.ldm.wan.vae2_2.WanVAE(dim=dim, dec_dim=dim, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                         attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
    return _wrapped_video_vae(seed, module, 48)


def _flux2_vae(seed: int):
    """Flux.2's VAE: the host's KL autoencoder whose latents are batch-normalised and patchified 2x2 (32 channels at 8x
    become 128 at 16x), at width 32 on every level (the host fixes a file's at 128-512)."""
    import comfy.ldm.models.autoencoder

    ddconfig = {"double_z": True, "z_channels": 32, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
                "batch_norm_latent": True}
    module = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=32)
    # A TAESD-shaped carrier: comfy.sd.VAE gives it the KL autoencoder's pixel range ([-1, 1]) as for any file.
    vae = _carrying(_taesd_vae(seed, 16), module, seed)
    vae.latent_channels, vae.downscale_ratio, vae.upscale_ratio = 128, 16, 16  # as comfy.sd.VAE sets for Flux.2's
    return vae


def _hunyuan_video15_vae(seed: int):
    """The HunyuanVideo 1.5 VAE (32 channels, 16x spatial, 4x temporal: the host's refiner encoder and decoder) at
    widths 8-64 (its bottleneck holds twice the latent channels; the host fixes a file's at 128-1024)."""
    import comfy.ldm.models.autoencoder

    ddconfig = {"block_out_channels": [8, 16, 32, 64, 64], "in_channels": 3, "out_channels": 3, "num_res_blocks": 1,
                "ffactor_spatial": 16, "ffactor_temporal": 4, "downsample_match_channel": True,
                "upsample_match_channel": True, "z_channels": 32}
    module = comfy.ldm.models.autoencoder.AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.EmptyRegularizer"},
        encoder_config={"target": "comfy.ldm.hunyuan_video.vae_refiner.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.hunyuan_video.vae_refiner.Decoder", "params": ddconfig})
    return _wrapped_video_vae(seed, module, 32)


# --- families -----------------------------------------------------------------------------


def _unet_config(**overrides) -> dict:
    """An SD-UNet config in the form model_detection.detect_unet_config returns."""
    config = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
              "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
              "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
              "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
              "use_temporal_resblock": False, "use_temporal_attention": False}
    config.update(overrides)
    return config


def _build_sd15(seed: int) -> Family:
    import comfy.sd1_clip

    model, detected = _detected(build_unet(seed).state_dict())
    clip = _clip(comfy.sd1_clip.SD1ClipModel, comfy.sd1_clip.SD1Tokenizer, seed + 1,
                 {"clip_l_model_config": {"num_hidden_layers": 1, "intermediate_size": 64}})
    return Family("sd15", model, clip, _taesd_vae(seed, 4), 4, False, detected,
                  "UNet = fixtures.build_unet (SD15_TINY_UNET: one level at 320 channels, which detection needs); "
                  "CLIP-L at its real width 768 (the UNet's context, which detection needs) but 1 layer and "
                  "MLP 64, so its 49408x768 token embedding is most of its size; TAESD-shaped VAE")


def _build_sd2v(seed: int) -> Family:
    import comfy.model_base
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.supported_models
    import comfy.text_encoders.sd2_clip
    import torch

    config = _unet_config(context_dim=1024, use_linear_in_transformer=True)
    state_dict = _new_model(comfy.supported_models.SD20, config, seed).diffusion_model.state_dict()
    # The host's detection picks the family; it would pick v-prediction only from the std of
    # output_blocks.11.1.transformer_blocks.0.norm1.bias (> 0.09), i.e. a UNet with 12 output blocks at
    # 320+ channels (~45M parameters), so the model is made from the detected config as V_PREDICTION.
    model_config = comfy.model_detection.model_config_from_unet(state_dict, "")
    model_config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.V_PREDICTION,
                                       device=mm.unet_offload_device())
    model.load_model_weights(state_dict, "")
    clip = _clip(comfy.text_encoders.sd2_clip.SD2ClipModel, comfy.text_encoders.sd2_clip.SD2Tokenizer, seed + 1,
                 {"clip_h_model_config": {"num_hidden_layers": 3, "intermediate_size": 64}})
    return Family("sd2v", _patcher(model), clip, _taesd_vae(seed, 4), 4, False, type(model_config).__name__,
                  "SD2 UNet layout at one level of 320 channels, context 1024 (detection needs both); detected "
                  "SD20 but v-prediction set explicitly (the host infers it from output_blocks.11...norm1.bias, "
                  "which needs a ~45M UNet); CLIP-H at its real width 1024 (the context) but 3 layers "
                  "(penultimate layer) and MLP 64; TAESD-shaped VAE")


def _build_sdxl(seed: int) -> Family:
    import comfy.sdxl_clip
    import comfy.supported_models

    width = SMALL_CLIP["hidden_size"]
    # SDXL's adm input: CLIP-G's projected pooled output + 6 size embeddings of 256 (model_base.SDXL.encode_adm).
    config = _unet_config(num_classes="sequential", adm_in_channels=SMALL_CLIP["projection_dim"] + 6 * 256,
                          model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[0, 1],
                          transformer_depth_output=[0, 0, 1, 1], use_linear_in_transformer=True,
                          context_dim=2 * width)
    model = _patcher(_new_model(comfy.supported_models.SDXL, config, seed))
    clip = _clip(comfy.sdxl_clip.SDXLClipModel, comfy.sdxl_clip.SDXLTokenizer, seed + 1,
                 {"clip_l_model_config": SMALL_CLIP, "clip_g_model_config": SMALL_CLIP})
    return Family("sdxl", model, clip, _taesd_vae(seed, 4), 4, False, "",
                  "built directly: detection needs model_channels 320, transformer depths [0,0,2,2,10,10] (or a "
                  "listed variant's) and context 2048 = CLIP-L 768 + CLIP-G 1280 (~100M of token embeddings); "
                  "SDXL layout at model_channels 32 (transformers at the second level only, as in SDXL), "
                  f"CLIP-L and CLIP-G reduced to width {width}, 3 layers (context {2 * width}, pooled "
                  f"{SMALL_CLIP['projection_dim']}); TAESD-shaped VAE")


def _build_sd3(seed: int) -> Family:
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.supported_models
    import comfy.text_encoders.sd3_clip
    import torch

    depth, grid = 2, 32  # hidden = 64 * depth; pos_embed covers latents up to 64x64 (512 px)
    hidden = 64 * depth
    # SD3ClipModel zero-pads CLIP-L+G output to 4096 wide (T5-XXL's width) whatever the CLIP widths.
    config = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "input_size": None,
              "adm_in_channels": 2 * SMALL_CLIP["hidden_size"],
              "context_embedder_config": {"target": "torch.nn.Linear",
                                          "params": {"in_features": 4096, "out_features": hidden}},
              "num_patches": grid * grid, "pos_embed_max_size": grid, "pos_embed_scaling_factor": None,
              "x_block_self_attn_layers": []}
    built = _new_model(comfy.supported_models.SD3, config, seed)
    with torch.no_grad():  # a buffer, left uninitialised by the host; real checkpoints hold this sin-cos table
        table = mmdit.get_2d_sincos_pos_embed(hidden, grid)
        built.diffusion_model.pos_embed.copy_(torch.from_numpy(table).float().unsqueeze(0))
    model, detected = _detected(built.diffusion_model.state_dict())
    clip = _clip(comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=False),
                 comfy.text_encoders.sd3_clip.SD3Tokenizer, seed + 1,
                 {"clip_l_model_config": SMALL_CLIP, "clip_g_model_config": SMALL_CLIP})
    return Family("sd3", model, clip, _taesd_vae(seed, 16), 16, False, detected,
                  f"MMDiT depth {depth} (hidden {hidden}); CLIP-L and CLIP-G reduced to width "
                  f"{SMALL_CLIP['hidden_size']}, 3 layers; no T5-XXL (the host joins it to the CLIP output padded to "
                  "4096, so it would need d_model 4096: 131M of token embeddings), as when SD3 runs without T5: cond "
                  "is CLIP-L+G padded to 4096; TAESD-shaped VAE with 16 channels (as taesd3)")


def _flux_like_config(**overrides) -> dict:
    config = {"in_channels": 16, "out_channels": 16, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2,
              "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2,
              "qkv_bias": True, "context_in_dim": SMALL_T5["d_model"]}
    config.update(overrides)
    return config


def _build_flux(seed: int) -> Family:
    import comfy.supported_models
    import comfy.text_encoders.flux

    config = _flux_like_config(image_model="flux", vec_in_dim=SMALL_CLIP["hidden_size"], guidance_embed=True)
    model = _patcher(_new_model(comfy.supported_models.Flux, config, seed))
    clip = _clip(comfy.text_encoders.flux.flux_clip(), comfy.text_encoders.flux.FluxTokenizer, seed + 1,
                 {"clip_l_model_config": SMALL_CLIP, "t5xxl_model_config": SMALL_T5})
    return Family("flux", model, clip, _taesd_vae(seed, 16), 16, False, "",
                  "built directly: detection fixes 24 heads with rope axes [16,56,56], i.e. hidden 3072; Flux-dev "
                  "(guidance embed) at hidden 64, 2 heads, 1 double + 1 single block; CLIP-L and T5-XXL reduced "
                  f"to width {SMALL_CLIP['hidden_size']}; TAESD-shaped VAE with 16 channels (as taef1)")


def _build_flux2(seed: int) -> Family:
    import comfy.supported_models
    import comfy.text_encoders.flux

    # Flux.2's settings from model_detection (the flux2 branch) at hidden 64: 2 heads of 32 (its rope's four axes
    # shrunk to 8 each), the text width three stacked Mistral layers give.
    config = _flux_like_config(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None,
                               context_in_dim=3 * SMALL_MISTRAL["hidden_size"], mlp_ratio=3.0, axes_dim=[8, 8, 8, 8],
                               theta=2000, patch_size=1, qkv_bias=False, guidance_embed=True, global_modulation=True,
                               mlp_silu_act=True, ops_bias=False, default_ref_method="index", ref_index_scale=10.0)
    model = _patcher(_new_model(comfy.supported_models.Flux2, config, seed))
    clip = _clip(comfy.text_encoders.flux.flux2_te(), comfy.text_encoders.flux.Flux2Tokenizer, seed + 1,
                 {"mistral3_24b_model_config": SMALL_MISTRAL}, tokenizer_data={"tekken_model": tekken_stand_in()})
    return Family("flux2", model, clip, _flux2_vae(seed), 128, False, "",
                  "built directly: detection fixes 48 heads of 128 with four rope axes of 32, i.e. hidden 6144; "
                  "Flux.2-dev (guidance embed, shared modulation) at hidden 64, 2 heads, 1 double + 1 single block; "
                  f"Mistral 3 reduced to width {SMALL_MISTRAL['hidden_size']}, 31 layers (it stacks layers 10, 20 and "
                  "30; head_dim stays 128) with a byte-level Tekken vocabulary; Flux.2's VAE (32 channels, batch-"
                  "normalised and patchified to 128 at 16x) at width 32")


def _build_chroma(seed: int) -> Family:
    import comfy.supported_models
    import comfy.text_encoders.pixart_t5

    hidden = 64
    # The approximator's input is fixed by the model: 16 + 16 (timestep, guidance) + 32 (modulation index).
    config = _flux_like_config(image_model="chroma", in_channels=64, out_channels=64, hidden_size=hidden,
                               in_dim=64, out_dim=hidden, hidden_dim=128, n_layers=2)
    model = _patcher(_new_model(comfy.supported_models.Chroma, config, seed))
    clip = _clip(comfy.text_encoders.pixart_t5.pixart_te(), comfy.text_encoders.pixart_t5.PixArtTokenizer,
                 seed + 1, {"t5xxl_model_config": SMALL_T5})
    return Family("chroma", model, clip, _taesd_vae(seed, 16), 16, False, "",
                  "built directly: detection fixes hidden 3072 and the approximator (5120 wide, 5 layers); Chroma "
                  "at hidden 64, 1 double + 1 single block, approximator 128 wide x 2 layers; T5-XXL reduced to "
                  f"width {SMALL_T5['d_model']}; TAESD-shaped VAE with 16 channels (as taef1)")


def _build_chroma_radiance(seed: int) -> Family:
    import comfy.sd
    import comfy.supported_models
    import comfy.text_encoders.pixart_t5
    import torch

    hidden = 64
    # Chroma on pixels: 16-pixel patches in, and a per-pixel NeRF-style head out (model_detection's settings).
    config = _flux_like_config(image_model="chroma_radiance", in_channels=3, out_channels=3, patch_size=16,
                               hidden_size=hidden, in_dim=64, out_dim=hidden, hidden_dim=128, n_layers=2,
                               nerf_hidden_size=16, nerf_mlp_ratio=4, nerf_depth=2, nerf_max_freqs=8,
                               nerf_tile_size=512, nerf_final_head_type="linear", nerf_embedder_dtype=torch.float32)
    model = _patcher(_new_model(comfy.supported_models.ChromaRadiance, config, seed))
    clip = _clip(comfy.text_encoders.pixart_t5.pixart_te(), comfy.text_encoders.pixart_t5.PixArtTokenizer,
                 seed + 1, {"t5xxl_model_config": SMALL_T5})
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})  # what VAELoader gives for "pixel_space"
    return Family("chroma_radiance", model, clip, vae, 3, False, "",
                  "built directly (as chroma); Chroma Radiance at hidden 64, 1 double + 1 single block, 16-pixel "
                  "patches, NeRF head 16 wide x 2 layers; T5-XXL reduced to width "
                  f"{SMALL_T5['d_model']}; no VAE latent: the host's pixel-space conversion (pixels are the latent)")


def _build_qwen_image(seed: int) -> Family:
    import comfy.supported_models
    import comfy.text_encoders.qwen_image

    config = {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
              "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": SMALL_QWEN["hidden_size"],
              "axes_dims_rope": (8, 12, 12)}
    model = _patcher(_new_model(comfy.supported_models.QwenImage, config, seed))
    clip = _clip(comfy.text_encoders.qwen_image.te(), comfy.text_encoders.qwen_image.QwenImageTokenizer, seed + 1,
                 {"qwen25_7b_model_config": SMALL_QWEN, "qwen25_7b_class": _qwen25_vl_small_vision})
    return Family("qwen_image", model, clip, _wan21_vae(seed), 16, True, "",
                  "built directly: detection reads only in_channels and the layer count, the rest is the 20B "
                  "model's (24 heads x 128, text width 3584); 2 blocks at 2 heads x 32; Qwen2.5-VL reduced to "
                  f"width {SMALL_QWEN['hidden_size']}, {SMALL_QWEN['num_hidden_layers']} layers (head_dim stays the "
                  "host's 128) and its vision tower to 1 block of width 32; Wan 2.1 VAE at width 8; an image model "
                  "with 5-D latents [B,16,1,H,W] (Wan21 latent format)")


HUNYUAN_NOTES = ("built directly: detection gives heads = hidden // 128; the host's HunyuanVideo model at hidden 64, "
                 "2 heads, 1 double + 1 single block; Qwen2.5-VL reduced as for qwen_image, without the ByT5 glyph "
                 "encoder (built from a fixed config; it only reads quoted text)")


def _hunyuan_config(**overrides) -> dict:
    """The host's HunyuanVideo model (HunyuanImage 2.1 and HunyuanVideo 1.5 use it) at hidden 64, 2 heads, 1 double +
    1 single block, without the CLIP vector, guidance, mean-flow and ByT5 glyph inputs."""
    config = {"image_model": "hunyuan_video", "vec_in_dim": None, "meanflow": False,
              "context_in_dim": SMALL_QWEN["hidden_size"], "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2,
              "depth": 1, "depth_single_blocks": 1, "theta": 256, "qkv_bias": True, "byt5": False,
              "guidance_embed": False, "use_cond_type_embedding": False, "vision_in_dim": None}
    config.update(overrides)
    return config


def _hunyuan_text_encoder(seed: int, tokenizer_cls):
    """Their Qwen2.5-VL text encoder, reduced as for qwen_image, without the ByT5 glyph encoder (built from a fixed
    config; it only reads quoted text)."""
    import comfy.text_encoders.hunyuan_image

    return _clip(comfy.text_encoders.hunyuan_image.te(byt5=False), tokenizer_cls, seed + 1,
                 {"qwen25_7b_model_config": SMALL_QWEN, "qwen25_7b_class": _qwen25_vl_small_vision})


def _build_hunyuan_image21(seed: int) -> Family:
    import comfy.supported_models
    import comfy.text_encoders.hunyuan_image

    # HunyuanImage 2.1 (model_detection's hunyuan_video settings for its keys: 64 channels in, patch 1x1, no CLIP
    # vector, no guidance or ByT5 glyph input) at 2 heads of 32, 1 double + 1 single block.
    config = _hunyuan_config(in_channels=64, out_channels=64, patch_size=[1, 1], axes_dim=[16, 16])
    model = _patcher(_new_model(comfy.supported_models.HunyuanImage21, config, seed))
    clip = _hunyuan_text_encoder(seed, comfy.text_encoders.hunyuan_image.HunyuanImageTokenizer)
    return Family("hunyuan_image21", model, clip, _taesd_vae(seed, 64), 64, False, "",
                  f"{HUNYUAN_NOTES}; HunyuanImage 2.1: the HunyuanVideo model on 2-D latents of 64 channels, patch "
                  "1x1; TAESD-shaped VAE with 64 channels at 8x (the real one is 32x: the host builds it at its real "
                  "widths)")


def _build_zimage(seed: int) -> Family:
    import comfy.supported_models
    import comfy.text_encoders.z_image

    # Z-Image's settings from model_detection (dim 3840 branch) with 2 of its 30 heads; its modulation
    # layers take min(dim, 256) features from a 256-wide timestep embedding, so dim can't go below 256.
    config = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256,
              "cap_feat_dim": SMALL_QWEN["hidden_size"], "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2,
              "n_kv_heads": 2, "qk_norm": True, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
              "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
              "pad_tokens_multiple": 32}
    model = _patcher(_new_model(comfy.supported_models.ZImage, config, seed))
    clip = _clip(comfy.text_encoders.z_image.te(), comfy.text_encoders.z_image.ZImageTokenizer, seed + 1,
                 {"qwen3_4b_model_config": SMALL_QWEN})
    return Family("zimage", model, clip, _taesd_vae(seed, 16), 16, False, "",
                  "built directly: the host detects Z-Image only at dim 3840 (else Lumina2); NextDiT with Z-Image's "
                  "settings at dim 256 (its smallest: the modulation input is 256 wide), 2 heads of 128, 2 layers + "
                  "1 noise and 1 context refiner layer; Qwen3-4B reduced to width "
                  f"{SMALL_QWEN['hidden_size']}, {SMALL_QWEN['num_hidden_layers']} layers (penultimate layer; "
                  "head_dim stays 128); TAESD-shaped VAE with 16 channels (as taef1; Z-Image uses the Flux VAE)")


def _build_lumina2(seed: int) -> Family:
    import comfy.supported_models
    import comfy.text_encoders.lumina2

    # Lumina 2's settings from model_detection (dim 2304 branch) with 2 of its 24 heads (head_dim 96 = sum of axes).
    config = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 192, "cap_feat_dim": 32,
              "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "qk_norm": True,
              "axes_dims": [32, 32, 32], "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0}
    model = _patcher(_new_model(comfy.supported_models.Lumina2, config, seed))
    gemma = {**SMALL_QWEN, "hidden_size": config["cap_feat_dim"], "vocab_size": 32000}
    clip = _clip(comfy.text_encoders.lumina2.te(), comfy.text_encoders.lumina2.LuminaTokenizer, seed + 1,
                 {"gemma2_2b_model_config": gemma}, tokenizer_data={"spiece_model": gemma_spiece_stand_in()})
    return Family("lumina2", model, clip, _taesd_vae(seed, 16), 16, False, "",
                  "built directly: detection fixes Lumina 2's heads at dim 2304; NextDiT at dim 192, 2 heads of 96, "
                  "2 layers + 1 noise and 1 context refiner layer; Gemma-2-2B reduced to width 32, 3 layers "
                  "(penultimate layer; head_dim stays 256), vocab 32000; tokenizer: the host's pile-T5 sentencepiece "
                  "model renumbered to Gemma's special ids (Gemma's ships inside the text encoder file, not with the "
                  "host); TAESD-shaped VAE with 16 channels (as taef1: Lumina 2 uses the Flux VAE)")


def _build_pixart_sigma(seed: int) -> Family:
    import comfy.supported_models
    import comfy.text_encoders.pixart_t5

    # PixArt Sigma's settings from model_detection (no micro-conditioning, sigma predicted beside eps) at hidden 64.
    config = {"image_model": "pixart_sigma", "micro_condition": False, "patch_size": 2, "in_channels": 4,
              "hidden_size": 64, "num_heads": 2, "depth": 2, "input_size": 32, "pe_interpolation": 0.5,
              "caption_channels": SMALL_T5["d_model"], "model_max_length": 300}
    model = _patcher(_new_model(comfy.supported_models.PixArtSigma, config, seed))
    clip = _clip(comfy.text_encoders.pixart_t5.pixart_te(), comfy.text_encoders.pixart_t5.PixArtTokenizer,
                 seed + 1, {"t5xxl_model_config": SMALL_T5})
    return Family("pixart_sigma", model, clip, _taesd_vae(seed, 4), 4, False, "",
                  "built directly: detection fixes hidden 1152 and 16 heads; PixArt Sigma (eps, the model's learned "
                  "sigma output dropped by the host) at hidden 64, 2 heads, 2 blocks; T5-XXL reduced to width "
                  f"{SMALL_T5['d_model']}; TAESD-shaped VAE (as taesdxl: PixArt Sigma uses the SDXL VAE); trained at "
                  "320 px: the host's PixArt divides by zero below 40x40 latents (its position table's base size "
                  "round(side / 64) * 64)", resolution=320)


def _build_auraflow(seed: int) -> Family:
    import comfy.supported_models
    import comfy.text_encoders.aura_t5

    config = {"in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 64, "n_layers": 2, "n_double_layers": 1,
              "n_heads": 2, "global_conddim": 64, "cond_seq_dim": SMALL_T5["d_model"], "max_seq": 32 * 32}
    model = _patcher(_new_model(comfy.supported_models.AuraFlow, config, seed))
    clip = _clip(comfy.text_encoders.aura_t5.AuraT5Model, comfy.text_encoders.aura_t5.AuraT5Tokenizer, seed + 1,
                 {"pile_t5xl_model_config": SMALL_T5})
    return Family("auraflow", model, clip, _taesd_vae(seed, 4), 4, False, "",
                  "built directly: detection reads the layer counts and widths of the text and position tables, "
                  "the rest is the 6.8B model's (dim 3072); AuraFlow at dim 64, 2 heads, 1 double + 1 single layer; "
                  f"Pile-T5-XL reduced to width {SMALL_T5['d_model']}; TAESD-shaped VAE (as taesdxl: AuraFlow uses "
                  "the SDXL VAE)")


def _build_hidream(seed: int) -> Family:
    import comfy.supported_models
    import comfy.text_encoders.hidream

    # The DiT reads one Llama layer per block (llama_layers: 48 of Llama-3.1-8B's 32 in the real model); the pooled
    # vector is CLIP-L's and CLIP-G's projections side by side.
    config = {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1,
              "num_single_layers": 1, "attention_head_dim": 32, "num_attention_heads": 2, "axes_dims_rope": [16, 8, 8],
              "caption_channels": [SMALL_T5["d_model"], SMALL_QWEN["hidden_size"]],
              "text_emb_dim": 2 * SMALL_CLIP["projection_dim"], "num_routed_experts": 4, "num_activated_experts": 2,
              "max_resolution": [128, 128], "llama_layers": [1, 2]}
    model = _patcher(_new_model(comfy.supported_models.HiDream, config, seed))
    # HiDream builds its CLIP-L without a model name, so the shared options name it (the others name themselves).
    clip = _clip(comfy.text_encoders.hidream.hidream_clip(), comfy.text_encoders.hidream.HiDreamTokenizer, seed + 1,
                 {"model_name": "clip_l", "clip_l_model_config": SMALL_CLIP, "clip_g_model_config": SMALL_CLIP,
                  "t5xxl_model_config": SMALL_T5, "llama_model_config": SMALL_QWEN})
    return Family("hidream", model, clip, _taesd_vae(seed, 16), 16, False, "",
                  "built directly: detection fixes the 17B model's widths (20 heads x 128, 16 + 32 blocks); HiDream "
                  "I1 at 2 heads x 32, 1 double + 1 single block with 4 routed experts (2 active); CLIP-L, CLIP-G and "
                  f"T5-XXL reduced to width {SMALL_CLIP['hidden_size']}, Llama-3.1-8B to width "
                  f"{SMALL_QWEN['hidden_size']}, 3 layers (the blocks read layers 1 and 2; head_dim stays 128), "
                  "all with the host's tokenizers; TAESD-shaped VAE with 16 channels (as taef1: HiDream uses the Flux "
                  "VAE)")


def _build_omnigen2(seed: int) -> Family:
    import comfy.supported_models
    import comfy.text_encoders.omnigen2

    # OmniGen2's settings from model_detection with 2 of its 21 heads (head_dim 120 = sum of the rope axes).
    config = {"image_model": "omnigen2", "patch_size": 2, "in_channels": 16, "out_channels": None,
              "hidden_size": 240, "num_attention_heads": 2, "num_kv_heads": 1, "num_layers": 2,
              "num_refiner_layers": 1, "axes_dim_rope": [40, 40, 40], "axes_lens": [1024, 1664, 1664],
              "ffn_dim_multiplier": None, "multiple_of": 32, "norm_eps": 1e-5,
              "text_feat_dim": SMALL_QWEN["hidden_size"], "timestep_scale": 1000.0}
    model = _patcher(_new_model(comfy.supported_models.Omnigen2, config, seed))
    clip = _clip(comfy.text_encoders.omnigen2.te(), comfy.text_encoders.omnigen2.Omnigen2Tokenizer, seed + 1,
                 {"qwen25_3b_model_config": SMALL_QWEN})
    return Family("omnigen2", model, clip, _taesd_vae(seed, 16), 16, False, "",
                  "built directly: detection fixes the real widths (21 heads x 120, 32 layers); OmniGen2 at 2 heads "
                  "x 120, 2 layers + 1 refiner layer each side; Qwen2.5-VL-3B's language model reduced to width "
                  f"{SMALL_QWEN['hidden_size']}, {SMALL_QWEN['num_hidden_layers']} layers (head_dim stays 128); "
                  "TAESD-shaped VAE with 16 channels (as taef1: OmniGen2 uses the Flux VAE); text to image only (no "
                  "reference images)")


def _build_cosmos_predict2(seed: int) -> Family:
    import comfy.supported_models
    import comfy.text_encoders.cosmos

    # Cosmos-Predict2 text to image (model_detection's settings for 16 input channels) at 2 heads of 32, 2 blocks.
    config = {"image_model": "cosmos_predict2", "max_img_h": 240, "max_img_w": 240, "max_frames": 128,
              "in_channels": 16, "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1,
              "concat_padding_mask": True, "model_channels": 64, "num_blocks": 2, "num_heads": 2, "mlp_ratio": 4.0,
              "crossattn_emb_channels": SMALL_T5["d_model"], "pos_emb_cls": "rope3d", "pos_emb_learnable": True,
              "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30, "use_adaln_lora": True,
              "adaln_lora_dim": 32, "extra_per_block_abs_pos_emb": False, "rope_h_extrapolation_ratio": 4.0,
              "rope_w_extrapolation_ratio": 4.0, "rope_t_extrapolation_ratio": 1.0}
    model = _patcher(_new_model(comfy.supported_models.CosmosT2IPredict2, config, seed))
    clip = _clip(comfy.text_encoders.cosmos.te(), comfy.text_encoders.cosmos.CosmosT5Tokenizer, seed + 1,
                 {"t5xxl_model_config": SMALL_T5})
    return Family("cosmos_predict2", model, clip, _wan21_vae(seed), 16, True, "",
                  "built directly: detection fixes the 2B model's widths (16 heads, 2048 channels); Cosmos-Predict2 "
                  "text to image at 2 heads x 32, 2 blocks; the old T5-XXL reduced to width "
                  f"{SMALL_T5['d_model']}; Wan 2.1 VAE at width 8; an image model with 5-D latents [B,16,1,H,W] "
                  "(Wan21 latent format); the host's COSMOS_RFLOW parametrisation (x = x0 + sigma noise, flow time "
                  "sigma / (sigma + 1))")


def _ltxv_vae(seed: int):
    """The host's LTX-Video VAE (VideoVAE) from a config of its own, as VAELoader reads one from a file's metadata:
    patch 4 and three 2x compressions (8x in time, 32x in space, 128 channels, as the real one) at the one width
    the host builds it at (128), one residual layer."""
    import json

    import comfy.ldm.lightricks.vae.causal_video_autoencoder as ltx_vae
    import comfy.sd
    import torch

    config = {"dims": 3, "in_channels": 3, "out_channels": 3, "latent_channels": 128, "patch_size": 4,
              "blocks": [["compress_all", 1], ["compress_all", 1], ["compress_all", 1], ["res_x", 1]],
              "norm_layer": "pixel_norm", "latent_log_var": "uniform", "causal_decoder": False}
    module = ltx_vae.VideoVAE(config=config)
    init_weights_(module, seed + 2, std=0.05)
    with torch.no_grad():
        for name, buffer in module.per_channel_statistics.named_buffers():
            buffer.fill_(1.0 if name == "std-of-means" else 0.0)
    return comfy.sd.VAE(sd=module.state_dict(), dtype=torch.float32, metadata={"config": json.dumps({"vae": config})})


def _build_hunyuan_video15(seed: int) -> Family:
    import comfy.supported_models
    import comfy.text_encoders.hunyuan_video

    # HunyuanVideo 1.5 (model_detection's settings for its keys: 32 latent channels + a 32-channel image and a mask
    # in, the image-conditioning type embedding, the SigLIP projection) at 2 heads of 32, 1 double + 1 single block.
    config = _hunyuan_config(in_channels=65, out_channels=32, patch_size=[1, 1, 1], axes_dim=[8, 12, 12],
                             use_cond_type_embedding=True, vision_in_dim=1152)
    model = _patcher(_new_model(comfy.supported_models.HunyuanVideo15, config, seed))
    clip = _hunyuan_text_encoder(seed, comfy.text_encoders.hunyuan_video.HunyuanVideo15Tokenizer)
    return Family("hunyuan_video15", model, clip, _hunyuan_video15_vae(seed), 32, True, "",
                  f"{HUNYUAN_NOTES}; HunyuanVideo 1.5 text to video (the host feeds it a zero image and mask, as it "
                  "samples it); the host's HunyuanVideo 1.5 VAE modules at widths 8-64 (32 channels, 16x space, 4x "
                  "time)")


def _build_ltxv(seed: int) -> Family:
    import comfy.supported_models
    import comfy.text_encoders.lt

    # LTX-Video (model_detection's keys: the layer count and attention widths) at 2 heads of 32, 2 blocks.
    config = {"image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 32,
              "num_attention_heads": 2, "caption_channels": SMALL_T5["d_model"], "num_layers": 2}
    model = _patcher(_new_model(comfy.supported_models.LTXV, config, seed))
    clip = _clip(comfy.text_encoders.lt.ltxv_te(), comfy.text_encoders.lt.LTXVT5Tokenizer, seed + 1,
                 {"t5xxl_model_config": SMALL_T5})
    return Family("ltxv", model, clip, _ltxv_vae(seed), 128, True, "",
                  "built directly: detection reads the widths of attention 32 heads wide; LTX-Video at 2 heads x 32, "
                  f"2 blocks (they add residuals in place with addcmul_); T5-XXL reduced to width {SMALL_T5['d_model']}; "
                  "the host's LTX-Video VAE from a config in its metadata (128 channels, 8x time, 32x space)")


def _wan21_config(**overrides) -> dict:
    config = {"image_model": "wan2.1", "model_type": "t2v", "dim": 64, "out_dim": 16, "num_heads": 2, "ffn_dim": 128,
              "num_layers": 2, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
              "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16, "text_dim": SMALL_T5["d_model"]}
    config.update(overrides)
    return config


def _wan_text_encoder(seed: int):
    import comfy.text_encoders.wan

    return _clip(comfy.text_encoders.wan.te(), comfy.text_encoders.wan.WanT5Tokenizer, seed + 1,
                 {"umt5xxl_model_config": {**SMALL_T5, "vocab_size": 32000}},
                 tokenizer_data={"spiece_model": umt5_spiece_stand_in()})


def _build_wan21(seed: int) -> Family:
    import comfy.supported_models

    model = _patcher(_new_model(comfy.supported_models.WAN21_T2V, _wan21_config(), seed))
    return Family("wan21", model, _wan_text_encoder(seed), _wan21_vae(seed), 16, True, "",
                  "built directly: detection gives heads = dim // 128 and leaves text_dim at 4096 (UMT5-XXL's width: "
                  "a 1B token embedding); Wan 2.1 T2V at dim 64, 2 heads, 2 blocks; UMT5 reduced to width "
                  f"{SMALL_T5['d_model']}; tokenizer: the host's pile-T5 sentencepiece model renumbered to UMT5's "
                  "special ids (the UMT5 one ships inside the text encoder file, not with the host), vocab 32000; "
                  "Wan 2.1 VAE at width 8")


def _build_wan21_i2v(seed: int) -> Family:
    import comfy.supported_models

    # 36 input channels: the noisy latent, the 4-channel mask and the start frame's latent (WanImageToVideo).
    config = _wan21_config(model_type="i2v", in_dim=36)
    model = _patcher(_new_model(comfy.supported_models.WAN21_I2V, config, seed))
    return Family("wan21_i2v", model, _wan_text_encoder(seed), _wan21_vae(seed), 16, True, "",
                  "as wan21, image-to-video: 36 input channels (latent + mask + start frame), its CLIP-vision "
                  "projection unused (no clip_vision_output, as WanImageToVideo without one)")


def _build_wan22_5b(seed: int) -> Family:
    import comfy.supported_models

    # Wan 2.2 TI2V 5B: the Wan model on the Wan 2.2 VAE's 48 channels (text-to-video here: no start image).
    config = _wan21_config(in_dim=48, out_dim=48)
    model = _patcher(_new_model(comfy.supported_models.WAN22_T2V, config, seed))
    return Family("wan22_5b", model, _wan_text_encoder(seed), _wan22_vae(seed), 48, True, "",
                  "built directly (as wan21: detection would fix the real widths); Wan 2.2 TI2V 5B at dim 64, 2 heads, "
                  "2 blocks, 48 latent channels in and out (the host's WAN22 model: its image goes in through "
                  "denoise_mask, none here); UMT5 as wan21; the host's Wan 2.2 VAE module at width 8 (16x spatial)")


_BUILDERS = {"sd15": _build_sd15, "sd2v": _build_sd2v, "sdxl": _build_sdxl, "sd3": _build_sd3, "flux": _build_flux,
             "flux2": _build_flux2,
             "chroma": _build_chroma, "chroma_radiance": _build_chroma_radiance, "qwen_image": _build_qwen_image, "zimage": _build_zimage, "lumina2": _build_lumina2,
             "pixart_sigma": _build_pixart_sigma, "auraflow": _build_auraflow, "hidream": _build_hidream,
             "omnigen2": _build_omnigen2, "cosmos_predict2": _build_cosmos_predict2,
             "hunyuan_image21": _build_hunyuan_image21,
             "hunyuan_video15": _build_hunyuan_video15, "ltxv": _build_ltxv, "wan21": _build_wan21,
             "wan21_i2v": _build_wan21_i2v, "wan22_5b": _build_wan22_5b}


# --- files for a server ---------------------------------------------------------------------


def sd3_files(seed: int = 0) -> dict[str, Path]:
    """A tiny SD3 as files a user would pick in ComfyUI: {"unet": UNETLoader file, "vae": VAELoader file}.

    SD3's own encoders cannot come small from files (the host builds CLIP-G and T5 from fixed
    configs, 0.7B and 4.7B parameters), and CLIPLoader has no CLIP-L-only SD3 recipe; so this MMDiT
    takes a plain CLIP-L's output (context and pooled width 768), and runs with the SD1.5 fixture's
    CLIP-L file through CLIPLoader: the host's loaders, detection, sampling and flow objective.
    """
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.supported_models
    import torch

    from .fixtures import FIXTURE_VERSION, _save_atomic, cache_dir

    base = cache_dir()
    paths = {"unet": base / f"tiny-sd3-mmdit-clip-l-s{seed}-v{FIXTURE_VERSION}.safetensors",
             "vae": base / f"tiny-sd3-taesd-s{seed}-v{FIXTURE_VERSION}.safetensors"}
    if all(p.exists() for p in paths.values()):
        return paths
    setup_inprocess()
    depth, grid = 2, 32
    hidden = 64 * depth
    config = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "input_size": None,
              "adm_in_channels": 768,
              "context_embedder_config": {"target": "torch.nn.Linear",
                                          "params": {"in_features": 768, "out_features": hidden}},
              "num_patches": grid * grid, "pos_embed_max_size": grid, "pos_embed_scaling_factor": None,
              "x_block_self_attn_layers": []}
    built = _new_model(comfy.supported_models.SD3, config, seed)
    with torch.no_grad():
        built.diffusion_model.pos_embed.copy_(torch.from_numpy(mmdit.get_2d_sincos_pos_embed(hidden, grid)).float()[None])
    model, detected = _detected(built.diffusion_model.state_dict())
    if detected != "SD3":
        raise RuntimeError(f"the host detects the tiny SD3 file as {detected}")
    _save_atomic({k: v.half() for k, v in built.diffusion_model.state_dict().items()}, paths["unet"])
    _save_atomic({k: v.half() for k, v in _taesd_module(seed, 16).state_dict().items()}, paths["vae"])
    return paths
