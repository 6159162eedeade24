"""Latent consistency distillation: the math against diffusers' schedulers, and short trainings on tiny UNets.

The DDIM solver must take the step diffusers' DDIMScheduler takes on the same grid ("trailing" spacing), the
consistency function must give the ``denoised`` sample of LCMScheduler.step, and the guidance embedding must
be the pipelines' own. Then a few CPU optimizer steps on fixed samples must lower the loss (full LCM with its
EMA target, and LCM-LoRA), and the LCM-LoRA weights file must load with plain ``load_lora_weights``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from synthmill.models.lcm import (
    DDIMSolver,
    LCMConfig,
    LCMLoss,
    adapters_disabled,
    add_lora,
    alphas_sigmas,
    boundary_scalings,
    consistency_loss,
    guidance_scale_embedding,
    lcm_student,
    predicted_noise,
    predicted_x0,
    save_lora,
    target_network,
    update_ema,
    zero_conditioning,
)
from synthmill.testing.tiny import build_tiny_pipeline


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread here; the setting is restored for the modules after this one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd():
    return build_tiny_pipeline("sd", seed=3)


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_pipeline("sdxl", seed=4)


def _acp(pipe) -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_solver_takes_ddim_scheduler_steps(sd, prediction_type):
    from diffusers import DDIMScheduler, DDPMScheduler

    ddim = DDIMScheduler.from_config(sd.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=False,
                                     clip_sample=False, prediction_type=prediction_type)
    ddim.set_timesteps(50)
    acp = _acp(sd)
    solver = DDIMSolver(acp, 50)
    assert solver.timesteps.tolist() == sorted(ddim.timesteps.tolist())
    assert solver.timesteps[:3].tolist() == [19, 39, 59] and solver.step_ratio == 20
    alphas, sigmas = alphas_sigmas(acp)
    g = torch.Generator().manual_seed(0)
    for index in (0, 1, 17, 49):
        t = solver.timesteps[index]
        out, sample = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        expected = ddim.step(out, int(t), sample, eta=0.0).prev_sample
        ts, idx = torch.full((2,), int(t)), torch.full((2,), index)
        x0 = predicted_x0(out, ts, sample, prediction_type, alphas, sigmas)
        eps = predicted_noise(out, ts, sample, prediction_type, alphas, sigmas)
        torch.testing.assert_close(solver.step(x0, eps, idx), expected, rtol=1e-5, atol=1e-5)

    # the noisy input is DDPM's forward process at the grid timestep
    loss = LCMLoss(lcm_student(sd.unet, 8), sd.unet, sd.unet, acp, prediction_type, LCMConfig(time_cond_proj_dim=8))
    z = torch.randn(3, 4, 8, 8, generator=g)
    d = loss.draw(z, torch.Generator().manual_seed(5))
    ddpm = DDPMScheduler.from_config(sd.scheduler.config)
    torch.testing.assert_close(loss.noisy(z, d), ddpm.add_noise(z, d.noise, d.start), rtol=1e-6, atol=1e-6)
    assert (d.end == (d.start - 20).clamp(min=0)).all() and ((3.0 <= d.w) & (d.w <= 15.0)).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_consistency_function_is_lcm_schedulers_denoised(sd, prediction_type):
    from diffusers import LCMScheduler

    lcm = LCMScheduler.from_config(sd.scheduler.config, prediction_type=prediction_type)
    for t in (0, 1, 19, 500, 999):
        c_skip, c_out = boundary_scalings(torch.tensor([t]), 10.0)
        ref_skip, ref_out = lcm.get_scalings_for_boundary_condition_discrete(t)
        assert c_skip.item() == pytest.approx(ref_skip, rel=1e-6) and c_out.item() == pytest.approx(ref_out, rel=1e-6)

    loss = LCMLoss(sd.unet, None, None, _acp(sd), prediction_type, LCMConfig(), lora=True)
    g = torch.Generator().manual_seed(1)
    lcm.set_timesteps(4)
    for t in lcm.timesteps.tolist():
        out, sample = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        fresh = LCMScheduler.from_config(sd.scheduler.config, prediction_type=prediction_type)
        fresh.set_timesteps(4)
        denoised = fresh.step(out, t, sample, generator=torch.Generator().manual_seed(0)).denoised
        fixed = SimpleNamespace(sample=out)
        mine = loss.consistency(lambda *a, **k: fixed, sample, torch.full((2,), t), None, {})  # noqa: B023
        torch.testing.assert_close(mine, denoised, rtol=1e-5, atol=1e-5)


def test_guidance_embedding_is_the_pipelines():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 3.0, 7.5, 14.9])
    for dim in (256, 255, 8):
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.equal(guidance_scale_embedding(w, dim), ref)


def test_losses_and_ema():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    d = (a - b).double()
    ref = ((d * d + 0.001**2).sqrt() - 0.001).mean()
    assert consistency_loss(a, b, "huber", 0.001).item() == pytest.approx(ref.item(), rel=1e-5)
    assert consistency_loss(a, b, "l2", 0.001).item() == pytest.approx(torch.nn.functional.mse_loss(a, b).item())
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in target.parameters()]
    update_ema(target, online, 0.95)
    for t, o, b0 in zip(target.parameters(), online.parameters(), before, strict=True):
        torch.testing.assert_close(t, 0.95 * b0 + 0.05 * o, rtol=0, atol=1e-7)
    for bad, field in ((dict(w_min=5.0, w_max=3.0), "w_min"), (dict(loss="l1"), "loss"), (dict(ema_decay=1.0), "ema"),
                       (dict(num_ddim_timesteps=0), "num_ddim"), (dict(huber_c=0.0), "huber_c")):
        with pytest.raises(ValueError, match=field):
            LCMConfig(**bad).check()


def _conditioning(pipe, captions: list[str]) -> tuple[dict, dict]:
    """The text conditioning of ``captions`` and the unconditional one (SD: the empty caption; SDXL: zeros)."""
    def ids(tok, texts):
        return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    with torch.no_grad():
        if getattr(pipe, "text_encoder_2", None) is None:
            cond = {"encoder_hidden_states": pipe.text_encoder(ids(pipe.tokenizer, captions))[0]}
            return cond, {"encoder_hidden_states": pipe.text_encoder(ids(pipe.tokenizer, [""]))[0]}
        states = []
        for enc, tok in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
            out = enc(ids(tok, captions), output_hidden_states=True)
            states.append(out.hidden_states[-2])
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(len(captions), 1)
        cond = {"encoder_hidden_states": torch.cat(states, dim=-1),
                "added_cond_kwargs": {"text_embeds": out[0], "time_ids": time_ids}}
        return cond, zero_conditioning(cond)


def _train(loss, params, latents, cond, uncond, steps: int, lr: float) -> tuple[float, float]:
    """Loss on the fixed samples before and after ``steps`` AdamW steps on them (the same draws each time)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def measure() -> float:
        with torch.no_grad():
            return loss(latents, cond, uncond, torch.Generator().manual_seed(11))[1]["loss"]

    start = measure()
    for _ in range(steps):
        total, _ = loss(latents, cond, uncond, torch.Generator().manual_seed(11))
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.update_target()
    return start, measure()


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_lcm_training_lowers_the_loss(sd, sdxl, kind):
    pipe = sd if kind == "sd" else sdxl
    teacher = pipe.unet.requires_grad_(False).eval()
    student = lcm_student(teacher, 16).train()
    assert student.config.time_cond_proj_dim == 16 and teacher.config.time_cond_proj_dim is None
    cond, uncond = _conditioning(pipe, ["a red cube", "two cats"])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    w_emb = guidance_scale_embedding(torch.tensor([3.0, 9.0]), 16)
    with torch.no_grad():  # the zero-initialised guidance projection: the student starts as the teacher, exactly
        t = torch.tensor([999, 419])
        assert torch.equal(student(z, t, timestep_cond=w_emb, **cond).sample, teacher(z, t, **cond).sample)
    target = target_network(student)
    loss = LCMLoss(student, teacher, target, _acp(pipe), "epsilon", LCMConfig(time_cond_proj_dim=16))
    first = loss(z, cond, uncond, torch.Generator().manual_seed(11))[1]["loss"]
    assert loss(z, cond, uncond, torch.Generator().manual_seed(11))[1]["loss"] == first  # seeded: repeatable
    start, end = _train(loss, list(student.parameters()), z, cond, uncond, steps=8, lr=1e-4)
    assert end < 0.9 * start, (start, end)
    assert student.time_embedding.cond_proj.weight.abs().sum() > 0  # the guidance embedding trained
    assert all(not p.requires_grad for p in target.parameters())
    # the target followed the online weights by EMA: between the start and the online model now
    moved = (target.conv_in.weight - teacher.conv_in.weight).abs().sum()
    assert 0 < moved < (student.conv_in.weight - teacher.conv_in.weight).abs().sum()


