"""Rectified-flow math used by Cosmos 3, as small pure functions.

Convention (verified against the pipeline's UniPC flow sampler): sigma = 1 is pure noise,
    x_t = (1 - sigma) * x0 + sigma * eps,      target v = eps - x0,
and the transformer receives timesteps sigma * 1000 (it rescales by 0.001 internally).
"""

from __future__ import annotations

import math

import torch

TIMESTEP_SCALE = 1000.0


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution-dependent shift warp: sigma' = s*sigma / (1 + (s-1)*sigma). Identity for s = 1."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sample_sigma(
    n: int,
    *,
    method: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw n training sigmas in (0, 1): a base density, then the shift warp."""
    if method == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator) * logit_std + logit_mean)
    elif method == "uniform":
        u = torch.rand(n, generator=generator)
    elif method == "mode":
        # SD3's mode density: u -> 1 - u - s * (cos^2(pi u / 2) - 1 + u); puts more mass mid-schedule.
        u = torch.rand(n, generator=generator)
        u = 1.0 - u - mode_scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
    else:
        raise ValueError(f"unknown sigma sampling method {method!r}")
    u = u.clamp(1e-5, 1.0 - 1e-5)
    return shift_sigma(u, shift)


def flow_match_xt(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Noised sample at level sigma (broadcast over x0)."""
    return (1.0 - sigma) * x0 + sigma * noise


def flow_match_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Velocity the transformer is trained to predict."""
    return noise - x0


def sigma_to_timestep(sigma: torch.Tensor | float):
    """The transformer's timestep input for a sigma."""
    return sigma * TIMESTEP_SCALE


def noise_latent_frames(
    x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float, clean_frames: list[int]
) -> torch.Tensor:
    """Noise a [C, T, H, W] (or [1, C, T, H, W]) latent, keeping conditioning frames clean (as the pipeline does)."""
    xt = flow_match_xt(x0, noise, sigma)
    if clean_frames:
        xt = xt.clone()
        xt[..., clean_frames, :, :] = x0[..., clean_frames, :, :]
    return xt


def masked_mse(pred: torch.Tensor, target: torch.Tensor, noisy_frames: list[int]) -> torch.Tensor:
    """Mean squared error over the noisy latent frames only (dim -3 is time); clean frames carry no loss."""
    if not noisy_frames:
        raise ValueError("at least one latent frame must be noisy")
    diff = (pred.float() - target.float())[..., noisy_frames, :, :]
    return diff.pow(2).mean()
