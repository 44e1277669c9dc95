"""The forward process, prediction targets and their inversion, Denoiser.predict, and the loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm_faces.diffusion import (
    PREDICTIONS,
    Denoiser,
    NoiseSchedule,
    diffusion_loss,
    min_snr_weight,
    q_sample,
    to_eps_x0,
    training_target,
)

T = 1000
# abar of the linear schedule, computed independently in float64.
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
TS = torch.tensor([0, 1, 10, 250, 500, 900, 990, 999])


@pytest.fixture(scope="module")
def linear():
    return NoiseSchedule.from_config("linear", T)


def _data(n=len(TS), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, torch.randn(n, 3, 4, 4, generator=g)


def _bc(values, dtype=torch.float32):
    return torch.as_tensor(values, dtype=dtype).view(-1, 1, 1, 1)


def _hand_target(prediction, x0, noise, t):
    a, s = _bc(np.sqrt(ABAR[t])), _bc(np.sqrt(1 - ABAR[t]))
    return {"eps": noise, "x0": x0, "v": a * noise - s * x0}[prediction]


def test_q_sample_formula(linear):
    x0, noise = _data()
    expected = _bc(np.sqrt(ABAR[TS]), torch.float64) * x0.double() + _bc(np.sqrt(1 - ABAR[TS]), torch.float64) * noise
    x_t = q_sample(linear, x0, TS, noise)
    assert x_t.dtype == torch.float32
    torch.testing.assert_close(x_t.double(), expected, rtol=1e-6, atol=1e-6)
    # t = -1 is the clean image.
    torch.testing.assert_close(q_sample(linear, x0, torch.full((len(TS),), -1), noise), x0, rtol=0, atol=0)


def test_q_sample_and_v_target_match_diffusers(linear):
    DDPMScheduler = pytest.importorskip("diffusers").DDPMScheduler
    ref = DDPMScheduler(num_train_timesteps=T)
    x0, noise = _data()
    torch.testing.assert_close(q_sample(linear, x0, TS, noise), ref.add_noise(x0, noise, TS), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(training_target("v", linear, x0, TS, noise), ref.get_velocity(x0, noise, TS),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_training_target_formula(linear, prediction):
    x0, noise = _data()
    torch.testing.assert_close(training_target(prediction, linear, x0, TS, noise),
                               _hand_target(prediction, x0, noise, TS), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_to_eps_x0_inverts_training_target(schedule, prediction):
    sched = NoiseSchedule.from_config(schedule, T)
    # Cosine abar(T-1) ~ 1e-8: x0 = (x_t - sqrt(1 - abar) eps) / 1e-4 is not resolvable in float32.
    ts = TS[:-1] if (schedule, prediction) == ("cosine", "eps") else TS
    x0, noise = _data(len(ts))
    x_t = q_sample(sched, x0, ts, noise)
    eps, x0_rec = to_eps_x0(prediction, sched, x_t, ts, training_target(prediction, sched, x0, ts, noise))
    # Division by sqrt(abar) (eps target at t ~ T) or sqrt(1 - abar) (x0 target at t = 0, 0.01) magnifies
    # float32 rounding up to ~100x; a wrong conversion is off by O(1).
    torch.testing.assert_close(eps, noise, rtol=0, atol=5e-5)
    torch.testing.assert_close(x0_rec, x0, rtol=0, atol=5e-5)
    mid = (ts > 5) & (ts < 950)  # away from the ends the inversion is tight
    torch.testing.assert_close(eps[mid], noise[mid], rtol=0, atol=2e-5)
    torch.testing.assert_close(x0_rec[mid], x0[mid], rtol=0, atol=2e-5)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_denoiser_predict_clip_keeps_forward_relation(linear, prediction):
    """With clip_x0, x0 is clamped to [-1, 1] and eps recomputed so that x_t = sqrt(abar) x0 + sqrt(1-abar) eps."""
    g = torch.Generator().manual_seed(1)
    x_t = 2 * torch.randn(4, 3, 4, 4, generator=g)
    out = 3 * torch.randn(4, 3, 4, 4, generator=g)  # a network output that gives x0 well outside [-1, 1]
    calls = []

    def net(x, t):
        calls.append(t.clone())
        return out

    den = Denoiser(net, linear, prediction)
    for t in (50, 500, 950):
        a, s = float(np.sqrt(ABAR[t])), float(np.sqrt(1 - ABAR[t]))
        eps_raw, x0_raw = den.predict(x_t, t, clip_x0=False)
        tt = torch.full((4,), t)
        eps_exp, x0_exp = to_eps_x0(prediction, linear, x_t, tt, out)
        torch.testing.assert_close(eps_raw, eps_exp, rtol=0, atol=0)
        torch.testing.assert_close(x0_raw, x0_exp, rtol=0, atol=0)
        assert x0_raw.abs().max() > 1.5  # the clip below has work to do
        eps, x0 = den.predict(x_t, t, clip_x0=True)
        assert x0.abs().max() <= 1
        torch.testing.assert_close(x0, x0_raw.clamp(-1, 1), rtol=0, atol=0)
        torch.testing.assert_close(a * x0 + s * eps, x_t, rtol=1e-5, atol=1e-5)
        assert calls[-1].tolist() == [t] * 4 and calls[-1].dtype == torch.long


def test_denoiser_passes_cond_and_rejects_unknown_target(linear):
    seen = {}

    def net(x, t, cond):
        seen["cond"] = cond
        return torch.zeros_like(x)

    Denoiser(net, linear).predict(torch.zeros(2, 1, 2, 2), 10, cond="labels")
    assert seen["cond"] == "labels"
    with pytest.raises(ValueError):
        Denoiser(net, linear, "score")
    for fn in (training_target, to_eps_x0):
        with pytest.raises(ValueError):
            fn("score", linear, torch.zeros(1, 1, 1, 1), torch.tensor([1]), torch.zeros(1, 1, 1, 1))


# ---------------------------------------------------------------------------------------------
# The loss.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_loss_zero_for_oracle_and_hand_mse_for_zero_net(linear, prediction, gamma):
    x0, noise = _data()
    target = _hand_target(prediction, x0, noise, TS)

    def oracle(x, t):  # knows the true target, computed by hand (checks that x_t and t reach the net)
        assert torch.equal(t, TS)
        torch.testing.assert_close(x, _bc(np.sqrt(ABAR[TS])) * x0 + _bc(np.sqrt(1 - ABAR[TS])) * noise)
        return target

    loss = diffusion_loss(oracle, linear, x0, TS, noise, prediction=prediction, min_snr_gamma=gamma)
    assert loss.ndim == 0 and float(loss) < 1e-10

    per_sample = target.double().pow(2).flatten(1).mean(1)
    if gamma:
        snr = ABAR[TS] / (1 - ABAR[TS])
        w = np.minimum(snr, gamma) / {"eps": snr, "v": snr + 1, "x0": 1}[prediction]
        per_sample = per_sample * torch.from_numpy(w)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    per = diffusion_loss(zero, linear, x0, TS, noise, prediction=prediction, min_snr_gamma=gamma, reduce=False)
    assert per.shape == (len(TS),)
    torch.testing.assert_close(per.double(), per_sample, rtol=1e-5, atol=1e-7)
    mean = diffusion_loss(zero, linear, x0, TS, noise, prediction=prediction, min_snr_gamma=gamma)
    torch.testing.assert_close(mean.double(), per_sample.mean(), rtol=1e-5, atol=1e-7)
    if gamma:  # weighting really changes the loss
        plain = diffusion_loss(zero, linear, x0, TS, noise, prediction=prediction)
        assert abs(float(mean) - float(plain)) > 0.01 * float(plain)


def test_loss_passes_cond():
    sched = NoiseSchedule.from_config("linear", T)
    x0, noise = _data()
    net = lambda x, t, cond: torch.full_like(x, cond)  # noqa: E731
    loss = diffusion_loss(net, sched, x0, TS, noise, prediction="x0", cond=0.5)
    torch.testing.assert_close(loss.double(), (x0.double() - 0.5).pow(2).mean(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weight_against_hand_values(linear, gamma):
    """Hang et al. 2023: eps min(SNR, g)/SNR, v min(SNR, g)/(SNR + 1), x0 min(SNR, g)."""
    snr = ABAR[TS] / (1 - ABAR[TS])
    clipped = np.minimum(snr, gamma)
    expected = {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}
    for prediction, w in expected.items():
        got = min_snr_weight(linear.snr(TS), gamma, prediction)
        np.testing.assert_allclose(got.numpy(), w, rtol=1e-9)
    # Spot values at the ends: t = 0 (SNR ~ 1e4) and t = 999 (SNR ~ 4e-5).
    eps_w = min_snr_weight(linear.snr(TS), gamma, "eps").numpy()
    assert eps_w[0] == pytest.approx(gamma / snr[0]) and eps_w[-1] == pytest.approx(1.0)
    v_w = min_snr_weight(linear.snr(TS), gamma, "v").numpy()
    assert v_w[-1] == pytest.approx(snr[-1] / (snr[-1] + 1)) and v_w[0] == pytest.approx(gamma / (snr[0] + 1))
