"""Noise schedules and timestep respacing, against closed forms (numpy, float64) and diffusers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm_faces.diffusion import NoiseSchedule, spaced_timesteps
from ddpm_faces.diffusion.schedules import cosine_alpha_bar, sigmoid_alpha_bar

T = 1000


def _cosine_f(t, T, s=0.008):
    return np.cos(((t / T) + s) / (1 + s) * np.pi / 2) ** 2


@pytest.mark.parametrize("T,beta_start,beta_end", [(1000, 1e-4, 0.02), (4000, 1e-4, 0.02), (50, 1e-3, 0.2)])
def test_linear_alpha_bar_closed_form(T, beta_start, beta_end):
    betas = np.linspace(beta_start, beta_end, T)
    sched = NoiseSchedule.from_config("linear", T, beta_start, beta_end)
    assert sched.T == T and sched.betas.dtype == sched.alpha_bar.dtype == torch.float64
    np.testing.assert_allclose(sched.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(sched.alphas.numpy(), 1 - betas, rtol=1e-12)
    np.testing.assert_allclose(sched.alpha_bar.numpy(), np.cumprod(1 - betas), rtol=1e-10)
    if T == 1000:  # the numbers everyone quotes for Ho et al.'s schedule
        assert sched.alpha_bar[-1] == pytest.approx(4.04e-5, rel=1e-2)


@pytest.mark.parametrize("T", [1000, 4000, 100])
def test_cosine_alpha_bar_closed_form_and_clip(T):
    sched = NoiseSchedule.from_config("cosine", T)
    betas, abar = sched.betas.numpy(), sched.alpha_bar.numpy()
    clipped = betas >= 0.999
    # beta is clipped at 0.999 only at the very end, where f(t) -> 0 (Nichol & Dhariwal 2021, sec. 3.2).
    assert betas.max() == 0.999 and betas[-1] == 0.999
    first_clip = int(np.argmax(clipped))
    assert clipped[first_clip:].all() and first_clip >= T - 2
    # Before the clip, abar_t = f(t + 1) / f(0) (timestep t is the end of interval t / T .. (t + 1) / T).
    expected = _cosine_f(np.arange(1, T + 1), T) / _cosine_f(0, T)
    np.testing.assert_allclose(abar[:first_clip], expected[:first_clip], rtol=1e-9)
    # After it, abar is the cumulative product with the clipped beta.
    np.testing.assert_allclose(abar[first_clip:], abar[first_clip - 1] * np.cumprod(1 - betas[first_clip:]),
                               rtol=1e-12)
    assert abar[0] > 0.999 and abar[-1] < 1e-6


def test_continuous_alpha_bar_functions():
    """The continuous-time abar(t), t in [0, 1], of the cosine and sigmoid schedules: 1 at t = 0, ~0 at t = 1."""
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    np.testing.assert_allclose(cosine_alpha_bar(t).numpy(), _cosine_f(t.numpy(), 1) / _cosine_f(0, 1), rtol=1e-12,
                               atol=1e-15)
    assert float(cosine_alpha_bar(t)[0]) == pytest.approx(1.0, abs=1e-15) and float(cosine_alpha_bar(t)[-1]) < 1e-30
    sb = sigmoid_alpha_bar(t)
    assert float(sb[0]) == pytest.approx(1.0, abs=1e-15) and float(sb[-1]) == pytest.approx(0.0, abs=1e-15)
    assert float(sb[50]) == pytest.approx(0.5, abs=1e-12)  # symmetric around t = 1/2 for start = -end


def test_sigmoid_alpha_bar():
    """Jabri et al. 2022 with start -3, end 3, tau 1: abar(t) = (sig(3) - sig(6t - 3)) / (sig(3) - sig(-3))."""
    sched = NoiseSchedule.from_config("sigmoid", T)
    abar, betas = sched.alpha_bar.numpy(), sched.betas.numpy()
    assert np.all(np.diff(abar) < 0)
    assert 0.999 < abar[0] < 1 and 0 < abar[-1] < 1e-5
    assert betas.min() > 0 and betas.max() == 0.999 and betas[-1] == 0.999
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    t = np.arange(1, T + 1) / T
    expected = (sig(3.0) - sig(6 * t - 3)) / (sig(3.0) - sig(-3.0))
    np.testing.assert_allclose(abar[:-1], expected[:-1], rtol=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
def test_alpha_bar_at_snr_and_sigmas(schedule):
    sched = NoiseSchedule.from_config(schedule, T)
    t = torch.tensor([-1, 0, 1, 500, T - 1])
    ab = sched.alpha_bar_at(t)
    assert ab[0] == 1.0  # t = -1: no noise, the end of every sampler
    assert torch.equal(ab[1:], sched.alpha_bar[[0, 1, 500, T - 1]])
    assert sched.alpha_bar_at(torch.tensor([-1, -1], dtype=torch.int32)).tolist() == [1.0, 1.0]
    abar = sched.alpha_bar.numpy()
    np.testing.assert_allclose(sched.snr(torch.arange(T)).numpy(), abar / (1 - abar), rtol=1e-12)
    np.testing.assert_allclose(sched.sigmas().numpy(), np.sqrt((1 - abar) / abar), rtol=1e-12)
    assert np.all(np.diff(sched.sigmas().numpy()) > 0)


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(ValueError, match="quadratic"):
        NoiseSchedule.from_config("quadratic")


# ---------------------------------------------------------------------------------------------
# diffusers as a reference (it keeps its betas in float32).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ours,theirs", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
@pytest.mark.parametrize("T", [1000, 250])
def test_betas_match_diffusers(ours, theirs, T):
    DDPMScheduler = pytest.importorskip("diffusers").DDPMScheduler
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=theirs)
    sched = NoiseSchedule.from_config(ours, T)
    torch.testing.assert_close(sched.betas.float(), ref.betas, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sched.alpha_bar.float(), ref.alphas_cumprod, rtol=5e-5, atol=1e-9)


# Step counts where the exact timesteps are not at a rounding tie (see test_spacing_tie_breaking below).
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("steps", [1, 3, 7, 10, 50, 100, 250, 999, 1000])
def test_spaced_timesteps_match_diffusers(spacing, steps):
    diffusers = pytest.importorskip("diffusers")
    for cls in (diffusers.DDIMScheduler, diffusers.DDPMScheduler):
        ref = cls(num_train_timesteps=T, timestep_spacing=spacing)
        ref.set_timesteps(steps)
        assert spaced_timesteps(T, steps, spacing) == ref.timesteps.tolist(), cls.__name__


def test_spaced_timesteps_known_values():
    assert spaced_timesteps(T, 10) == list(range(999, 0, -100))  # trailing is the default
    assert spaced_timesteps(T, 10, "leading") == list(range(900, -1, -100))
    assert spaced_timesteps(T, 4, "linspace") == [999, 666, 333, 0]
    assert spaced_timesteps(T, 1, "trailing") == [999]
    assert spaced_timesteps(T, T, "trailing") == list(range(T - 1, -1, -1))


def test_spacing_tie_breaking():
    """Documented difference from diffusers: where the exact position is a tie (x.5), diffusers' np.arange
    accumulates its float step (937.4999...) while ours evaluates T - i T / steps directly (937.5) and rounds
    half to even, so a few timesteps are one apart. Both are valid respacings; pin ours."""
    assert spaced_timesteps(T, 48, "trailing")[3] == 937  # 1000 - 3 * 1000/48 = 937.5 -> 938 -> 937
    assert spaced_timesteps(T, 27, "linspace")[13] == 500  # 13 * 999/26 = 499.5 -> 500


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("T", [1000, 100])
def test_spaced_timesteps_valid_for_every_step_count(spacing, T):
    """Every steps in 1..T gives exactly `steps` distinct, decreasing timesteps in [0, T - 1]."""
    bad = []
    for steps in range(1, T + 1):
        ts = spaced_timesteps(T, steps, spacing)
        ok = (len(ts) == steps and all(a > b for a, b in zip(ts, ts[1:])) and 0 <= ts[-1] and ts[0] <= T - 1
              and all(isinstance(t, int) for t in ts))
        if not ok:
            bad.append((steps, ts[-3:]))
    assert not bad, f"{len(bad)} bad step counts, first {bad[:5]}"


@pytest.mark.parametrize("steps,spacing", [(0, "trailing"), (-1, "leading"), (T + 1, "trailing"),
                                           (T + 1, "linspace"), (10, "uniform"), (10, "")])
def test_spaced_timesteps_errors(steps, spacing):
    with pytest.raises(ValueError):
        spaced_timesteps(T, steps, spacing)
