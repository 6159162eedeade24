"""Latent consistency distillation: the math against diffusers' schedulers, and short trainings on tiny UNets.

The DDIM solver must take the step diffusers' DDIMScheduler takes on the same grid ("trailing" spacing), the
consistency function must give the ``denoised`` sample of LCMScheduler.step, and the guidance embedding must
be the pipelines' own. Then a few CPU optimizer steps on fixed samples must lower the loss (full LCM with its
EMA target, and LCM-LoRA), and the LCM-LoRA weights file must load with plain ``load_lora_weights``.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

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


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_lcm_lora_trains_adapters_and_loads_in_diffusers(sd, sdxl, kind, tmp_path):
    from diffusers import UNet2DConditionModel

    pipe = sd if kind == "sd" else sdxl
    unet = UNet2DConditionModel.from_config(pipe.unet.config)
    unet.load_state_dict(pipe.unet.state_dict())
    cond, uncond = _conditioning(pipe, ["a red cube", "two cats"])
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
    loss = LCMLoss(unet, None, None, _acp(pipe), "epsilon", LCMConfig(), lora=True)
    start, end = _train(loss, params, z, cond, uncond, steps=8, lr=1e-3)
    assert end < 0.9 * start, (start, end)
    with torch.no_grad():
        adapted = unet(z, t, **cond).sample
        with adapters_disabled(unet) as teacher:
            assert torch.equal(teacher(z, t, **cond).sample, plain)  # the teacher stayed the plain UNet
    assert not torch.allclose(adapted, plain, atol=1e-4)

    path = save_lora(str(tmp_path), unet, type(pipe))  # SDXL: StableDiffusionXLPipeline's format
    assert path.endswith("pytorch_lora_weights.safetensors")
    fresh = build_tiny_pipeline(kind, seed=3 if kind == "sd" else 4)
    fresh.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(z, t, **cond).sample, adapted, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# distill jobs with method: lcm, on the session's Ray (tiny SD teacher, the reference generate job's shards)


def lcm_spec(teacher: str, data: str, output: str, rank: int | None = None, **train) -> dict:
    t = {"max_steps": 4, "batch_size": 2, "gradient_accumulation": 2, "learning_rate": 1.0e-4,
         "checkpoint_every": 2, "log_every": 1}
    t.update(train)
    student = {"arch": "teacher", **({"lora": {"rank": rank}} if rank else {})}
    return {
        "kind": "distill",
        "method": "lcm",
        "teacher": {"path": teacher},
        "student": student,
        "lcm": {"time_cond_proj_dim": 16},
        "data": {"path": data, "resolution": 32, "loader_workers": 1, "shuffle_buffer": 8},
        "train": t,
        "cluster": {"num_workers": 1},
        "output": {"path": output},
    }


def _writer(folder):
    import yaml

    counter = iter(range(100))

    def write(spec: dict) -> str:
        path = folder / f"job{next(counter)}.yaml"
        path.write_text(yaml.safe_dump(spec), encoding="utf-8")
        return str(path)

    return write


@pytest.fixture(scope="module")
def lcm_full(ray_address, tiny_sd, reference, tmp_path_factory):
    """Full LCM trained 4 steps straight (``synthmill run`` in a subprocess on the session's Ray, meanwhile)
    and, in another output, 2 steps then raised to 4."""
    import subprocess
    import sys

    from tests.test_distill import run_distill

    folder = tmp_path_factory.mktemp("lcm")
    write = _writer(folder)
    straight, resumed = str(folder / "straight"), str(folder / "resumed")
    log = open(folder / "straight.log", "w+", encoding="utf-8")  # a file, not a pipe: Ray's output would fill one
    proc = subprocess.Popen([sys.executable, "-m", "synthmill.cli", "run", write(lcm_spec(tiny_sd, reference[1],
                                                                                          straight))],
                            env=dict(os.environ, RAY_ADDRESS=ray_address), stdout=log, stderr=subprocess.STDOUT)
    try:
        first = run_distill(write, lcm_spec(tiny_sd, reference[1], resumed, max_steps=2))
        assert first["steps"] == 2
        again = run_distill(write, lcm_spec(tiny_sd, reference[1], resumed), "train.max_steps=4")
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.seek(0)
        output = log.read()
        log.close()
    assert proc.returncode == 0, output[-3000:]
    with open(os.path.join(straight, "summary.json"), encoding="utf-8") as fh:
        return {"straight": straight, "resumed": resumed, "straight_summary": json.load(fh), "resumed_summary": again}


@pytest.fixture(scope="module")
def lcm_lora(ray_address, tiny_sd, reference, tmp_path_factory):
    """LCM-LoRA of rank 4 on 2 workers: 2 steps, then raised to 4 in the same output; and, in another output,
    4 steps straight."""
    from tests.test_distill import run_distill

    folder = tmp_path_factory.mktemp("lcm-lora")
    write = _writer(folder)
    output, straight = str(folder / "lora"), str(folder / "straight")
    spec = lcm_spec(tiny_sd, reference[1], output, rank=4, max_steps=2, learning_rate=1.0e-3)
    spec["cluster"]["num_workers"] = 2
    first = run_distill(write, spec)
    return {"lora": output, "lora_summary": first, "resumed_summary": run_distill(write, spec, "train.max_steps=4"),
            "straight": straight,
            "straight_summary": run_distill(write, spec, f"output.path={straight}", "train.max_steps=4")}


def _ckpt(output: str, step: int, *parts: str) -> str:
    return os.path.join(output, "checkpoints", f"step_{step:08d}", *parts)


def test_lcm_job_resumes_exactly_and_holds_three_unets(lcm_full, tiny_sd):
    from diffusers import UNet2DConditionModel

    from tests.test_distill import metrics_lines, unet_weights

    j = lcm_full
    assert j["resumed_summary"]["steps_resumed"] == 2 and j["resumed_summary"]["steps_run"] == 2
    a = unet_weights(_ckpt(j["resumed"], 4, "student"))
    b = unet_weights(_ckpt(j["straight"], 4, "student"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ta = torch.load(_ckpt(j["resumed"], 4, "objective.pt"), weights_only=True)["target"]
    tb = torch.load(_ckpt(j["straight"], 4, "objective.pt"), weights_only=True)["target"]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    teacher = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    assert not torch.equal(ta["conv_in.weight"], teacher.state_dict()["conv_in.weight"])  # the target moved
    lines, straight = metrics_lines(j["resumed"]), metrics_lines(j["straight"])
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    for x, y in zip(lines, straight, strict=True):
        assert {k: v for k, v in x.items() if k != "samples_per_s"} == {k: v for k, v in y.items()
                                                                         if k != "samples_per_s"}
    # a worker held the teacher, the student and the target network: nothing else
    student = lcm_student(teacher, 16)
    n_teacher, n_student = (sum(p.numel() for p in m.parameters()) for m in (teacher, student))
    assert j["straight_summary"]["worker_unet_params"] == n_teacher + 2 * n_student
    assert (j["straight_summary"]["teacher_params"], j["straight_summary"]["student_params"]) == (n_teacher, n_student)


def test_lcm_pipeline_loads_with_lcm_scheduler_and_generates_in_4_steps(lcm_full, write_spec, prompts_tsv,
                                                                        tmp_path):
    from diffusers import DiffusionPipeline

    from tests.conftest import base_spec, read_wds, run_job

    folder = os.path.join(lcm_full["straight"], "pipeline")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.unet.config.time_cond_proj_dim == 16
    target = torch.load(_ckpt(lcm_full["straight"], 4, "objective.pt"), weights_only=True)["target"]
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in target.items())  # the export is the target
    spec = base_spec(folder, prompts_tsv, str(tmp_path / "gen"))
    spec["prompts"]["limit"] = 3
    spec["model"]["scheduler"] = "lcm"
    spec["sampling"].update(steps=4, guidance_scale=1.0, images_per_prompt=1)
    spec["cluster"]["num_actors"] = 1
    summary = run_job(write_spec, spec)
    assert summary["samples"] == 3
    samples = read_wds(spec["output"]["path"])
    assert len(samples) == 3 and all(s["png"][:4] == b"\x89PNG" for s in samples)


def test_lcm_lora_resumed_equals_straight(lcm_lora):
    """Stopped after its step-2 checkpoint and raised to 4 (2 workers): the adapters, the exported weights file
    and the logged losses equal a run that never stopped, bit for bit."""
    from tests.test_distill import metrics_lines

    j = lcm_lora
    assert j["resumed_summary"]["steps_resumed"] == 2 and j["resumed_summary"]["steps_run"] == 2
    assert j["straight_summary"]["steps_resumed"] == 0 and j["straight_summary"]["steps_run"] == 4
    a = load_file(_ckpt(j["lora"], 4, "student", "adapter.safetensors"))
    b = load_file(_ckpt(j["straight"], 4, "student", "adapter.safetensors"))
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    early = load_file(_ckpt(j["lora"], 2, "student", "adapter.safetensors"))
    assert any(not torch.equal(early[k], a[k]) for k in a)  # steps 3 and 4 trained
    assert not os.path.exists(_ckpt(j["lora"], 4, "objective.pt"))  # LCM-LoRA keeps no target network
    fa = load_file(os.path.join(j["lora"], "pytorch_lora_weights.safetensors"))
    fb = load_file(os.path.join(j["straight"], "pytorch_lora_weights.safetensors"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    lines, straight = metrics_lines(j["lora"]), metrics_lines(j["straight"])
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    for x, y in zip(lines, straight, strict=True):
        assert {k: v for k, v in x.items() if k != "samples_per_s"} == {k: v for k, v in y.items()
                                                                         if k != "samples_per_s"}


def test_lcm_lora_weights_load_in_diffusers_and_change_the_images(lcm_lora, tiny_sd):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel

    j = lcm_lora
    assert j["lora_summary"]["workers"] == 2 and j["lora_summary"]["steps"] == 2
    assert os.path.isfile(os.path.join(j["lora"], "pytorch_lora_weights.safetensors"))
    teacher = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    probe = UNet2DConditionModel.from_config(teacher.config)
    lora_params = len([p for p in add_lora(probe, 4)])
    assert lora_params > 0
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_adapted = sum(p.numel() for p in probe.parameters())
    assert j["lora_summary"]["worker_unet_params"] == n_adapted > n_teacher  # one UNet: the teacher is itself
    assert (j["lora_summary"]["teacher_params"], j["lora_summary"]["student_params"]) == (n_teacher, n_adapted)

    def images(pipe):
        return np.stack([np.asarray(im) for im in pipe(["a red cube", "two cats"], num_inference_steps=2,
                                                       height=32, width=32, guidance_scale=7.5, output_type="pil",
                                                       generator=torch.Generator().manual_seed(0)).images])

    import numpy as np

    plain = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    plain.set_progress_bar_config(disable=True)
    before = images(plain)
    plain.load_lora_weights(j["lora"])
    after = images(plain)
    assert (before != after).any()
    # the exported pipeline is the teacher's with the adapters fused in, on LCMScheduler
    fused = DiffusionPipeline.from_pretrained(os.path.join(j["lora"], "pipeline"))
    assert type(fused.scheduler).__name__ == "LCMScheduler"
    g = torch.Generator().manual_seed(3)
    z, t, cond = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(fused.unet(z, t, encoder_hidden_states=cond).sample,
                                   plain.unet(z, t, encoder_hidden_states=cond).sample, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides,field", [
    (["student.arch=bk-small"], "student.arch"),
    (["lcm.w_min=20"], "lcm.w_min"),
    (["lcm.loss=l1"], "lcm.loss"),
    (["lcm.num_ddim_timesteps=0"], "lcm.num_ddim_timesteps"),
    (["lcm.ema_decay=1.0"], "lcm.ema_decay"),
    (["student.lora.rank=0"], "student.lora.rank"),
    (["train.ema=true"], "train.ema"),
    (["method=kd", "student.arch=bk-small", "student.lora.rank=4"], "student.lora.rank"),
    (["method=kd"], "student.arch"),
    (["method=lcx"], "method"),
])
def test_bad_lcm_values_are_exit_2(overrides, field, tiny_sd, write_spec, capsys, tmp_path):
    from tests.test_distill import _bad

    data = str(tmp_path / "data")  # never read: the spec is refused first
    msg = _bad(write_spec, capsys, lcm_spec(tiny_sd, data, str(tmp_path / "never")), *overrides)
    assert f"'{field}'" in msg, msg


def test_student_arch_teacher_is_a_keyword_even_beside_a_folder_of_that_name(tiny_sd, write_spec, tmp_path,
                                                                              monkeypatch):
    """``student.arch: teacher`` names the teacher's own layout; a folder called ``teacher`` in the working
    directory does not turn it into a path (which the spec would then refuse)."""
    from synthmill.jobs.spec import load_spec

    path = write_spec(lcm_spec(tiny_sd, str(tmp_path / "data"), str(tmp_path / "out")))
    monkeypatch.chdir(tmp_path)
    os.mkdir("teacher")
    assert load_spec(path).student.arch == "teacher"
