"""Finetune jobs end to end on the session's Ray (one CPU worker), and distill's ``student.init``.

The model is the suite's tiny SD pipeline (saved and loaded back as users' folders are); the data are the
reference generate job's 22 image-caption samples. Four short runs feed every test: a full fine-tune with
EMA (``synthmill run``, beside the others); a LoRA fine-tune (with EMA of the adapters) straight to step 4;
the same LoRA job stopped at step 2 and raised to step 4. A distill job then starts its student from the
full fine-tune's output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from synthmill.cli import main

pytestmark = pytest.mark.usefixtures("ray_address")

STEPS = 4


def finetune_spec(model: str, data: str, output: str, rank: int | None = None, **train) -> dict:
    t = {"max_steps": STEPS, "batch_size": 2, "gradient_accumulation": 2, "learning_rate": 1.0e-3,
         "checkpoint_every": 2, "log_every": 1, "ema": True, "ema_decay": 0.9, "snr_gamma": 5.0,
         "noise_offset": 0.05}
    t.update(train)
    return {
        "kind": "finetune",
        "model": {"path": model},
        "lora": {"rank": rank},
        "data": {"path": data, "resolution": 32, "loader_workers": 1, "shuffle_buffer": 8},
        "train": t,
        "cluster": {"num_workers": 1},
        "output": {"path": output},
    }


def run_spec(path: str, *overrides: str) -> dict:
    from synthmill.jobs.kinds import KINDS
    from synthmill.jobs.spec import load_spec

    spec = load_spec(path, overrides)
    runner = KINDS[spec.kind].module()
    return runner.run(runner.prepare(spec))


def metrics_lines(output: str) -> list[dict]:
    with open(os.path.join(output, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def ckpt(output: str, step: int, *parts: str) -> str:
    return os.path.join(output, "checkpoints", f"step_{step:08d}", *parts)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="session")
def finetuned(ray_address, tiny_sd, reference, tmp_path_factory):
    import yaml

    _, data = reference
    folder = tmp_path_factory.mktemp("finetune")
    out = {name: str(folder / name) for name in ("full", "lora", "lora_staged")}
    specs = {"full": finetune_spec(tiny_sd, data, out["full"]),
             "lora": finetune_spec(tiny_sd, data, out["lora"], rank=4)}
    paths = {}
    for name, spec in specs.items():
        paths[name] = str(folder / f"{name}.yaml")
        with open(paths[name], "w", encoding="utf-8") as fh:
            yaml.safe_dump(spec, fh)
    # the full fine-tune runs as `synthmill run` on the session's Ray while the three LoRA runs go on in this
    # process: a run alone leaves much of the 2 cores idle while Ray Train starts its workers
    log = open(folder / "full.log", "w+", encoding="utf-8")  # a file, not a pipe: Ray's output would fill one
    full = subprocess.Popen([sys.executable, "-m", "synthmill.cli", "run", paths["full"]],
                            env=dict(os.environ, RAY_ADDRESS=ray_address), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        summaries = {"lora": run_spec(paths["lora"])}
        staged = f"output.path={out['lora_staged']}"
        summaries["lora_stage1"] = run_spec(paths["lora"], staged, "train.max_steps=2")
        summaries["lora_staged"] = run_spec(paths["lora"], staged)
        full.wait(timeout=400)
    finally:
        if full.poll() is None:
            os.killpg(full.pid, signal.SIGKILL)
    log.seek(0)
    assert full.returncode == 0, log.read()[-3000:]
    log.close()
    with open(os.path.join(out["full"], "summary.json"), encoding="utf-8") as fh:
        summaries["full"] = json.load(fh)
    return {"out": out, "summaries": summaries, "paths": paths, "data": data}


def _fixed_task_loss(model: str, unet, data: str) -> float:
    """The task loss of ``unet`` on the first 8 samples with fixed noise and timesteps (the target the model's
    scheduler asks for), computed here from diffusers' parts."""
    from diffusers import DDPMScheduler

    from synthmill.distill.data import ShardStream, StreamSpec
    from synthmill.distill.train import encode_text, load_teacher, tokenizers
    from synthmill.jobs.generate_spec import ModelSpec
    from synthmill.sharding.images import open_image_set

    pipe = load_teacher(ModelSpec(path=model), None)
    stream = ShardStream(StreamSpec(open_image_set(data).units, 32, True, False, 0, 8, 0), tokenizers(pipe), 0, 1)
    items = [s for _, s in zip(range(8), stream.iter_as(0, 1), strict=False)]
    batch = {k: torch.stack([s[k] for s in items]) for k in items[0]}
    g = torch.Generator().manual_seed(0)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        latents = pipe.vae.encode(batch["pixel_values"]).latent_dist.sample(generator=g)
        latents = latents * pipe.vae.config.scaling_factor
        cond = encode_text(pipe, batch, torch.device("cpu"))
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=g)
        target = sched.get_velocity(latents, noise, t) if sched.config.prediction_type == "v_prediction" else noise
        pred = unet.eval()(sched.add_noise(latents, noise, t), t, **cond).sample
    return float(torch.nn.functional.mse_loss(pred, target))