def test_lcm_lora_trains_adapters_and_loads_in_diffusers(sd, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(sd.unet.config)
    unet.load_state_dict(sd.unet.state_dict())
    cond, uncond = _conditioning(sd, ["a red cube", "two cats"])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([999, 419])
    with torch.no_grad():
        plain = unet(z, t, **cond).sample
    params = add_lora(unet, rank=4, seed=0)
    assert params and all(p.dtype == torch.float32 for p in params)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == {n for n, _ in unet.named_parameters()
                                                                          if "lora_" in n}
    with torch.no_grad():
        assert torch.equal(unet(z, t, **cond).sample, plain)  # the zero half of each adapter: starts as the teacher
    loss = LCMLoss(unet, None, None, _acp(sd), "epsilon", LCMConfig(), lora=True)
    start, end = _train(loss, params, z, cond, uncond, steps=8, lr=1e-3)
    assert end < 0.9 * start, (start, end)
    with torch.no_grad():
        adapted = unet(z, t, **cond).sample
        with adapters_disabled(unet) as teacher:
            assert torch.equal(teacher(z, t, **cond).sample, plain)  # the teacher stayed the plain UNet
    assert not torch.allclose(adapted, plain, atol=1e-4)

    path = save_lora(str(tmp_path), unet, StableDiffusionPipeline)
    assert path.endswith("pytorch_lora_weights.safetensors")
    fresh = build_tiny_pipeline("sd", seed=3)
    fresh.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(z, t, **cond).sample, adapted, rtol=1e-5, atol=1e-5)
