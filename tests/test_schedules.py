import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from distill.schedules import PREDICTION_TYPES, DDPMSchedule, FlowSchedule, schedule_from_config

BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
DDPM_TYPES = ["epsilon", "v_prediction", "sample"]



def _implied_eps(sched, x0, x_t, t):
    """The noise that x_t = alpha_t x0 + sigma_t eps implies for an x0 estimate."""
    alpha, sigma = sched.alpha_sigma(t, ndim=x_t.ndim, dtype=x_t.dtype)
    return (x_t - alpha * x0) / sigma

def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _config(scheduler):
    """What ``save_config`` writes to scheduler_config.json; ``scheduler.config`` itself has no ``_class_name``."""
    return json.loads(scheduler.to_json_string())


def _ddpm(beta_schedule, prediction_type="epsilon", cls=DDPMScheduler):
    return cls(beta_schedule=beta_schedule, prediction_type=prediction_type, clip_sample=False, thresholding=False)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_ddpm_add_noise_matches_diffusers(beta_schedule):
    ref = _ddpm(beta_schedule)
    sched = schedule_from_config(_config(ref))
    x0, noise = _randn(5, 3, 4, 4, seed=1), _randn(5, 3, 4, 4, seed=2)
    t = torch.tensor([0, 1, 500, 998, 999])
    torch.testing.assert_close(sched.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("prediction_type", DDPM_TYPES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_ddpm_to_x0_matches_step(beta_schedule, prediction_type, cls):
    ref = _ddpm(beta_schedule, prediction_type, cls)
    ref.set_timesteps(7)
    sched = schedule_from_config(_config(ref))
    assert sched.prediction_type == prediction_type
    x_t, out = _randn(1, 2, 4, 4, seed=3), _randn(1, 2, 4, 4, seed=4)
    kwargs = {"eta": 0.0} if cls is DDIMScheduler else {"generator": torch.Generator().manual_seed(0)}
    for t in ref.timesteps:
        expected = ref.step(out, t, x_t, **kwargs).pred_original_sample
        torch.testing.assert_close(sched.to_x0(out, x_t, t), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_ddpm_v_target_matches_get_velocity(beta_schedule):
    ref = _ddpm(beta_schedule, "v_prediction")
    sched = schedule_from_config(_config(ref))
    x0, noise = _randn(4, 3, 4, 4, seed=5), _randn(4, 3, 4, 4, seed=6)
    t = torch.tensor([0, 250, 700, 999])
    torch.testing.assert_close(sched.target(x0, noise, t), ref.get_velocity(x0, noise, t), atol=1e-5, rtol=0)
    # training on this target, a perfect model recovers x0 and the noise
    x_t = sched.add_noise(x0, noise, t)
    v = sched.target(x0, noise, t)
    torch.testing.assert_close(sched.to_x0(v, x_t, t), x0, atol=1e-4, rtol=0)
    torch.testing.assert_close(_implied_eps(sched, sched.to_x0(v, x_t, t), x_t, t), noise, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prediction_type", DDPM_TYPES)
def test_ddpm_round_trips(prediction_type):
    sched = schedule_from_config(_config(_ddpm("scaled_linear", "epsilon")))
    x0, noise = _randn(4, 3, 4, 4, seed=7).double(), _randn(4, 3, 4, 4, seed=8).double()
    t = torch.tensor([1, 100, 600, 990])
    x_t = sched.add_noise(x0, noise, t)
    out = _randn(4, 3, 4, 4, seed=9).double()
    x0_hat = sched.to_x0(out, x_t, t, prediction_type)
    # the output is the target of (x0_hat, the noise it implies): to_x0 inverts target
    torch.testing.assert_close(sched.target(x0_hat, _implied_eps(sched, x0_hat, x_t, t), t, prediction_type), out)
    # the target built from (x0, noise) is what to_x0 inverts
    target = sched.target(x0, noise, t, prediction_type)
    torch.testing.assert_close(sched.to_x0(target, x_t, t, prediction_type), x0)


def test_alpha_sigma_shapes_and_dtype():
    sched = DDPMSchedule(DDPMScheduler().alphas_cumprod)
    alpha, sigma = sched.alpha_sigma(torch.tensor([0, 10, 999]))
    assert alpha.shape == sigma.shape == (3, 1, 1, 1) and alpha.dtype == torch.float32
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))
    a, s = sched.alpha_sigma(500, ndim=2, dtype=torch.float64)
    assert a.shape == (1, 1) and a.dtype == torch.float64
    assert a.item() == pytest.approx(DDPMScheduler().alphas_cumprod[500].double().sqrt().item(), abs=1e-12)
    # out-of-range timesteps clamp rather than wrap around
    assert sched.alpha_sigma(torch.tensor([1500]))[0].item() == sched.alpha_sigma(999)[0].item()
    flow = FlowSchedule()
    a, s = flow.alpha_sigma(torch.tensor(250.0))
    assert a.shape == (1, 1, 1, 1) and s.item() == pytest.approx(0.25) and a.item() == pytest.approx(0.75)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_add_noise_matches_scale_noise(shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(8)
    sched = schedule_from_config(_config(ref))
    assert isinstance(sched, FlowSchedule) and sched.prediction_type == "flow" and sched.shift == shift
    x0, noise = _randn(1, 4, 4, 4, seed=10), _randn(1, 4, 4, 4, seed=11)
    for t in ref.timesteps:
        expected = ref.scale_noise(x0, t[None], noise)
        torch.testing.assert_close(sched.add_noise(x0, noise, t[None]), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_conversions_match_euler_step(shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(6)
    sched = schedule_from_config(_config(ref))
    x_t, v = _randn(1, 4, 4, 4, seed=12), _randn(1, 4, 4, 4, seed=13)
    n = sched.num_train_timesteps
    for i, t in enumerate(ref.timesteps):
        sigma, sigma_next = ref.sigmas[i].item(), ref.sigmas[i + 1].item()
        prev = ref.step(v, t, x_t).prev_sample
        torch.testing.assert_close(prev, x_t + (sigma_next - sigma) * v, atol=1e-5, rtol=0)
        # Euler on the velocity is exactly re-noising the implied (x0, eps) to the next sigma
        x0 = sched.to_x0(v, x_t, t)
        eps = _implied_eps(sched, x0, x_t, t)
        torch.testing.assert_close(sched.add_noise(x0, eps, torch.tensor([sigma_next * n])), prev, atol=1e-5, rtol=0)
        if i == len(ref.timesteps) - 1:
            assert sigma_next == 0.0
            torch.testing.assert_close(sched.to_x0(v, x_t, t), prev, atol=1e-5, rtol=0)


def test_flow_prediction_types():
    sched = FlowSchedule(shift=3.0)
    x0, noise = _randn(3, 2, 4, 4, seed=14).double(), _randn(3, 2, 4, 4, seed=15).double()
    t = torch.tensor([50.0, 500.0, 950.5])
    x_t = sched.add_noise(x0, noise, t)
    torch.testing.assert_close(sched.target(x0, noise, t), noise - x0)
    for kind in ("flow", "epsilon", "sample"):
        target = sched.target(x0, noise, t, kind)
        torch.testing.assert_close(sched.to_x0(target, x_t, t, kind), x0)
        torch.testing.assert_close(_implied_eps(sched, sched.to_x0(target, x_t, t, kind), x_t, t), noise)
    with pytest.raises(ValueError, match="v_prediction"):
        sched.to_x0(x_t, x_t, t, "v_prediction")
    with pytest.raises(ValueError, match="epsilon"):
        DDPMSchedule(DDPMScheduler().alphas_cumprod).to_x0(x_t, x_t, t, "bogus")
    with pytest.raises(ValueError):
        DDPMSchedule(DDPMScheduler().alphas_cumprod).target(x0, noise, t, "flow")
    assert set(PREDICTION_TYPES) == {"epsilon", "v_prediction", "sample", "flow"}


def test_schedule_from_config_round_trip():
    ref = DDPMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear")
    sched = schedule_from_config(_config(ref))
    assert isinstance(sched, DDPMSchedule) and sched.prediction_type == "v_prediction"
    assert sched.num_train_timesteps == 1000
    assert torch.equal(sched.alphas_cumprod, ref.alphas_cumprod.double())
    # other DDPM-family samplers read the same training schedule; default prediction type is epsilon
    config = _config(DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2"))
    del config["prediction_type"]
    other = schedule_from_config(config)
    assert other.prediction_type == "epsilon"
    assert torch.equal(other.alphas_cumprod, DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double())
    # zero terminal SNR: the training process has alpha = 0 at the last step (Euler substitutes 2**-24 for sampling)
    zsnr = schedule_from_config(_config(EulerDiscreteScheduler(rescale_betas_zero_snr=True)))
    assert zsnr.alphas_cumprod[-1].item() == 0.0
    # a beta schedule only the named class knows falls back to that class's own alphas_cumprod
    heun = HeunDiscreteScheduler(beta_schedule="exp")
    assert torch.equal(schedule_from_config(_config(heun)).alphas_cumprod, heun.alphas_cumprod.double())
    with pytest.raises(ValueError, match="NotAScheduler"):
        schedule_from_config({"_class_name": "NotAScheduler", "num_train_timesteps": 1000})
    with pytest.raises(ValueError, match="_class_name"):
        schedule_from_config(dict(DDPMScheduler().config))  # fresh: to_json_string adds _class_name to .config
    with pytest.raises(ValueError, match="UNet2DModel"):
        schedule_from_config({"_class_name": "UNet2DModel"})


def test_flow_from_config_fields():
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
              "use_dynamic_shifting": True}
    sched = schedule_from_config(config)
    assert (sched.num_train_timesteps, sched.shift, sched.use_dynamic_shifting) == (1000, 3.0, True)
    flow_dpm = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction")
    dpm = schedule_from_config(_config(flow_dpm))
    assert isinstance(dpm, FlowSchedule) and dpm.shift == 5.0 and dpm.prediction_type == "flow"


def test_ddpm_sample_timesteps():
    sched = DDPMSchedule(DDPMScheduler().alphas_cumprod)
    t = sched.sample_timesteps(4000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.shape == (4000,)
    assert t.min().item() == 0 and t.max().item() == 999  # both ends are reachable
    t = sched.sample_timesteps(2000, generator=torch.Generator().manual_seed(0), t_min=20, t_max=22)
    assert set(t.tolist()) == {20, 21, 22}
    a = sched.sample_timesteps(16, generator=torch.Generator().manual_seed(5))
    b = sched.sample_timesteps(16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_flow_sample_timesteps():
    def draw(shift, **kw):
        return FlowSchedule(shift=shift).sample_timesteps(20000, generator=torch.Generator().manual_seed(0), **kw)

    t1, t3 = draw(1.0), draw(3.0)
    assert t1.dtype == torch.float32 and t1.shape == (20000,)
    assert 0.0 <= t3.min().item() and t3.max().item() <= 1000.0
    assert t1.mean().item() == pytest.approx(500.0, abs=10.0)
    # shift 3: E[sigma] = E[3u / (1 + 2u)] = 1.5 - 0.75 ln 3 ~ 0.676
    assert t3.mean().item() == pytest.approx(1000 * (1.5 - 0.75 * torch.log(torch.tensor(3.0)).item()), abs=10.0)
    assert t3.mean() > t1.mean() + 100
    # restricted: inside the bounds and distributed as the shifted law truncated there (same u -> same t)
    tr = draw(3.0, t_min=200.0, t_max=400.0)
    assert 200.0 <= tr.min().item() and tr.max().item() <= 400.0 and tr.max() - tr.min() > 190.0
    torch.testing.assert_close(draw(3.0), draw(3.0))


def test_clip_x0_follows_the_scheduler_config():
    x0 = torch.linspace(-3, 3, 2 * 64).reshape(2, 1, 8, 8)
    clipping = schedule_from_config(dict(DDPMScheduler().config, _class_name="DDPMScheduler"))  # clip_sample on by default
    assert clipping.clip_x0(x0).min() == -1.0 and clipping.clip_x0(x0).max() == 1.0
    wide = schedule_from_config(dict(DDPMScheduler(clip_sample_range=2.0).config, _class_name="DDPMScheduler"))
    assert wide.clip_x0(x0).abs().max() == 2.0
    off = schedule_from_config(dict(DDPMScheduler(clip_sample=False).config, _class_name="DDPMScheduler"))
    assert torch.equal(off.clip_x0(x0), x0)
    euler = schedule_from_config({"_class_name": "EulerDiscreteScheduler"})  # a class without clip_sample
    assert torch.equal(euler.clip_x0(x0), x0)
    flow = schedule_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler"})
    assert torch.equal(flow.clip_x0(x0), x0)
    stock = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)
    thresholding = schedule_from_config(dict(stock.config, _class_name="DDPMScheduler"))
    torch.testing.assert_close(thresholding.clip_x0(x0), stock._threshold_sample(x0))
    # clipped_fraction: the share of values the clip moved, read off its output
    assert clipping.clipped_fraction(clipping.clip_x0(x0)) == (x0.abs() > 1).float().mean() == 86 / 128
    assert wide.clipped_fraction(wide.clip_x0(x0)) == (x0.abs() > 2).float().mean()
    # each sample's 0.9-quantile of |x0| is about 2.7, so s = sample_max_value = 2.5 for both
    assert thresholding.clipped_fraction(thresholding.clip_x0(x0)) == (x0.abs() > 2.5).float().mean() > 0
    assert off.clipped_fraction(x0) is None and euler.clipped_fraction(x0) is None and flow.clipped_fraction(x0) is None
