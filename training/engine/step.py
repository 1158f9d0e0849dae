"""One micro-batch's loss, as the model's own objective computes it: the batch drawn, noised to levels of the
model's schedule, conditioned as the host conditions it for sampling, predicted, and weighted."""

from __future__ import annotations

import torch

from ...lora_core.network import LoraNetwork
from ..data.dataset import Dataset
from . import objective
from .conditioning import apply_model, image_geometry, model_inputs
from .config import WAN22_BOUNDARIES, TrainConfig
from .image_inputs import START_FRAME
from .preparation import EncodedData
from .text import TextConditioning


class TrainingStep:
    """Draws micro-batches and computes their loss on the patched model it is given."""

    def __init__(self, config: TrainConfig, dataset: Dataset, data: EncodedData, text: TextConditioning, kind: str,
                 timestep_sampling: str, guidance: float | None, network: LoraNetwork):
        self.config, self.dataset, self.data, self.text = config, dataset, data, text
        self.network = network  # switched off for the base model's own prediction (output preservation)
        self.kind = kind  # what the model predicts: eps, v or flow (objective.prediction)
        self.timestep_sampling, self.guidance = timestep_sampling, guidance

    def draw_batch(self, patched, batch: list[int], rng, gen, device,
                   share: tuple[int, int] | None = None) -> tuple | None:
        """One micro-batch's x0, noise, sigma, captions, geometries and loss weights, drawn from `rng` and `gen`;
        with `share`, what is drawn for the whole batch is cut to that part (this process's, see distributed.py)."""
        cfg, data = self.config, self.data
        items = [self.dataset.items[i] for i in batch]
        flips = [cfg.flip and rng.random() < 0.5 for _ in batch]
        x0 = torch.stack([data.latents.get(i, flip) for i, flip in zip(batch, flips, strict=True)])
        captions = [self.text.caption(item, cfg.captions, rng) for item in items]
        low, high = self.expert_levels(patched, x0)
        low, high = max(low, cfg.min_timestep / 1000), min(high, cfg.max_timestep / 1000)
        if low >= high:
            raise ValueError(f"min_timestep / max_timestep leave no noise level to the {cfg.expert} expert")
        levels = objective.sample_noise_levels(len(batch), rng, self.timestep_sampling, low, high)
        noise = torch.randn(x0.shape, generator=gen)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((*x0.shape[:2], *[1] * (x0.dim() - 2)), generator=gen)
        start, end = share or (0, len(batch))
        if start == end:
            return None  # this process has no part of the batch: it only kept its draws in step
        part = slice(start, end)
        x0 = x0[part].to(device)
        weights = data.masks.weights(items[part], batch[part], flips[part], False, data.latents, device)
        geometries = [image_geometry(item, flip) for item, flip in zip(items[part], flips[part], strict=True)]
        return (x0, noise[part].to(device), self.sigmas(patched, levels[part], x0), captions[part], geometries,
                weights, data.sample_values(batch[part], flips[part]))

    def batch_loss(self, patched, batch: list[int], rng, gen, device, autocast_dtype,
                   share: tuple[int, int] | None = None) -> torch.Tensor:
        cfg = self.config
        x0, noise, sigma, captions, geometries, weights, values = self.draw_batch(patched, batch, rng, gen, device,
                                                                                  share)
        if cfg.slider:
            loss = self.slider_loss(patched, x0, noise, sigma, captions, geometries, weights, values, device,
                                    autocast_dtype)
        else:
            target = self.targets(patched, batch[slice(*(share or (0, len(batch))))], x0, noise, sigma, captions,
                                  geometries, values, device, autocast_dtype)
            loss = self.loss(patched, x0, noise, sigma, self.text.conditioning(captions, device, values), geometries,
                             weights, autocast_dtype, min_snr=cfg.min_snr_gamma, target=target)
        if cfg.preservation_class and cfg.preservation_weight:
            classes = [self.text.as_class(c, rng) for c in captions]
            loss = loss + cfg.preservation_weight * self.preservation_loss(patched, x0, noise, sigma, classes,
                                                                           geometries, values, device, autocast_dtype)
        if cfg.blank_preservation_weight:
            loss = loss + cfg.blank_preservation_weight * self.preservation_loss(
                patched, x0, noise, sigma, [""] * len(captions), geometries, values, device, autocast_dtype)
        return loss

    def targets(self, patched, batch: list[int], x0, noise, sigma, captions, geometries, values, device,
                autocast_dtype) -> torch.Tensor:
        """What each sample's prediction is trained toward: its image; with prior_target = base, a regularisation
        image's is the base model's own prediction for it (the same noisy latent and caption)."""
        reg = [self.dataset.items[i].is_reg for i in batch]
        if self.config.prior_target != "base" or not any(reg):
            return x0
        base, _ = self.base_prediction(patched, x0, noise, sigma, captions, geometries, values, device, autocast_dtype)
        chosen = torch.tensor(reg, device=x0.device).view(-1, *[1] * (x0.dim() - 1))
        return torch.where(chosen, base.to(x0.dtype), x0)

    def graphs(self) -> int:
        """How many adapted forward passes of a micro-batch are kept for its backward pass (the memory plan counts
        them): one, two for a concept slider (+1 and -1; four with its anchor), one more for output preservation and one
        for blank prompt preservation."""
        cfg = self.config
        kept = 2 + 2 * bool(cfg.slider_anchor) if cfg.slider else 1
        return kept + bool(cfg.preservation_class and cfg.preservation_weight) + bool(cfg.blank_preservation_weight)

    def base_prediction(self, patched, x0, noise, sigma, prompts, geometries, values, device,
                        autocast_dtype) -> tuple[torch.Tensor, list]:
        """The base model's own prediction (every adapter off, text encoders' too, no gradient) for `prompts` on the
        batch's noisy latents, and the prompts' conditioning it was given."""
        with torch.no_grad(), self.network.at_strength(0.0):
            conditioning = self.text.conditioning(prompts, device, values)
            x, inputs = self.model_call(patched, x0, noise, sigma, conditioning, geometries)
            with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                return apply_model(patched.model, x, sigma, inputs).float(), conditioning

    def adapted_conditioning(self, base: list, prompts: list[str], device, values) -> list:
        """The prompts' conditioning with the adapters on: frozen text encoders give the base's, trained ones are
        asked again (at the adapters' strength now)."""
        return base if self.text.train_clip is None else self.text.conditioning(prompts, device, values)

    def preservation_loss(self, patched, x0, noise, sigma, captions, geometries, values, device,
                          autocast_dtype) -> torch.Tensor:
        """Output preservation: the adapted model's prediction for `captions` (the class captions, or the empty prompt),
        on the batch's own noisy latents, against the base model's."""
        target, base = self.base_prediction(patched, x0, noise, sigma, captions, geometries, values, device,
                                            autocast_dtype)
        x, inputs = self.model_call(patched, x0, noise, sigma,
                                    self.adapted_conditioning(base, captions, device, values), geometries)
        return self.prediction_loss(patched, x, target, sigma, inputs, None, autocast_dtype,
                                    self.config.min_snr_gamma)

    def slider_loss(self, patched, x0, noise, sigma, captions, geometries, weights, values, device,
                    autocast_dtype) -> torch.Tensor:
        """Concept slider: at strength +1 the adapted prediction for each caption is the base model's moved by
        slider_guidance x (its prediction for the positive side - for the negative side), at -1 moved the other way,
        both on the batch's own noisy latents; the anchor prompt's prediction stays the base model's at both."""
        cfg, text = self.config, self.text
        sides = [text.slider.of(c) for c in captions]
        asked = {"caption": captions, "positive": [p for p, _ in sides], "negative": [n for _, n in sides]}
        if cfg.slider_anchor:
            asked["anchor"] = [cfg.slider_anchor] * len(captions)
        base, conditioning = {}, {}
        for name, prompts in asked.items():
            base[name], conditioning[name] = self.base_prediction(patched, x0, noise, sigma, prompts, geometries,
                                                                  values, device, autocast_dtype)
        direction = cfg.slider_guidance * (base["positive"] - base["negative"])
        loss = torch.zeros((), device=x0.device)
        for strength in (1.0, -1.0):
            with self.network.at_strength(strength):
                targets = {"caption": (base["caption"] + strength * direction, weights)}
                if cfg.slider_anchor:
                    targets["anchor"] = (base["anchor"], None)
                for name, (target, weight) in targets.items():
                    adapted = self.adapted_conditioning(conditioning[name], asked[name], device, values)
                    x, inputs = self.model_call(patched, x0, noise, sigma, adapted, geometries)
                    loss = loss + self.prediction_loss(patched, x, target, sigma, inputs, weight, autocast_dtype,
                                                       cfg.min_snr_gamma)
        return loss / 2

    def expert_boundary(self) -> float:
        """The sigma where the experts switch: the setting, or Wan 2.2's for this kind of model."""
        task = "image-to-video" if self.data.image_input == START_FRAME else "text-to-video"
        return self.config.expert_boundary or WAN22_BOUNDARIES[task]

    def expert_levels(self, patched, x0: torch.Tensor) -> tuple[float, float]:
        """The noise levels (0-1) the expert trained here denoises: all of them, or one side of the boundary."""
        cfg = self.config
        if cfg.expert == "all":
            return 0.0, 1.0
        boundary = objective.level_at_sigma(patched.get_model_object("model_sampling"), self.expert_boundary(),
                                            cfg.timestep_shift, cfg.shift, tokens=x0[0, 0].numel() // 4)
        return (boundary, 1.0) if cfg.expert == "high_noise" else (0.0, boundary)

    def sigmas(self, patched, levels: list[float], x0: torch.Tensor) -> torch.Tensor:
        """The model's noise levels (sigmas) for `levels` in [0, 1], with the configured timestep shift."""
        cfg = self.config
        return objective.sigmas_for(patched.get_model_object("model_sampling"), levels, cfg.timestep_shift, cfg.shift,
                                    tokens=x0[0, 0].numel() // 4).to(x0.device)

    def loss(self, patched, x0, noise, sigma, conditionings, geometries, weights, autocast_dtype,
             min_snr: float = 0.0, target: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted native-space loss of the model's prediction for x0 noised to `sigma`, against `target`
        (default x0)."""
        x, inputs = self.model_call(patched, x0, noise, sigma, conditionings, geometries)
        return self.prediction_loss(patched, x, x0 if target is None else target, sigma, inputs, weights,
                                    autocast_dtype, min_snr)

    def model_call(self, patched, x0, noise, sigma, conditionings, geometries) -> tuple:
        """The noisy latent and the model's keyword inputs, as the host builds them for sampling."""
        x = patched.get_model_object("model_sampling").noise_scaling(sigma.view(-1, *[1] * (x0.dim() - 1)), noise, x0)
        return x, model_inputs(patched.model, conditionings, x, geometries, self.guidance,
                               patched.model_options.get("transformer_options"))

    def prediction_loss(self, patched, x, x0, sigma, inputs, weights, autocast_dtype, min_snr: float = 0.0):
        """The weighted loss of the model's prediction from the noisy latent `x` of `x0`."""
        model_sampling = patched.get_model_object("model_sampling")
        sigma_data = float(getattr(model_sampling, "sigma_data", 1.0))
        with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            denoised = apply_model(patched.model, x, sigma, inputs)
        level = objective.flow_time(model_sampling, sigma) if self.kind == "flow" else sigma
        per_sample = objective.prediction_loss(self.kind, denoised, x0, level, self.config.loss,
                                               self.config.huber_delta, sigma_data, weights)
        if min_snr and self.kind != "flow":
            per_sample = per_sample * objective.min_snr_weight(self.kind, sigma, min_snr, sigma_data)
        if self.config.debiased_estimation and self.kind != "flow":
            per_sample = per_sample * objective.debiased_weight(self.kind, sigma, sigma_data)
        return per_sample.mean()
