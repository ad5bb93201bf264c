"""The flow-matching math, checked against the pipeline's own UniPC flow sampler conventions."""

import math

import pytest
import torch

from cosmos_train.objectives.flow_matching import (
    flow_match_target,
    flow_match_xt,
    masked_mse,
    noise_latent_frames,
    sample_sigma,
    shift_sigma,
    sigma_to_timestep,
)
from cosmos_train.objectives.generator import clean_frames_for_mode


def test_xt_endpoints_and_velocity_integrates_back():
    x0, eps = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.allclose(flow_match_xt(x0, eps, 0.0), x0)
    assert torch.allclose(flow_match_xt(x0, eps, 1.0), eps)
    # d x_t / d sigma = v: one Euler step from sigma=1 to 0 with the exact v lands on x0.
    v = flow_match_target(x0, eps)
    assert torch.allclose(flow_match_xt(x0, eps, 0.7) - 0.7 * v, x0, atol=1e-6)


def test_shift_warp_matches_scheduler_formula():
    from diffusers import UniPCMultistepScheduler

    s = 5.0
    sigma = torch.linspace(0.05, 0.95, 7)
    assert torch.allclose(shift_sigma(sigma, 1.0), sigma)
    warped = shift_sigma(sigma, s)
    assert torch.all(warped > sigma)  # a shift > 1 spends more time at high noise
    # The inference scheduler warps its flow sigmas with the same formula.
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=s)
    sched.set_timesteps(10)
    base = torch.linspace(1.0, 1.0 / 1000, 10 + 1)[:-1]
    assert torch.allclose(sched.sigmas[:-1].float(), shift_sigma(base, s).float(), atol=2e-3)
    # and the transformer's timesteps are sigma * 1000
    assert torch.allclose(sched.timesteps.float(), sigma_to_timestep(sched.sigmas[:-1]).float(), atol=1.0)


@pytest.mark.parametrize("method", ["logit_normal", "uniform", "mode"])
def test_sigma_sampling_range_and_determinism(method):
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = sample_sigma(4000, method=method, shift=3.0, generator=g1)
    b = sample_sigma(4000, method=method, shift=3.0, generator=g2)
    assert torch.equal(a, b)
    assert a.min() > 0 and a.max() < 1
    unshifted = sample_sigma(4000, method=method, shift=1.0, generator=torch.Generator().manual_seed(0))
    assert a.mean() > unshifted.mean() + 0.05  # the shift moves mass towards noise


def test_logit_normal_mean_parameter_moves_the_median():
    g = torch.Generator().manual_seed(1)
    hi = sample_sigma(4000, method="logit_normal", logit_mean=1.0, generator=g)
    assert abs(float(hi.median()) - 1 / (1 + math.exp(-1.0))) < 0.03


def test_clean_frames_kept_and_excluded_from_loss():
    x0, eps = torch.randn(1, 4, 5, 2, 2), torch.randn(1, 4, 5, 2, 2)
    clean = clean_frames_for_mode("v2v", 5, 2)
    assert clean == [0, 1]
    xt = noise_latent_frames(x0, eps, 0.8, clean)
    assert torch.equal(xt[:, :, :2], x0[:, :, :2])
    assert torch.allclose(xt[:, :, 2:], flow_match_xt(x0, eps, 0.8)[:, :, 2:])
    target = flow_match_target(x0, eps)
    pred = target.clone()
    pred[:, :, :2] = 100.0  # garbage on clean frames must not count
    assert masked_mse(pred, target, [2, 3, 4]) == 0
    assert masked_mse(pred, target, [0, 2]) > 0
    assert clean_frames_for_mode("i2v", 5, 2) == [0]
    assert clean_frames_for_mode("t2v", 5, 2) == []