def _unet_params(model: str) -> int:
    from diffusers import UNet2DConditionModel

    return sum(p.numel() for p in UNet2DConditionModel.from_pretrained(model, subfolder="unet").parameters())


def test_full_finetune_with_ema_exports_a_pipeline_and_holds_one_unet(finetuned, tiny_sd):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    s, out = finetuned["summaries"]["full"], finetuned["out"]["full"]
    assert s["status"] == "complete" and s["kind"] == "finetune" and s["steps"] == STEPS and s["workers"] == 1
    # the worker held the model's UNet and no other (a distill worker also holds its teacher)
    assert s["worker_unet_params"] == s["model_params"] == s["trainable_params"] == _unet_params(tiny_sd)
    lines = metrics_lines(out)
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))
    assert all(set(r) == {"step", "loss", "lr", "samples_per_s", "samples", "vae_encoded"} for r in lines)
    assert all(r["vae_encoded"] == r["samples"] // r["step"] for r in lines)  # images, no stored latents: all encoded
    assert all(0 < r["loss"] < 10 for r in lines)
    # trained, and the EMA is not the raw weights; the exported pipeline holds the EMA weights
    start = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    student = load(ckpt(out, STEPS, "student", "diffusion_pytorch_model.safetensors"))
    ema = load(ckpt(out, STEPS, "ema", "diffusion_pytorch_model.safetensors"))
    assert not same(student, start) and not same(ema, student) and not same(ema, start)
    pipe = DiffusionPipeline.from_pretrained(os.path.join(out, "pipeline"))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert same(ema, {k: v for k, v in pipe.unet.state_dict().items()})
    # on fixed samples, noise and timesteps the trained UNet's loss is below the model's own
    trained = UNet2DConditionModel.from_pretrained(ckpt(out, STEPS, "student"))
    before = _fixed_task_loss(tiny_sd, UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"),
                              finetuned["data"])
    after = _fixed_task_loss(tiny_sd, trained, finetuned["data"])
    assert after < 0.9 * before, (before, after)
    assert not os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))


def test_lora_resumed_equals_straight(finetuned):
    """Stopped at step 2 and raised to 4: the adapters, their EMA and the logged losses equal a run that never
    stopped, bit for bit."""
    out, s = finetuned["out"], finetuned["summaries"]
    assert s["lora_stage1"]["steps"] == 2 and s["lora_staged"]["steps_resumed"] == 2
    assert s["lora_staged"]["steps_run"] == STEPS - 2
    for sub, name in (("student", "adapter.safetensors"), ("ema", None)):
        if name:
            a, b = load(ckpt(out["lora"], STEPS, sub, name)), load(ckpt(out["lora_staged"], STEPS, sub, name))
            assert a and same(a, b), sub
        else:
            a = torch.load(ckpt(out["lora"], STEPS, "ema", "lora_ema.pt"), weights_only=True)
            b = torch.load(ckpt(out["lora_staged"], STEPS, "ema", "lora_ema.pt"), weights_only=True)
            assert a["optimization_step"] == b["optimization_step"] == STEPS
            assert all(torch.equal(x, y) for x, y in zip(a["shadow_params"], b["shadow_params"], strict=True))
    strip = [{k: v for k, v in r.items() if k != "samples_per_s"} for r in metrics_lines(out["lora"])]
    assert strip == [{k: v for k, v in r.items() if k != "samples_per_s"} for r in metrics_lines(out["lora_staged"])]
    assert same(load(os.path.join(out["lora"], "pytorch_lora_weights.safetensors")),
                load(os.path.join(out["lora_staged"], "pytorch_lora_weights.safetensors")))


