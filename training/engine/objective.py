"""The training objective, read from the host model's own sampling: eps, v-prediction or flow.

The host model returns the denoised latent x0_hat for a noised input. Each parameterisation's
native error is a per-sigma multiple of (x0_hat - x0):
  eps:  eps_hat - eps = (x0 - x0_hat) / sigma
  v:    v_hat - v     = (x0 - x0_hat) * sqrt(sigma^2 + sd^2) / (sigma * sd)
  flow: u_hat - u     = (x0 - x0_hat) / sigma            (x_t = (1 - sigma) x0 + sigma noise)
so one code path trains every family on its own target.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

LOSSES = ("mse", "l1", "huber")
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "auto")
# How noise levels become flow-matching sigmas: the model's own schedule (its shift, as it samples),
# none (sigma = level), a fixed shift, or kohya's resolution-dependent `flux_shift`.
TIMESTEP_SHIFTS = ("model", "none", "fixed", "resolution")


def prediction(model_sampling) -> str:
    """'eps', 'v' or 'flow' for a ComfyUI model_sampling object, by its prediction class.

    The host composes model_sampling from a schedule and a prediction class (EPS, V_PREDICTION,
    CONST, X0, ...); the prediction class is the most derived one that defines `calculate_denoised`
    (X0 and IMG_TO_IMG subclass EPS but predict something else), and any we do not train is named.
    """
    import comfy.model_sampling as ms

    predictor = next((c for c in type(model_sampling).__mro__ if "calculate_denoised" in vars(c)), None)
    kinds = {ms.EPS: "eps", ms.V_PREDICTION: "v", ms.EDM: "v", ms.CONST: "flow", ms.COSMOS_RFLOW: "flow"}
    if predictor not in kinds:
        raise ValueError(f"training does not support models that predict {getattr(predictor, '__name__', 'unknown')} "
                         f"({type(model_sampling).__name__}); eps, v-prediction and flow-matching models train")
    return kinds[predictor]


def _variance_exploding_flow(model_sampling) -> bool:
    """Cosmos' parametrisation (COSMOS_RFLOW): the host noises x0 + sigma * noise and gives the model that scaled by
    1 - t, t = sigma / (sigma + 1): rectified flow at time t, told in sigmas that run to sigma_max."""
    import comfy.model_sampling as ms

    return isinstance(model_sampling, ms.COSMOS_RFLOW)


def flow_time(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """A flow model's time t (x_t = (1 - t) x0 + t noise) at the host's `sigma`: sigma itself but for Cosmos'."""
    return sigma / (sigma + 1) if _variance_exploding_flow(model_sampling) else sigma


def flow_sigma(model_sampling, time: torch.Tensor) -> torch.Tensor:
    """The host's sigma for a flow model's time (flow_time's inverse; Cosmos': capped at its sigma_max)."""
    if not _variance_exploding_flow(model_sampling):
        return time
    return (time / (1 - time).clamp_min(1e-6)).clamp(max=float(model_sampling.sigma_max))


