"""SDXL training jobs end to end: finetune (whole UNet, and LoRA) and LCM distillation of the tiny SDXL pipeline.

The model is the suite's tiny SDXL pipeline (two text encoders, ``text_time`` micro-conditioning; saved and
loaded back as users' folders are); the data are the reference generate job's 22 image-caption samples (32 px,
which the tiny SDXL VAE and UNet halve evenly). Three short runs on the session's Ray (one CPU worker each) feed
every test: a full fine-tune with EMA (``synthmill run``, beside the others), an LCM distillation of the UNet into
itself, and a LoRA fine-tune.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.test_finetune import (
    STEPS,
    _fixed_task_loss,
    _unet_params,
    ckpt,
    finetune_spec,
    load,
    metrics_lines,
    run_spec,
    same,
)

pytestmark = pytest.mark.usefixtures("ray_address")

LORA_STEPS = 2  # at a learning rate of 1e-2: the adapters (zero-initialised halves) move the images by > 1e-2


@pytest.fixture(scope="session")
def sdxl_trained(ray_address, tiny_sdxl, reference, tmp_path_factory):
    import yaml

    from tests.test_lcm import lcm_spec

    _, data = reference
    folder = tmp_path_factory.mktemp("sdxl-train")
    out = {name: str(folder / name) for name in ("full", "lcm", "lora")}
    specs = {"full": finetune_spec(tiny_sdxl, data, out["full"]),
             "lcm": lcm_spec(tiny_sdxl, data, out["lcm"]),
             "lora": finetune_spec(tiny_sdxl, data, out["lora"], rank=4, max_steps=LORA_STEPS, learning_rate=1.0e-2)}
    paths = {}
    for name, spec in specs.items():
        paths[name] = str(folder / f"{name}.yaml")
        with open(paths[name], "w", encoding="utf-8") as fh:
            yaml.safe_dump(spec, fh)
    # the full fine-tune runs as `synthmill run` while the other two run one after the other in this process
    log = open(folder / "full.log", "w+", encoding="utf-8")  # a file, not a pipe: Ray's output would fill one
    full = subprocess.Popen([sys.executable, "-m", "synthmill.cli", "run", paths["full"]],
                            env=dict(os.environ, RAY_ADDRESS=ray_address), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        summaries = {"lcm": run_spec(paths["lcm"]), "lora": run_spec(paths["lora"])}
        full.wait(timeout=400)
    finally:
        if full.poll() is None:
            os.killpg(full.pid, signal.SIGKILL)
    log.seek(0)
    assert full.returncode == 0, log.read()[-3000:]
    log.close()
    with open(os.path.join(out["full"], "summary.json"), encoding="utf-8") as fh:
        summaries["full"] = json.load(fh)
    return {"out": out, "summaries": summaries, "data": data}


def _images(pipe, steps: int = 2, **kw) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return torch.from_numpy(pipe(["a red bus", "a cat on a chair"], num_inference_steps=steps, height=32, width=32,
                                 generator=torch.Generator().manual_seed(0), output_type="np", **kw).images)


def test_sdxl_full_finetune_exports_an_sdxl_pipeline_and_holds_one_unet(sdxl_trained, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    s, out = sdxl_trained["summaries"]["full"], sdxl_trained["out"]["full"]
    assert s["status"] == "complete" and s["kind"] == "finetune" and s["steps"] == STEPS and s["workers"] == 1
    # the worker held the model's UNet and no other
    assert s["worker_unet_params"] == s["model_params"] == s["trainable_params"] == _unet_params(tiny_sdxl)
    lines = metrics_lines(out)
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and 0 < r["loss"] < 10 for r in lines)
    assert s["final_loss"] == lines[-1]["loss"]
    start = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    ema = load(ckpt(out, STEPS, "ema", "diffusion_pytorch_model.safetensors"))
    assert not same(ema, start.state_dict())
    # plain diffusers loads the export as an SDXL pipeline (the EMA UNet, the model's own text encoders) and
    # generates with it
    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(out, "pipeline"))
    assert same(ema, pipe.unet.state_dict())
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    assert same(pipe.text_encoder_2.state_dict(), base.text_encoder_2.state_dict())
    images = _images(pipe)
    assert images.shape == (2, 32, 32, 3) and torch.isfinite(images).all()
    assert (images - _images(base)).abs().max() > 1e-3  # the trained UNet, not the model's
    # on fixed samples, noise and timesteps (with the SDXL size/crop conditioning) the trained UNet's loss is
    # below the model's own
    trained = UNet2DConditionModel.from_pretrained(ckpt(out, STEPS, "student"))
    before = _fixed_task_loss(tiny_sdxl, start, sdxl_trained["data"])
    after = _fixed_task_loss(tiny_sdxl, trained, sdxl_trained["data"])
    assert after < 0.9 * before, (before, after)


def test_sdxl_lcm_exports_an_lcm_pipeline_that_generates_in_4_steps(sdxl_trained, tiny_sdxl, write_spec,
                                                                     prompts_tsv, tmp_path):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from synthmill.models.lcm import lcm_student
    from tests.conftest import base_spec, read_wds, run_job

    s, out = sdxl_trained["summaries"]["lcm"], sdxl_trained["out"]["lcm"]
    assert s["status"] == "complete" and s["steps"] == 4 and s["workers"] == 1
    assert all(math.isfinite(r["loss"]) for r in metrics_lines(out))
    # a worker held the teacher, the student and the target network: nothing else
    teacher = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in lcm_student(teacher, 16).parameters())
    assert s["worker_unet_params"] == n_teacher + 2 * n_student
    folder = os.path.join(out, "pipeline")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and type(pipe.scheduler).__name__ == "LCMScheduler"
    assert pipe.unet.config.time_cond_proj_dim == 16 and pipe.unet.config.addition_embed_type == "text_time"
    target = torch.load(ckpt(out, 4, "objective.pt"), weights_only=True)["target"]
    assert not torch.equal(target["conv_in.weight"], teacher.state_dict()["conv_in.weight"])  # it trained
    assert same(target, pipe.unet.state_dict())  # the export is the target network
    spec = base_spec(folder, prompts_tsv, str(tmp_path / "gen"))
    spec["prompts"]["limit"] = 3
    spec["model"]["scheduler"] = "lcm"
    spec["sampling"].update(steps=4, guidance_scale=1.0, images_per_prompt=1)
    spec["cluster"]["num_actors"] = 1
    summary = run_job(write_spec, spec)
    assert summary["samples"] == 3
    samples = read_wds(spec["output"]["path"])
    assert len(samples) == 3 and all(x["png"][:4] == b"\x89PNG" for x in samples)


def test_sdxl_lora_weights_load_in_plain_diffusers_and_change_the_images(sdxl_trained, tiny_sdxl):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    out, s = sdxl_trained["out"]["lora"], sdxl_trained["summaries"]["lora"]
    assert s["status"] == "complete" and s["steps"] == LORA_STEPS and s["lora_rank"] == 4
    # one UNet: the model's, with the adapters on it
    assert 0 < s["trainable_params"] < s["model_params"] // 10
    assert s["worker_unet_params"] == s["model_params"] + s["trainable_params"]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    base = _images(pipe)
    pipe.load_lora_weights(out)  # the output folder, as a user passes it
    with_lora = _images(pipe)
    assert (with_lora - base).abs().max() > 1e-2
    fused = DiffusionPipeline.from_pretrained(os.path.join(out, "pipeline"))
    assert type(fused).__name__ == "StableDiffusionXLPipeline"
    assert torch.allclose(_images(fused), with_lora, atol=1e-4)
