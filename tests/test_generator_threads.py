"""The generator is called from several threads at once (two shards in flight per actor)."""

from __future__ import annotations

import threading

import pytest

from synthmill.cluster.generator import ShardGenerator
from synthmill.jobs import generate
from synthmill.jobs.spec import load_spec
from tests.conftest import base_spec, initial_malloc_env


def test_prompt_token_counts_are_stable_while_the_pipeline_tokenizes(tiny_sd, prompts_tsv, write_spec, tmp_path):
    """Counting tokens must not share tokenizer state with the pipeline's own (truncating) calls."""
    prepared = generate.prepare(load_spec(write_spec(base_spec(tiny_sd, prompts_tsv, str(tmp_path / "out")))))
    gen = ShardGenerator(prepared.spec, prepared.source, prepared.plan)
    expected = [(s.prompt_tokens, s.truncated) for k in range(prepared.plan.num_shards) for s in gen.samples(k)]
    assert any(t for _, t in expected) and not all(t for _, t in expected)
    stop = threading.Event()
    tok = gen.pipe.tokenizer
    prompts = [s.prompt for s in gen.samples(4)] * 4

    def pipeline_like_calls() -> None:  # what the pipeline does inside each denoise call
        while not stop.is_set():
            tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt")

    threads = [threading.Thread(target=pipeline_like_calls) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(60):
            got = [(s.prompt_tokens, s.truncated) for k in range(prepared.plan.num_shards) for s in gen.samples(k)]
            assert got == expected
    finally:
        stop.set()
        for t in threads:
            t.join()


@pytest.mark.parametrize("kind", ["tiny_sd", "tiny_sdxl"])
def test_float16_images_equal_diffusers_own_uint8_conversion(kind, request, prompts_tsv, write_spec, tmp_path):
    """The float16 path (what every GPU runs): synthmill's uint8 images equal a plain diffusers call's
    ``output_type="np"`` images scaled to uint8, pixel for pixel (float16 on the CPU here). SDXL's pipeline
    decodes with its VAE upcast to float32 (``force_upcast``), in synthmill's call as in the plain one.
    Channels-last is off, as it is by default on a CPU, where it changes pixels by itself."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    model = request.getfixturevalue(kind)
    spec = base_spec(model, prompts_tsv, str(tmp_path / "out"))
    spec["model"]["dtype"] = "float16"
    prepared = generate.prepare(load_spec(write_spec(spec)))
    gen = ShardGenerator(prepared.spec, prepared.source, prepared.plan)
    assert gen.dtype == "float16"
    batch = gen.samples(0)
    ours, _, _ = gen.denoise(batch)
    if kind == "tiny_sdxl":
        assert gen.pipe.vae.config.force_upcast
    assert not gen.speed["channels_last"]
    pipe = DiffusionPipeline.from_pretrained(model, dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    s = spec["sampling"]
    theirs = pipe([b.prompt for b in batch], num_inference_steps=s["steps"], guidance_scale=s["guidance_scale"],
                  height=s["height"], width=s["width"], output_type="np",
                  generator=[torch.Generator("cpu").manual_seed(b.seed) for b in batch]).images
    assert theirs.dtype == np.float32 and ours.dtype == np.uint8
    assert np.array_equal(ours, (theirs * 255).round().astype(np.uint8))


def test_cpu_actors_start_with_the_malloc_settings(ray_address, monkeypatch):
    """glibc reads its malloc variables at process start only, so CPU actors get them through their runtime
    environment: a Ray worker started with a CPU actor's options has them from its start. GPU actors do not
    get them; values the driver's environment sets win. (What they gain is measured by the generate
    benchmark, benchmarks/RESULTS.md: with the tiny pipeline here glibc's defaults fault little or much
    depending on the process's history, so a page-fault count would not tell.)"""
    import ray

    from synthmill.cluster.connect import CPU_MALLOC_ENV, actor_options
    from synthmill.jobs.generate_spec import ClusterSpec

    for k in CPU_MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    cluster = ClusterSpec()  # a generate spec's defaults
    options = actor_options(cluster, use_gpu=False)
    assert options["runtime_env"] == {"env_vars": CPU_MALLOC_ENV} and "num_gpus" not in options
    probe = ray.remote(initial_malloc_env)
    assert ray.get(probe.options(num_cpus=1, runtime_env=options["runtime_env"]).remote()) == CPU_MALLOC_ENV
    assert ray.get(probe.options(num_cpus=1).remote()) == {}  # the session's workers: glibc's defaults

    gpu = actor_options(cluster, use_gpu=True)
    assert gpu["num_gpus"] == 1 and "runtime_env" not in gpu
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert (actor_options(cluster, use_gpu=False)["runtime_env"]["env_vars"]
            == {**CPU_MALLOC_ENV, "MALLOC_ARENA_MAX": "4"})
