"""The generator: one pipeline on one device, turning shard ids into committed WebDataset shards.

:class:`ShardGenerator` is plain Python (a benchmark can drive it without Ray); :class:`GeneratorActor`
is its Ray actor. ``process_shard(k)`` reads shard k's prompt rows, denoises them batch by batch under
a device lock, and hands each finished batch to encoder threads, so the device starts the next batch
(of this shard, or of the next shard queued on the actor) while earlier images are encoded, written
and uploaded. It returns the shard's marker: a small dict, never the images.

A batch holds samples of one size, guidance scale and kind of negative prompt (given or not) only, so no
image is padded or cropped and each batch is one pipeline call: a shard's samples are grouped by these, in
the order each group first appears, and batched within each group. The tar holds the samples in that order
(key order within a group); the marker's ``batches`` lists each batch's height, width and sample count.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray

from synthmill.sharding import storage
from synthmill.sharding.encoders import ENCODERS, LATENTS
from synthmill.sharding.index import index_table
from synthmill.sharding.layout import SHARDS, OutputLayout
from synthmill.sharding.nodes import NodePath, check_node_sees
from synthmill.sharding.plan import ShardPlan, sample_key
from synthmill.sharding.sources import PromptSource, rows_digest
from synthmill.sharding.units import LocalPayload
from synthmill.sharding.writer import ShardTarWriter

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """Everything about one sample except its pixels."""

    index: int
    prompt: str
    blank: bool
    prompt_index: int
    image_index: int
    seed: int
    prompt_tokens: int
    truncated: bool
    height: int = 0
    width: int = 0
    guidance_scale: float = 0.0
    negative_prompt: str | None = None
    values: dict[str, Any] | None = None  # the kept columns of its row

    def group(self) -> tuple[int, int, float, bool]:
        """What every sample of one batch shares."""
        return self.height, self.width, self.guidance_scale, self.negative_prompt is None


class ShardGenerator:
    """Holds one pipeline; :meth:`process_shard` may be called from several threads at once."""

    def __init__(self, spec: Any, source: PromptSource, plan: ShardPlan, fingerprints: tuple[str, ...] | None = None):
        """``fingerprints``: each plan part's (what its shards' markers hold); one part, of this source, if None."""
        from synthmill.models.loading import (
            fetch_in_background,
            load_pipeline,
            optimize_pipeline,
            preload_pipeline_modules,
            prompt_tokenizer,
        )

        t_imports = time.perf_counter()
        fetched = fetch_in_background(spec.model, spec.storage)  # a remote model downloads during the imports
        # Timed apart from the load: in a fresh actor these take seconds. diffusers and transformers
        # import lazily, so the pipeline class's own modules are imported here too (else the first
        # from_pretrained pays them and "load" looks several times slower than it is).
        import torch
        from diffusers import DiffusionPipeline  # noqa: F401

        preload_pipeline_modules(spec.model.path, spec.storage)
        self.import_s = time.perf_counter() - t_imports

        self.spec, self.source, self.plan = spec, source, plan
        self.fingerprints = fingerprints or (spec.fingerprint(source.digest),)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(spec.cluster.cpus_per_actor)
        t0 = time.perf_counter()
        self.pipe = load_pipeline(spec.model, self.device, spec.storage, fetched)
        self.speed = optimize_pipeline(self.pipe, spec.model, self.device)
        self.load_s = time.perf_counter() - t0
        self.dtype = str(self.pipe.dtype).replace("torch.", "")
        self.latents_name = self._latents_name() if spec.output.save_latents else None
        self.scheduler = type(self.pipe.scheduler).__name__
        # Token counting gets its own copy of the tokenizer: a fast tokenizer keeps truncation settings
        # as mutable state, so sharing it with the pipeline (called under the device lock from another
        # shard's thread) would let each call change the other's truncation.
        tokenizer = prompt_tokenizer(self.pipe)
        self.tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self._tokenizer_lock = threading.Lock()
        self._device_lock = threading.Lock()
        # Every call into the pipeline runs on this one thread, whichever Ray thread runs the shard:
        # CUDA graphs (model.compile_mode=reduce-overhead) and per-thread CUDA state stay on one thread.
        self._device_thread = ThreadPoolExecutor(1, thread_name_prefix="device")
        self._encoders = ThreadPoolExecutor(spec.cluster.encode_threads, thread_name_prefix="encode")
        self.busy_s = 0.0  # time spent denoising, for the idle fraction
        self.samples_done = 0  # images out of the pipeline so far (the driver's progress bar polls it)

    def _latents_name(self) -> str:
        """The step callback's tensor that the VAE decodes after the last step: ``denoised`` where the pipeline
        has one (LCM's pipeline decodes it), else ``latents``."""
        import inspect

        names = getattr(self.pipe, "_callback_tensor_inputs", None) or []
        if "callback_on_step_end" not in inspect.signature(self.pipe.__call__).parameters or "latents" not in names:
            raise RuntimeError(f"output.save_latents: {type(self.pipe).__name__} takes no callback_on_step_end "
                               "with its latents; generate without save_latents")
        return "denoised" if "denoised" in names else "latents"

    def info(self) -> dict[str, Any]:
        """Where this generator runs: host, device, dtype, scheduler, load time."""
        import torch

        name = torch.cuda.get_device_name(0) if self.device == "cuda" else "cpu"
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": name, "dtype": self.dtype,
                "scheduler": self.scheduler, "load_s": round(self.load_s, 3), "import_s": round(self.import_s, 3),
                **self.speed}

    # -- one shard -------------------------------------------------------------------------------

    def samples(self, k: int, digest: list[str] | None = None) -> list[Sample]:
        """Shard ``k``'s samples, with prompts read from the source and token counts; ``digest`` gets its rows'
        :func:`~synthmill.sharding.sources.rows_digest`."""
        prompts = self.plan.prompts(k)
        read = storage.retrying(self.source.url, "read prompts",
                                lambda: self.source.read_rows(prompts.start, prompts.stop))
        if digest is not None:
            digest.append(rows_digest(read))
        rows = {r.index: r for r in read}
        if len(rows) != len(prompts):
            raise RuntimeError(f"{self.source.url}: expected rows {prompts.start}..{prompts.stop - 1}, got {len(rows)}")
        limit = getattr(self.tokenizer, "model_max_length", None)
        tokens = {p: -1 for p in prompts}
        if self.tokenizer is not None:
            with self._tokenizer_lock:  # shards in flight on this actor count tokens one at a time
                for p in prompts:
                    tokens[p] = len(self.tokenizer(rows[p].text, truncation=False).input_ids)
        s = self.spec.sampling
        out = []
        for i in self.plan.samples(k):
            p, j = self.plan.split(i)
            row, n_tok = rows[p], tokens[p]
            given = row.settings
            h, w = given.get("size") or (tuple(s.sizes[p % len(s.sizes)]) if s.sizes else (s.height, s.width))
            seed = given["seed"] + j if "seed" in given else self.plan.seed_of(i)
            out.append(Sample(i, row.text, row.blank, p, j, seed, n_tok, bool(limit and n_tok > limit),
                              h, w, given.get("guidance_scale", s.guidance_scale),
                              given.get("negative_prompt", s.negative_prompt), row.values))
        return out

    def batches(self, samples: list[Sample]) -> list[list[Sample]]:
        """``samples`` in batches of at most ``cluster.batch_size``, each of one :meth:`Sample.group`."""
        groups: dict[tuple, list[Sample]] = {}
        for sample in samples:
            groups.setdefault(sample.group(), []).append(sample)
        bs = self.spec.cluster.batch_size
        return [g[lo:lo + bs] for g in groups.values() for lo in range(0, len(g), bs)]

    def denoise(self, batch: list[Sample]) -> tuple[np.ndarray, list[bool | None], np.ndarray | None]:
        """Run the pipeline on one batch: uint8 NHWC images (converted on the device), NSFW flags, and with
        ``output.save_latents`` the final latents (float16 NCHW, what ``output_type="latent"`` returns)."""
        import torch

        s, first = self.spec.sampling, batch[0]
        kwargs: dict[str, Any] = dict(
            prompt=[b.prompt for b in batch],
            num_inference_steps=s.steps,
            guidance_scale=first.guidance_scale,
            height=first.height,  # SDXL's size conditioning (original and target size) defaults to these
            width=first.width,
            generator=[torch.Generator("cpu").manual_seed(b.seed) for b in batch],
            output_type="pt",
        )
        if first.negative_prompt is not None:
            kwargs["negative_prompt"] = [b.negative_prompt for b in batch]
        final: list[Any] = []
        if self.latents_name:
            def keep(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                final[:] = [tensors[self.latents_name]]  # after each step's scheduler update; the last is decoded
                return tensors

            kwargs.update(callback_on_step_end=keep, callback_on_step_end_tensor_inputs=[self.latents_name])
        with torch.inference_mode():
            out = self.pipe(**kwargs)
            # In float32, as diffusers' own numpy/PIL output does it: scaling a float16 image by 255 in
            # float16 rounds ~4% of values one level off from what a plain diffusers call returns.
            images = (out.images.float() * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            arr = images.contiguous().cpu().numpy()
        nsfw = getattr(out, "nsfw_content_detected", None) or [None] * len(batch)
        latents = final[0].to(torch.float16).cpu().numpy() if final else None
        if self.spec.output.save_latents and latents is None:
            raise RuntimeError(f"output.save_latents: {type(self.pipe).__name__} never called its step callback")
        return arr, [None if f is None else bool(f) for f in nsfw], latents

    def metadata(self, sample: Sample, nsfw: bool | None, shard: int) -> dict[str, Any]:
        """The sample's ``KEY.json`` (the fields docs/design.md, "Output layout of a generate job", lists,
        plus truncation, blank and NSFW flags)."""
        s, m = self.spec.sampling, self.spec.model
        return {
            **(sample.values or {}),
            "key": sample_key(sample.index), "shard": shard, "prompt": sample.prompt,
            "negative_prompt": sample.negative_prompt, "seed": sample.seed, "steps": s.steps,
            "guidance_scale": sample.guidance_scale, "height": sample.height, "width": sample.width,
            "model": storage.redact_url(m.path),
            "scheduler": self.scheduler, "dtype": self.dtype, "prompt_index": sample.prompt_index,
            "image_index": sample.image_index, "source_row": sample.prompt_index,
            "prompt_tokens": sample.prompt_tokens, "truncated": sample.truncated,
            "blank_prompt": sample.blank, "nsfw": nsfw,
        }

    def _encode(self, batch: list[Sample], images: np.ndarray, nsfw: list, shard: int,
                latents: np.ndarray | None = None) -> list[tuple[dict, dict]]:
        fmt, quality = self.spec.output.format, self.spec.output.quality
        out = []
        for i, (sample, img, flag) in enumerate(zip(batch, images, nsfw, strict=False)):
            meta = self.metadata(sample, flag, shard)
            member = {
                "__key__": meta["key"],
                fmt: ENCODERS[fmt](img, quality),
                "txt": sample.prompt.encode("utf-8"),
                "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
            }
            if latents is not None:
                buf = io.BytesIO()
                np.save(buf, latents[i], allow_pickle=False)
                member[LATENTS] = buf.getvalue()
            out.append((member, meta))
        return out

    def process_shard(self, k: int, attempt: int = 1) -> dict[str, Any]:
        """Generate, write and commit shard ``k``; return its marker."""
        t0 = time.perf_counter()
        digest: list[str] = []
        samples = self.samples(k, digest)
        layout = OutputLayout(self.spec.output.path, self.spec.storage)
        tmp_dir = layout.local_path(SHARDS) if layout.is_local else None
        if tmp_dir:
            os.makedirs(tmp_dir, exist_ok=True)
        writer = ShardTarWriter(tmp_dir, prefix=f".{k:06d}.")
        metas: list[dict] = []
        busy = 0.0
        try:
            pending: deque = deque()

            def drain(block: bool) -> None:
                while pending and (block or pending[0].done()):
                    for member, meta in pending.popleft().result():
                        writer.write(member)
                        metas.append(meta)

            batches = self.batches(samples)
            with self._device_lock:
                for batch in batches:
                    tb = time.perf_counter()
                    images, nsfw, latents = self._device_thread.submit(self.denoise, batch).result()
                    busy += time.perf_counter() - tb
                    pending.append(self._encoders.submit(self._encode, batch, images, nsfw, k, latents))
                    self.samples_done += len(batch)
                    drain(block=False)
            drain(block=True)
            path, size, sha = writer.close()
        except BaseException:
            writer.discard()
            raise
        self.busy_s += busy
        metas.sort(key=lambda m: m["key"])  # the index is in key order
        marker = {
            "shard": k, "count": len(metas), "size": size, "sha256": sha,
            "fingerprint": self.fingerprints[self.plan.part_of(k)],
            "first_key": metas[0]["key"], "last_key": metas[-1]["key"],
            "batches": [[b[0].height, b[0].width, len(b)] for b in batches], "rows_digest": digest[0],
            "blank_prompts": sum(m["blank_prompt"] for m in metas),
            "truncated_prompts": sum(m["truncated"] for m in metas),
            "nsfw": sum(bool(m["nsfw"]) for m in metas),
            "attempt": attempt, "denoise_s": round(busy, 3),
            "elapsed_s": round(time.perf_counter() - t0, 3), **self.info(),
        }
        try:
            index = io.BytesIO()
            pq.write_table(index_table(metas, self.source.keep_types), index)
            marker = layout.shards.commit(k, LocalPayload(path, size, sha), marker, [index.getvalue()])
        finally:
            if os.path.exists(path):  # remote outputs upload a copy; the local temporary goes
                os.unlink(path)
        return marker


@ray.remote(max_restarts=0)
class GeneratorActor:
    """Ray actor around :class:`ShardGenerator` (created with num_gpus=1 on GPU clusters)."""

    def __init__(self, spec: Any, source: PromptSource, plan: ShardPlan, node_paths: list[NodePath],
                 fingerprints: tuple[str, ...] | None = None):
        self.start_error: Exception | None = None
        try:
            check_node_sees(node_paths)  # the model, prompts and output the driver checked
            self.gen = ShardGenerator(spec, source, plan, fingerprints)
        except Exception as e:  # raised by ready(): Ray would print an __init__'s traceback (synthmill.cluster.pool)
            self.start_error = e

    def ready(self) -> dict[str, Any]:
        if self.start_error is not None:
            raise self.start_error
        return self.gen.info()

    def process_shard(self, k: int, attempt: int = 1) -> dict[str, Any]:
        return self.gen.process_shard(k, attempt)

    def progress(self) -> int:
        return self.gen.samples_done