def test_lora_weights_load_in_plain_diffusers_and_change_the_images(finetuned, tiny_sd):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    out, s = finetuned["out"]["lora"], finetuned["summaries"]["lora"]
    # one UNet: the model's, with the adapters on it
    assert s["lora_rank"] == 4 and 0 < s["trainable_params"] < s["model_params"] // 10
    assert s["worker_unet_params"] == s["model_params"] + s["trainable_params"]

    def images(pipe) -> torch.Tensor:
        pipe.set_progress_bar_config(disable=True)
        return torch.from_numpy(pipe(["a red bus", "a cat on a chair"], num_inference_steps=2, height=32, width=32,
                                     generator=torch.Generator().manual_seed(0), output_type="np").images)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    base = images(pipe)
    pipe.load_lora_weights(out)  # the output folder, as a user passes it
    with_lora = images(pipe)
    assert (with_lora - base).abs().max() > 1e-2
    fused = DiffusionPipeline.from_pretrained(os.path.join(out, "pipeline"), safety_checker=None)
    assert torch.allclose(images(fused), with_lora, atol=1e-4)


def test_bad_finetune_spec_is_exit_2(finetuned, capsys):
    assert main(["validate", finetuned["paths"]["lora"], "lora.rank=0"]) == 2
    assert "field 'lora.rank'" in capsys.readouterr().err
    assert main(["validate", finetuned["paths"]["full"], "train.snr_gamma=-1"]) == 2
    assert "field 'train.snr_gamma'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# distill's student.init: a UNet folder, a pipeline, or an earlier output


def _distill(teacher: str, data: str, output: str, arch: str, init: str) -> dict:
    return {"kind": "distill", "teacher": {"path": teacher}, "student": {"arch": arch, "init": init},
            "data": {"path": data, "resolution": 32, "loader_workers": 1}, "train": {"max_steps": 2},
            "cluster": {"num_workers": 1}, "output": {"path": output}}


def test_student_init_from_an_earlier_output_starts_from_its_weights(finetuned, tiny_sd, write_spec, tmp_path,
                                                                     capsys):
    """A second stage whose student starts from the first stage's output: the worker's starting weights are
    that output's exported UNet (its latest checkpoint's student before it is exported); a layout that does not
    fit is exit 2 at validate naming the first mismatching block, before anything is written."""
    from diffusers import UNet2DConditionModel

    from synthmill.distill.objectives import build_student
    from synthmill.distill.train import load_teacher
    from synthmill.jobs import distill
    from synthmill.jobs.spec import load_spec
    from synthmill.testing.tiny import save_tiny_pipeline

    first = finetuned["out"]["full"]
    arch = os.path.join(first, "pipeline", "unet")  # the same layout, as a UNet folder
    teacher = load_teacher(load_spec(finetuned["paths"]["full"]).model, None)
    for init, expect in ((first, os.path.join(first, "pipeline", "unet")),
                         (os.path.join(first, "pipeline"), os.path.join(first, "pipeline", "unet"))):
        spec = load_spec(write_spec(_distill(tiny_sd, finetuned["data"], str(tmp_path / "second"), arch, init)))
        p = distill.prepare(spec)
        assert p.worker_spec.student.init == expect and p.models["student_init"] == expect
        start = build_student(p.worker_spec, teacher.unet).state_dict()
        exported = UNet2DConditionModel.from_pretrained(expect).state_dict()
        assert same(start, exported)
    # an output not exported yet: its latest checkpoint's student
    unexported = str(tmp_path / "unexported")
    shutil.copytree(first, unexported)
    shutil.rmtree(os.path.join(unexported, "pipeline"))
    p = distill.prepare(load_spec(write_spec(_distill(tiny_sd, finetuned["data"], str(tmp_path / "third"), arch,
                                                      unexported))))
    assert p.worker_spec.student.init == ckpt(unexported, STEPS, "student")
    start = build_student(p.worker_spec, teacher.unet).state_dict()
    assert same(start, load(ckpt(unexported, STEPS, "student", "diffusion_pytorch_model.safetensors")))
    assert not os.path.exists(tmp_path / "second") and not os.path.exists(tmp_path / "third")
    # a bk-small student of a full-layout teacher cannot start from the tiny model's UNet
    full = save_tiny_pipeline(tmp_path / "full", "sd", seed=3, unet_layout="full")
    bad = tmp_path / "bad"
    assert main(["validate", write_spec(_distill(full, finetuned["data"], str(bad), "bk-small", first))]) == 2
    err = capsys.readouterr().err
    assert "field 'student.init'" in err and "does not fit the bk-small layout" in err and "block " in err, err
    assert not os.path.exists(bad)
    # neither a UNet nor an output
    assert main(["validate", write_spec(_distill(tiny_sd, finetuned["data"], str(bad), arch,
                                                 finetuned["data"]))]) == 2
    assert "field 'student.init'" in capsys.readouterr().err