def error_scale(kind: str, sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """Factor turning (x0_hat - x0) into the native prediction error."""
    if kind == "v":
        return torch.sqrt(sigma**2 + sigma_data**2) / (sigma * sigma_data)
    return 1.0 / sigma


def snr(kind: str, sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    if kind == "flow":
        return ((1 - sigma) / sigma) ** 2
    return (sigma_data / sigma) ** 2


def min_snr_weight(kind: str, sigma: torch.Tensor, gamma: float, sigma_data: float = 1.0) -> torch.Tensor:
    """min-SNR-gamma weight: min(snr, gamma) / snr, or / (snr + 1) for v-prediction."""
    s = snr(kind, sigma, sigma_data)
    return torch.clamp(s, max=gamma) / (s + 1 if kind == "v" else s)


def debiased_weight(kind: str, sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """Debiased estimation's weight: 1 / sqrt(snr), or 1 / (snr + 1) for v-prediction; snr capped at 1000, where
    the lowest noise levels would make it infinite."""
    s = snr(kind, sigma, sigma_data).clamp(max=1000.0)
    return 1 / (s + 1) if kind == "v" else s.rsqrt()


def family_sampling(sampling: str, kind: str) -> str:
    """`auto`: logit-normal for flow models (SD3's training distribution, kohya's and ai-toolkit's flow default),
    uniform for eps / v models; any other value as it is."""
    if sampling != "auto":
        return sampling
    return "logit_normal" if kind == "flow" else "uniform"


def sample_noise_levels(count: int, rng: random.Random, sampling: str = "uniform", low: float = 0.0,
                        high: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0) -> list[float]:
    """Noise levels u in (low, high] (0 = clean, 1 = pure noise): uniform or logit-normal."""
    if sampling not in TIMESTEP_SAMPLING or sampling == "auto":
        raise ValueError(f"timestep_sampling: {sampling!r} is not one of {', '.join(TIMESTEP_SAMPLING)}")
    out = []
    for _ in range(count):
        if sampling == "uniform":
            u = rng.random()
        else:
            u = 1 / (1 + math.exp(-rng.gauss(logit_mean, logit_std)))
        out.append(low + (high - low) * max(u, 1e-4))
    return out


def sigmas_for(model_sampling, levels: list[float], shift: str = "model", shift_value: float = 3.0,
               tokens: int = 4096) -> torch.Tensor:
    """Host sigmas for noise levels.

    "model": the host's own schedule via percent_to_sigma (every model_sampling has it; for flow
    models it carries the family's shift: SD3 3.0, Flux 1.15 as mu, ...); eps and v models always
    use it. The others choose a flow model's shift: "none" (sigma = level), "fixed" (SD3-style
    shift by `shift_value`) and "resolution" (kohya's flux_shift: mu grows linearly from 0.5 at 256
    to 1.15 at 4096 image tokens, `tokens` being the latent's 2x2 patches).
    """
    if shift not in TIMESTEP_SHIFTS:
        raise ValueError(f"timestep_shift: {shift!r} is not one of {', '.join(TIMESTEP_SHIFTS)}")
    if shift == "model" or prediction(model_sampling) != "flow":  # eps / v schedules have no shift to choose
        return torch.tensor([float(model_sampling.percent_to_sigma(1.0 - u)) for u in levels], dtype=torch.float32)
    u = torch.tensor(levels, dtype=torch.float64)
    if shift == "fixed":
        u = shift_value * u / (1 + (shift_value - 1) * u)
    elif shift == "resolution":
        mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
        u = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    return flow_sigma(model_sampling, u.clamp(1e-4, 1.0).float())


def level_at_sigma(model_sampling, sigma: float, shift: str = "model", shift_value: float = 3.0,
                   tokens: int = 4096) -> float:
    """The noise level in [0, 1] that `sigmas_for` turns into `sigma` (sigmas rise with the level; bisection)."""
    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        if float(sigmas_for(model_sampling, [middle], shift, shift_value, tokens)[0]) < sigma:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def prediction_loss(kind: str, denoised: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, loss: str = "mse",
                    huber_delta: float = 1.0, sigma_data: float = 1.0,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss of the native prediction error, shape [batch]; `sigma` is the host's sigma (a flow model's
    time: flow_time); `weights` per sample ([batch]) or per element (broadcast to the latent, e.g. a loss mask)."""
    if loss not in LOSSES:
        raise ValueError(f"loss: {loss!r} is not one of {', '.join(LOSSES)}")
    scale = error_scale(kind, sigma, sigma_data).view(-1, *[1] * (x0.dim() - 1))
    err = (denoised.float() - x0.float()) * scale.to(x0.device)
    zero = torch.zeros_like(err)
    if loss == "mse":
        per_elem = F.mse_loss(err, zero, reduction="none")
    elif loss == "l1":
        per_elem = F.l1_loss(err, zero, reduction="none")
    else:
        per_elem = F.huber_loss(err, zero, reduction="none", delta=huber_delta)
    if weights is not None:
        per_elem = per_elem * (weights.view(-1, *[1] * (x0.dim() - 1)) if weights.dim() == 1 else weights)
    return per_elem.flatten(1).mean(dim=1)
