"""The generator is called from several threads at once (two shards in flight per actor)."""

from __future__ import annotations

import threading

from synthmill.cluster.generator import ShardGenerator
from synthmill.jobs import generate
from synthmill.jobs.spec import load_spec
from tests.conftest import base_spec


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


def test_float16_images_equal_diffusers_own_uint8_conversion(tiny_sd, prompts_tsv, write_spec, tmp_path):
    """The float16 path (what every GPU runs): synthmill's uint8 images equal a plain diffusers call's
    ``output_type="np"`` images scaled to uint8, pixel for pixel (float16 on the CPU here)."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    spec = base_spec(tiny_sd, prompts_tsv, str(tmp_path / "out"))
    spec["model"]["dtype"] = "float16"
    prepared = generate.prepare(load_spec(write_spec(spec)))
    gen = ShardGenerator(prepared.spec, prepared.source, prepared.plan)
    assert gen.dtype == "float16"
    batch = gen.samples(0)
    ours, _ = gen.denoise(batch)
    pipe = DiffusionPipeline.from_pretrained(tiny_sd, dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    s = spec["sampling"]
    theirs = pipe([b.prompt for b in batch], num_inference_steps=s["steps"], guidance_scale=s["guidance_scale"],
                  height=s["height"], width=s["width"], output_type="np",
                  generator=[torch.Generator("cpu").manual_seed(b.seed) for b in batch]).images
    assert theirs.dtype == np.float32 and ours.dtype == np.uint8
    assert np.array_equal(ours, (theirs * 255).round().astype(np.uint8))
