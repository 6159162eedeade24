"""Generate throughput: a plain diffusers loop vs synthmill's actor path vs ``synthmill run`` vs Ray Data.

The same model, prompts (the first N captions of ``configs/prompts/coco2014_5k_captions.tsv``), steps,
resolution, guidance and batch size go through:

(a) a plain diffusers script: ``DiffusionPipeline.from_pretrained``, one pipeline call per batch with
    per-sample ``torch.Generator("cpu").manual_seed(seed + i)``, PIL PNG encoding and
    ``webdataset.TarWriter``, all sequential in one thread;
(b) synthmill's per-actor path in-process: ``prepare(spec)``, then ``ShardGenerator.process_shard(k)``
    for every shard, without Ray (the steady state of one actor);
(c) ``synthmill run spec.yaml cluster.num_actors=1`` through the real CLI, in a fresh process;
(d) Ray Data doing the same job, as a Ray Data user would write it: ``ray.data.from_arrow`` of the same
    rows (index, prompt; one block per batch, so its batches are (a)'s), ``map_batches`` with a callable
    class holding one pipeline loaded as in (a) (``batch_size`` = the batch size, per-sample
    ``torch.Generator("cpu").manual_seed(seed + i)``, PIL PNG bytes per sample), one actor
    (``compute=ActorPoolStrategy(size=1)``, what the deprecated ``concurrency=1`` maps to) with the CPUs
    and torch threads of (c)'s actor (plus one GPU on CUDA, as (c)), then ``write_webdataset``;
    skipped with ``--no-ray-data``.

Steady state: (a) and (b) are timed in this process after one uncounted warm-up batch each, model load
excluded, ``--repeats`` times, interleaved so that drifts in machine speed hit both; the best counts.
End to end: (a)'s first run (a fresh interpreter's start and the plain script's imports, timed in a child
process at the start, then load and every batch with no warm-up) against the wall time of (c) (process start,
imports, Ray start, actor load, generation, index, summary): both count their process start.
(d) runs after (c) in this process, on a local Ray it starts itself (``address="local"``, as ``synthmill
run`` does); its end to end is timed from dataset creation until ``write_webdataset`` returns (actor
start and load included), and reported without and with that Ray start (``import ray.data`` and
``ray.init``, timed on their own). Its tars are read back with ``webdataset`` to count the samples, and
their decoded images are compared with (a)'s, as (b)'s are. ``--smoke`` includes (d): about 25 s more on
a 2-core CPU machine at rest (Ray start about 8 s, the actor's start and load most of the rest).
Without ``--model`` a tiny seeded SD pipeline (``synthmill.testing.tiny``) is built in a temporary folder.
On CUDA all use float16 (what ``dtype: auto`` picks), on CPU float32. On a CPU the benchmark reruns
itself in a child process under the glibc malloc settings synthmill gives its CPU actors
(``synthmill.cluster.connect.CPU_MALLOC_ENV``; read only at process start), so that (b) runs its
pipeline on a thread as (c)'s actor does, and (a) and (d) get the same allocator.

    python -m benchmarks.generate                 # the CPU numbers of RESULTS.md
    python -m benchmarks.generate --smoke         # about a minute; what tests/test_benchmarks.py runs
    python -m benchmarks.generate --no-ray-data   # (a), (b) and (c) only
    python -m benchmarks.generate --model /models/sd-1.5 --size 512 --steps 25 --prompts 256
    python -m benchmarks.generate --arch sdxl --size 1024 --steps 20 --prompts 32 --batch-size 4   # on a GPU
    python -m benchmarks.generate --arch sd15 --size 512 --steps 25 --prompts 64 --compile        # torch.compile
    # batch-size guidance:
    python -m benchmarks.generate --arch sdxl --size 1024 --steps 20 --prompts 32 --batch-sweep 1,2,4,8
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthmill.testing.full_size import FULL_SIZE_ARCHS

REPO = Path(__file__).resolve().parent.parent
PROMPTS_TSV = REPO / "configs" / "prompts" / "coco2014_5k_captions.tsv"
GOAL = 0.95  # steady state (b)/(a) that the generate path must reach


@dataclass(frozen=True)
class Settings:
    """What every variant runs with."""

    model: str
    prompts: int
    steps: int
    size: int
    batch_size: int
    samples_per_shard: int
    guidance_scale: float
    seed: int
    repeats: int
    cpus_per_actor: int | None  # None: the plain loop's torch thread count on CPU, the spec default on GPU
    model_options: tuple[tuple[str, Any], ...] = ()  # extra model.* keys for (b) and (c), e.g. compile


@dataclass(frozen=True)
class Timing:
    """One row of the table."""

    variant: str
    timed: str
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def full_size_model(arch: str, folder: str) -> str:
    """A full-size random-weight pipeline folder for ``arch`` (float16, built on the GPU when there is one)."""
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        print(f"model: reusing {folder}", flush=True)
        return folder
    from synthmill.testing.full_size import save_random_pipeline

    device, dtype = device_and_dtype()
    t0 = time.perf_counter()
    save_random_pipeline(folder, arch, seed=0, device=device, dtype=dtype)
    print(f"model: built {arch} with random weights on {device} and saved to {folder} in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return folder


def read_prompts(n: int) -> list[str]:
    """The first ``n`` captions of the COCO TSV (blank cells as '', as synthmill reads them)."""
    with open(PROMPTS_TSV, encoding="utf-8", newline="") as fh:
        rows = csv.DictReader(fh, delimiter="\t")
        prompts = [(row["caption"] or "") for _, row in zip(range(n), rows, strict=False)]
    if len(prompts) < n:
        raise ValueError(f"{PROMPTS_TSV} has only {len(prompts)} prompts, asked for {n}")
    return [p if p.strip() else "" for p in prompts]


def device_and_dtype() -> tuple[str, Any]:
    """What synthmill's ``dtype: auto`` picks: float16 on CUDA, float32 on CPU."""
    import torch

    return ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)


# -- (a) the plain diffusers script ----------------------------------------------------------------


def channels_last_of(cfg: Settings) -> bool:
    """Whether (b) and (c) run channels-last (``model.channels_last``; unset: on CUDA only, as synthmill does).
    The plain loop (a) and Ray Data (d) get the same, so that a ratio measures synthmill and not a setting."""
    options = dict(cfg.model_options)
    if options.get("channels_last") is not None:
        return bool(options["channels_last"])
    return device_and_dtype()[0] == "cuda"


def load_plain(model: str, channels_last: bool) -> Any:
    """``DiffusionPipeline.from_pretrained`` on the device, progress bars off; with ``channels_last``, the UNet
    and VAE moved to that memory format as a user does it (``module.to(memory_format=...)``)."""
    import torch
    from diffusers import DiffusionPipeline

    device, dtype = device_and_dtype()
    pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype).to(device)
    if channels_last:
        for module in (pipe.unet, pipe.vae):
            module.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_batch(pipe: Any, cfg: Settings, prompts: list[str], first_seed: int) -> Any:
    """One pipeline call; uint8 NHWC images."""
    import numpy as np
    import torch

    generators = [torch.Generator("cpu").manual_seed(first_seed + j) for j in range(len(prompts))]
    out = pipe(prompt=prompts, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
               height=cfg.size, width=cfg.size, generator=generators, output_type="np")
    return (out.images * 255).round().astype(np.uint8)


def plain_generate(pipe: Any, cfg: Settings, prompts: list[str], out_dir: str) -> None:
    """Generate every prompt batch by batch, PNG-encode with PIL and write tars of ``samples_per_shard``."""
    import webdataset as wds
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    writer = None
    for lo in range(0, len(prompts), cfg.batch_size):
        batch = prompts[lo:lo + cfg.batch_size]
        for j, (prompt, image) in enumerate(zip(batch, plain_batch(pipe, cfg, batch, cfg.seed + lo), strict=True)):
            i = lo + j
            if i % cfg.samples_per_shard == 0:
                if writer is not None:
                    writer.close()
                writer = wds.TarWriter(os.path.join(out_dir, f"{i // cfg.samples_per_shard:06d}.tar"))
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            meta = {"key": f"{i:010d}", "prompt": prompt, "seed": cfg.seed + i, "steps": cfg.steps}
            writer.write({"__key__": f"{i:010d}", "png": buf.getvalue(), "txt": prompt, "json": meta})
    if writer is not None:
        writer.close()


# -- (b) synthmill's actor path, in-process ---------------------------------------------------------


def write_spec(cfg: Settings, path: str, cpus_per_actor: int | None, storage: dict[str, Any] | None = None) -> None:
    """The generate spec that (b) and (c) share (``output.path`` comes as an override); ``storage``: the
    spec's storage options, for an ``s3://`` model."""
    import yaml

    cluster: dict[str, Any] = {"num_actors": 1, "batch_size": cfg.batch_size}
    if cpus_per_actor is not None:
        cluster["cpus_per_actor"] = cpus_per_actor
    spec = {
        "kind": "generate",
        "model": {"path": cfg.model, **dict(cfg.model_options)},
        "prompts": {"path": str(PROMPTS_TSV), "column": "caption", "limit": cfg.prompts},
        "sampling": {"steps": cfg.steps, "guidance_scale": cfg.guidance_scale, "height": cfg.size,
                     "width": cfg.size, "seed": cfg.seed},
        "output": {"path": "unset", "format": "png", "samples_per_shard": cfg.samples_per_shard},
        "cluster": cluster,
    }
    if storage:
        spec["storage"] = storage
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(spec, fh, sort_keys=False)


def load_generator(spec_path: str, out_dir: str) -> Any:
    """``load_spec`` + ``prepare`` + a ``ShardGenerator`` (loads the pipeline), exactly as an actor does."""
    from synthmill.cluster.generator import ShardGenerator
    from synthmill.jobs.generate import prepare
    from synthmill.jobs.spec import load_spec

    prepared = prepare(load_spec(spec_path, [f"output.path={out_dir}"]))
    return ShardGenerator(prepared.spec, prepared.source, prepared.plan)


def synthmill_generate(gen: Any) -> None:
    """Every shard of the plan, one after another, as one actor would run them."""
    for k in range(gen.plan.num_shards):
        gen.process_shard(k)


# -- (d) Ray Data: map_batches with one actor, write_webdataset -------------------------------------


class RayDataGenerator:
    """(d)'s ``map_batches`` callable class: one diffusers pipeline per Ray Data actor.

    Self-contained, as a Ray Data user would write it: the constructor sets torch's threads (on CPU, like
    (c)'s actor) and loads the pipeline as :func:`load_plain` does; each call generates one batch with
    (a)'s per-sample generators and returns PNG bytes, prompt and metadata per sample.
    """

    def __init__(self, model: str, steps: int, guidance_scale: float, size: int, seed: int, threads: int,
                 channels_last: bool):
        import torch
        from diffusers import DiffusionPipeline

        device, dtype = ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)
        if device == "cpu":
            torch.set_num_threads(threads)
        self.pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype).to(device)
        if channels_last:
            for module in (self.pipe.unet, self.pipe.vae):
                module.to(memory_format=torch.channels_last)
        self.pipe.set_progress_bar_config(disable=True)
        self.steps, self.guidance_scale, self.size, self.seed = steps, guidance_scale, size, seed

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One pipeline call on the batch's prompts; ``__key__``, ``png``, ``txt`` and ``json`` per sample."""
        import numpy as np
        import torch
        from PIL import Image

        indices, prompts = [int(i) for i in batch["index"]], [str(p) for p in batch["prompt"]]
        generators = [torch.Generator("cpu").manual_seed(self.seed + i) for i in indices]
        out = self.pipe(prompt=prompts, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                        height=self.size, width=self.size, generator=generators, output_type="np")
        images = (out.images * 255).round().astype(np.uint8)
        keys, pngs, metas = [], [], []
        for i, prompt, image in zip(indices, prompts, images, strict=True):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            keys.append(f"{i:010d}")
            pngs.append(buf.getvalue())
            meta = {"key": f"{i:010d}", "prompt": prompt, "seed": self.seed + i, "steps": self.steps}
            metas.append(json.dumps(meta))
        # object arrays: numpy's fixed-width bytes dtype would drop trailing NUL bytes of a PNG
        return {"__key__": np.array(keys, dtype=object), "png": np.array(pngs, dtype=object),
                "txt": np.array(prompts, dtype=object), "json": np.array(metas, dtype=object)}


def start_ray(address: str | None = None) -> float:
    """``import ray.data`` and a local ``ray.init`` (as ``synthmill run`` starts one), or a connection to
    ``address``; return seconds."""
    t0 = time.perf_counter()
    import ray
    import ray.data

    ray.init(address=address or "local", include_dashboard=False if not address else None)
    ray.data.DataContext.get_current().enable_progress_bars = False  # a log, not a terminal
    return time.perf_counter() - t0


def ray_data_generate(cfg: Settings, prompts: list[str], out_dir: str, threads: int, use_gpu: bool) -> float:
    """(d): the prompts through ``map_batches`` (one actor) and ``write_webdataset``; return seconds.

    Timed from dataset creation until ``write_webdataset`` returns (execution is lazy, so the actor's
    start and pipeline load are inside). One block per batch, so Ray Data's batches are (a)'s: batch
    composition can change float results on a CPU. The write tasks keep Ray Data's default of one CPU
    each, so where the actor holds every CPU of the machine they start once it has finished.
    """
    import pyarrow as pa
    import ray.data

    t0 = time.perf_counter()
    blocks = [pa.table({"index": list(range(lo, min(lo + cfg.batch_size, len(prompts)))),
                        "prompt": prompts[lo:lo + cfg.batch_size]})
              for lo in range(0, len(prompts), cfg.batch_size)]
    ds = ray.data.from_arrow(blocks).map_batches(
        RayDataGenerator,
        fn_constructor_kwargs={"model": cfg.model, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
                               "size": cfg.size, "seed": cfg.seed, "threads": threads,
                               "channels_last": channels_last_of(cfg)},
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=threads,
        num_gpus=1 if use_gpu else None,
    )
    # encoder=None: the columns are already bytes and str (the default encoder wants arrays for png)
    ds.write_webdataset(out_dir, encoder=None, min_rows_per_file=cfg.samples_per_shard)
    return time.perf_counter() - t0


def webdataset_images(folder: str) -> tuple[dict[str, Any], int]:
    """({key: decoded image}, samples read) of the tars in ``folder``, read back with ``webdataset``."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    urls = [str(p) for p in sorted(Path(folder).glob("*.tar"))]
    if not urls:
        return {}, 0
    out, n = {}, 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        n += 1
        out[f"{sample['__key__']}.png"] = np.asarray(Image.open(io.BytesIO(sample["png"])))
    return out, n


# -- end to end -------------------------------------------------------------------------------------


def under_cpu_actor_malloc(argv: list[str]) -> int | None:
    """On a CPU, this benchmark again in a child process under synthmill's CPU actor malloc settings
    (:func:`benchmarks.child.rerun_under_cpu_malloc`): (b) runs its pipeline on a thread as (c)'s actor does,
    and (a) and (d) get the same allocator. Returns the child's exit code, or None to run here."""
    from benchmarks.child import rerun_under_cpu_malloc

    return rerun_under_cpu_malloc("benchmarks.generate", argv)


#: What the plain script imports (and what loading an SD pipeline pulls in), run by a fresh interpreter.
PLAIN_IMPORTS = ("import numpy, PIL.Image, torch, webdataset; "
                 "from diffusers import DiffusionPipeline, StableDiffusionPipeline; "
                 "from transformers import CLIPTextModel, CLIPTokenizer")


def import_plain_stack() -> float:
    """Seconds a fresh interpreter takes to start, import what the plain script imports, and exit; then the
    same imports in this process (untimed), so that (a)'s load and generation here run as in that script.

    The end-to-end (a) number counts this start and these imports, as (c)'s wall time counts its own process
    start and imports. The child gets this process's environment (on a CPU: synthmill's actor malloc
    settings, see :func:`under_cpu_actor_malloc`).
    """
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", PLAIN_IMPORTS], cwd=REPO, check=True)
    seconds = time.perf_counter() - t0
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import torch  # noqa: F401
    import webdataset  # noqa: F401
    from diffusers import DiffusionPipeline, StableDiffusionPipeline  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    return seconds


def run_timed(cmd: list[str], what: str, ray_address: str | None = None) -> float:
    """Wall seconds of ``cmd`` (run from the repository root; its output streamed to stderr); raises with its
    output tail if it fails.

    ``RAY_ADDRESS`` is dropped: ``synthmill run`` starts its own local Ray, on the machine (a) ran on;
    unless ``ray_address`` is given (``--ray-address``), which it then joins.
    """
    from benchmarks.child import run_streamed

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return run_streamed(cmd, what, cwd=REPO, env=env)[0]


def synthmill_command() -> list[str]:
    """The installed ``synthmill`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("synthmill")
    return [str(script)] if script.exists() else [sys.executable, "-m", "synthmill.cli"]


def tar_images(folder: str) -> dict[str, Any]:
    """{member name: decoded image} of every PNG in the tars of ``folder`` (read with ``tarfile``)."""
    import numpy as np
    from PIL import Image

    out = {}
    for tar_path in sorted(Path(folder).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".png"):
                    out[m.name] = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())))
    return out


def same_images(a: dict[str, Any], b: dict[str, Any]) -> int:
    """How many of ``a``'s images ``b`` has under the same name with identical pixels."""
    import numpy as np

    return sum(k in b and np.array_equal(v, b[k]) for k, v in a.items())


def compare_images(a: dict[str, Any], b: dict[str, Any], name: str) -> str:
    """One line: how many of ``a``'s images ``b`` has with identical pixels and, where some differ, by how
    much (the largest difference of one 8-bit value, and the share of values that differ, over those samples)."""
    import numpy as np

    same = same_images(a, b)
    line = f"identical images {name}: {same}/{len(a)}"
    pairs = [(v, b[k]) for k, v in a.items() if k in b and v.shape == b[k].shape and not np.array_equal(v, b[k])]
    if pairs:
        diffs = [np.abs(x.astype(np.int16) - y.astype(np.int16)) for x, y in pairs]
        values = sum(d.size for d in diffs)
        line += (f"; where they differ: max |difference| {max(int(d.max()) for d in diffs)} of 255, "
                 f"{sum(int(np.count_nonzero(d)) for d in diffs) / values:.2%} of values differ, "
                 f"mean |difference| {sum(float(d.sum()) for d in diffs) / values:.3f}")
    return line


# -- the benchmark ----------------------------------------------------------------------------------


def benchmark(cfg: Settings, work: str, import_s: float, ray_data: bool = True,
              ray_address: str | None = None) -> list[Timing]:
    """Run (a), (b), (c) and, with ``ray_data``, (d) in ``work``; print what was measured; return the rows.

    ``import_s`` is the time :func:`import_plain_stack` took at process start: the first (a) run
    (load, then every batch with no warm-up) plus it is the end-to-end time of the plain script.
    """
    import torch

    prompts = read_prompts(cfg.prompts)
    device, dtype = device_and_dtype()
    threads = torch.get_num_threads()
    actor_threads = generator_threads(cfg)
    spec_path = os.path.join(work, "spec.yaml")
    write_spec(cfg, spec_path, actor_threads)
    print(f"model {cfg.model}; {cfg.prompts} prompts, {cfg.size}x{cfg.size}, {cfg.steps} steps, "
          f"guidance {cfg.guidance_scale}, batch {cfg.batch_size}, {cfg.samples_per_shard} samples/shard; "
          f"device {device} ({str(dtype).replace('torch.', '')}), torch threads (a) {threads}, "
          f"cluster.cpus_per_actor {actor_threads or 'default'}; channels-last for all: {channels_last_of(cfg)}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    print(defaults_line(cfg, device, threads, actor_threads), flush=True)

    t0 = time.perf_counter()
    pipe = load_plain(cfg.model, channels_last_of(cfg))
    plain_load = time.perf_counter() - t0
    plain_generate(pipe, cfg, prompts, os.path.join(work, "a-cold"))
    plain_cold = import_s + time.perf_counter() - t0
    print(f"(a) end to end: a fresh interpreter's start and imports {import_s:.2f} s + load {plain_load:.2f} s "
          f"+ generation {plain_cold - import_s - plain_load:.2f} s", flush=True)

    gen = load_generator(spec_path, os.path.join(work, "b"))
    gen_threads = torch.get_num_threads()  # what ShardGenerator set; the count is process-wide
    plain_batch(pipe, cfg, prompts[:cfg.batch_size], cfg.seed)  # warm-ups, not counted
    gen.denoise(gen.samples(0)[:cfg.batch_size])
    plain_s, synthmill_s = [], []
    for r in range(cfg.repeats):  # interleaved, so drifts in machine speed hit both alike
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        plain_generate(pipe, cfg, prompts, os.path.join(work, "a"))
        plain_s.append(time.perf_counter() - t0)
        torch.set_num_threads(gen_threads)
        t0 = time.perf_counter()
        synthmill_generate(gen)
        synthmill_s.append(time.perf_counter() - t0)
        print(f"repeat {r + 1}/{cfg.repeats}: (a) {plain_s[-1]:.2f} s, (b) {synthmill_s[-1]:.2f} s", flush=True)
    print(f"(b) load {gen.load_s:.2f} s; {', '.join(f'{k} {v}' for k, v in gen.speed.items())}; "
          f"device idle fraction of its timed loops {1 - gen.busy_s / sum(synthmill_s):.3f}")
    plain_images = tar_images(os.path.join(work, "a"))
    print(compare_images(plain_images, tar_images(os.path.join(work, "b", "shards")), "(a) vs (b)"), flush=True)
    del pipe, gen
    defaults_s = []  # (a0): the plain loop as diffusers sets it up by default, where (a) was given channels-last
    if channels_last_of(cfg):
        torch.set_num_threads(threads)
        pipe = load_plain(cfg.model, False)
        plain_batch(pipe, cfg, prompts[:cfg.batch_size], cfg.seed)
        for _ in range(cfg.repeats):
            t0 = time.perf_counter()
            plain_generate(pipe, cfg, prompts, os.path.join(work, "a0"))
            defaults_s.append(time.perf_counter() - t0)
        print(f"(a0) plain loop without channels-last (diffusers' default): best {min(defaults_s):.2f} s", flush=True)
        del pipe
    if device == "cuda":
        torch.cuda.empty_cache()  # the synthmill run below needs the GPU memory

    cli_out = os.path.join(work, "c")
    cli = run_timed([*synthmill_command(), "run", spec_path, f"output.path={cli_out}", "cluster.num_actors=1"],
                    "synthmill run (c)", ray_address)
    with open(os.path.join(cli_out, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    print(f"(c) summary.json: {summary['images_per_s']:.3f} images/s over its own {summary['elapsed_s']:.1f} s "
          f"(inside run(): Ray start, actor load, generation, index); load average {os.getloadavg()[0]:.2f}",
          flush=True)
    up = summary["startup"]
    print(f"(c) start-up, seconds after run() began: Ray connected at {up['ray_connected_s']:.2f}, first actor ready "
          f"at {up['first_actor_ready_s']:.2f} (its imports {up['first_actor_imports_s']:.2f}, model load "
          f"{up['first_actor_model_load_s']:.2f}), first shard committed at {up['first_shard_committed_s']:.2f}",
          flush=True)
    for a in summary["actors"]:
        print(f"(c) actor {a['pid']} on {a['device']}: {a['samples']} samples in {a['active_s']:.1f} s active, "
              f"device idle fraction {a['device_idle_fraction']:.3f}", flush=True)

    n = len(prompts)
    steady = f"generation loop after warm-up (best of {cfg.repeats})"
    rows = [
        Timing("(a) plain diffusers loop", steady, n, min(plain_s)),
        Timing("(b) synthmill ShardGenerator.process_shard, in-process", steady, n, min(synthmill_s)),
        Timing("(a) plain diffusers loop", "end to end: process start, imports, load, generation (no warm-up)", n,
               plain_cold),
        Timing("(c) `synthmill run`, cluster.num_actors=1",
               "end to end: process start, Ray start, load, generation", n, cli),
    ]
    if defaults_s:  # last: render() finds the other rows by position
        rows.append(Timing("(a0) plain diffusers loop, diffusers' defaults (no channels-last)", steady, n,
                           min(defaults_s)))
    if not ray_data:
        return rows

    import ray

    # (c)'s actor reserves cluster.cpus_per_actor CPUs (the spec's default 1 when unset) and, on a CPU,
    # runs that many torch threads; (d)'s one actor gets the same.
    rd_threads = actor_threads or 1
    ray_start = start_ray(ray_address)
    try:
        rd = ray_data_generate(cfg, prompts, os.path.join(work, "d"), rd_threads, device == "cuda")
    finally:
        ray.shutdown()
    images, written = webdataset_images(os.path.join(work, "d"))
    n_tars = len(list(Path(work, "d").glob("*.tar")))
    print(f"(d) Ray start {ray_start:.2f} s (import ray.data, ray.init); dataset creation to write finished "
          f"{rd:.2f} s ({rd_threads} CPUs and torch threads for its actor); samples read back with webdataset "
          f"{written}/{n} ({len(images)} distinct keys) from {n_tars} tars; load average {os.getloadavg()[0]:.2f}",
          flush=True)
    print(compare_images(plain_images, images, "(a) vs (d)"), flush=True)
    name = "(d) Ray Data map_batches (1 actor) + write_webdataset"
    rows += [
        Timing(name, "end to end: dataset creation, actor start, load, generation, write (Ray running)",
               written, rd),
        Timing(name, "end to end: the above + Ray start (import ray.data, ray.init)", written, ray_start + rd),
    ]
    return rows


def defaults_line(cfg: Settings, device: str, threads: int, actor_threads: int | None) -> str:
    """One line: the settings every side shares, and where synthmill at its own defaults would differ from
    what (b) and (c) were given to match the plain loop (each such setting named, with its default)."""
    from synthmill.jobs.fields import ActorClusterSpec

    default_cpus = ActorClusterSpec().cpus_per_actor
    shared = (f"shared by (a)-(d): dtype {'float16' if device == 'cuda' else 'float32'}, channels-last "
              f"{channels_last_of(cfg)}, batch {cfg.batch_size}, "
              "one warm-up batch before (a)'s and (b)'s steady-state loops"
              + (", synthmill's CPU malloc settings" if device == "cpu" else "")
              + (f", {actor_threads} torch threads" if device == "cpu" else ""))
    differ = []
    if device == "cpu" and actor_threads != default_cpus:
        differ.append(f"cluster.cpus_per_actor {actor_threads} given to (b)/(c) to match (a)'s {threads} torch "
                      f"threads (synthmill's default {default_cpus})")
    if channels_last_of(cfg) != (device == "cuda"):
        differ.append(f"channels-last {channels_last_of(cfg)} (synthmill's default: {device == 'cuda'})")
    return shared + "; " + ("differs from synthmill's defaults: " + "; ".join(differ) if differ
                             else "synthmill's defaults otherwise")


def generator_threads(cfg: Settings) -> int | None:
    """cluster.cpus_per_actor for (b) and (c): on a CPU, by default the plain loop's torch threads (a fair
    comparison); on a GPU the spec default unless ``--cpus-per-actor`` is given."""
    import torch

    if torch.cuda.is_available():
        return cfg.cpus_per_actor
    return cfg.cpus_per_actor or torch.get_num_threads()


def peak_memory_gib() -> float | None:
    """Peak CUDA memory allocated since the last reset, in GiB (None on a CPU)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def sweep(cfg: Settings, work: str, batch_sizes: list[int]) -> list[dict[str, Any]]:
    """Steady state of (a) and (b) for each batch size (batch-size guidance): images/s, ratio, device idle
    fraction and peak device memory of (b). One plain pipeline serves every size; (b) loads per size."""
    import dataclasses

    import torch

    prompts = read_prompts(cfg.prompts)
    pipe = load_plain(cfg.model, channels_last_of(cfg))
    actor_threads = generator_threads(cfg)
    rows = []
    for bs in batch_sizes:
        c = dataclasses.replace(cfg, batch_size=bs, samples_per_shard=max(bs, cfg.samples_per_shard // bs * bs))
        spec_path = os.path.join(work, f"spec-bs{bs}.yaml")
        write_spec(c, spec_path, actor_threads)
        gen = load_generator(spec_path, os.path.join(work, f"b-bs{bs}"))
        plain_generate(pipe, c, prompts[:bs], os.path.join(work, f"warm-a-bs{bs}"))  # warm-ups: a batch and
        gen.process_shard(0)  # a whole shard (first-call costs of encoding, writing and committing out of the timing)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        plain_s, ours_s, busy0 = [], [], gen.busy_s
        for _ in range(c.repeats):
            t0 = time.perf_counter()
            plain_generate(pipe, c, prompts, os.path.join(work, f"a-bs{bs}"))
            plain_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            synthmill_generate(gen)
            ours_s.append(time.perf_counter() - t0)
        peak = peak_memory_gib()
        row = {"batch": bs, "plain": len(prompts) / min(plain_s), "synthmill": len(prompts) / min(ours_s),
               "idle": 1 - (gen.busy_s - busy0) / sum(ours_s), "peak_gib": peak}
        rows.append(row)
        print(f"batch {bs}: (a) {row['plain']:.3f} images/s, (b) {row['synthmill']:.3f} images/s, "
              f"(b) device idle {row['idle']:.3f}" + (f", peak {peak:.2f} GiB" if peak is not None else ""), flush=True)
        del gen
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def render_sweep(rows: list[dict[str, Any]]) -> str:
    lines = ["| batch | (a) plain images/s | (b) synthmill images/s | (b)/(a) | (b) device idle "
             "| peak GiB (b + plain pipeline) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        peak = "n/a (CPU)" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"| {r['batch']} | {r['plain']:.3f} | {r['synthmill']:.3f} | {r['synthmill'] / r['plain']:.3f} | "
                     f"{r['idle']:.3f} | {peak} |")
    best = max(rows, key=lambda r: r["synthmill"])
    lines += ["", f"fastest batch size for synthmill here: {best['batch']} ({best['synthmill']:.3f} images/s)"]
    return "\n".join(lines)


def render(rows: list[Timing]) -> str:
    """The markdown table and the ratio lines (the second only with (d)'s rows)."""
    lines = ["| variant | timed | images | seconds | images/s |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {t.variant} | {t.timed} | {t.images} | {t.seconds:.2f} | {t.images_per_s:.3f} |" for t in rows]
    defaults = [t for t in rows if t.variant.startswith("(a0)")]
    rows = [t for t in rows if not t.variant.startswith("(a0)")]
    steady = rows[1].images_per_s / rows[0].images_per_s
    e2e = rows[3].images_per_s / rows[2].images_per_s
    verdict = "met" if steady >= GOAL else "NOT met"
    lines.append("")
    lines.append(f"ratios: steady state (b)/(a) = {steady:.3f} (goal >= {GOAL}: {verdict}); "
                 f"end to end (c)/(a) = {e2e:.3f}")
    if defaults:
        lines.append(f"with the plain loop at diffusers' defaults (a0): steady state (b)/(a0) = "
                     f"{rows[1].images_per_s / defaults[0].images_per_s:.3f}")
    if len(rows) > 4:  # (d): rows[4] without its Ray start, rows[5] with it
        with_start, without = (rows[3].images_per_s / r.images_per_s if r.images else float("inf")
                               for r in (rows[5], rows[4]))
        lines.append(f"ratios vs Ray Data: end to end (c)/(d) = {with_start:.3f} ((d) with its Ray start; "
                     f"{without:.3f} without)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="diffusers pipeline folder (default: a tiny seeded SD pipeline built here)")
    p.add_argument("--arch", choices=FULL_SIZE_ARCHS,
                   help="instead of --model: a full-size pipeline with random weights (synthmill.testing.full_size), "
                        "built on the GPU when there is one")
    p.add_argument("--model-dir", help="with --arch: keep the built pipeline here and reuse it when present")
    p.add_argument("--compile", action="store_true", help="model.compile=true for (b) and (c)")
    p.add_argument("--channels-last", choices=("auto", "true", "false"), default="auto",
                   help="model.channels_last for (b) and (c) (auto: on for CUDA)")
    p.add_argument("--prompts", type=int, default=48, help="first N COCO captions (default 48)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    p.add_argument("--size", type=int, default=128, help="image height and width in pixels (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default 8)")
    p.add_argument("--batch-sweep", help="comma-separated batch sizes: steady state of (a) and (b) per size, "
                                         "with peak device memory, instead of the (a)-(d) comparison")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar (default 1000)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed loops of (a) and (b), best counts (default 3)")
    p.add_argument("--cpus-per-actor", type=int, default=None,
                   help="cluster.cpus_per_actor for (b) and (c), and (d)'s actor CPUs and torch threads "
                        "(default on CPU: the plain loop's torch threads)")
    p.add_argument("--no-ray-data", dest="ray_data", action="store_false", help="skip (d), the Ray Data variant")
    p.add_argument("--smoke", action="store_true", help="tiny fast run: 4 prompts, 32 px, 2 steps, batch 2")
    p.add_argument("--ray-address", help="(c) and (d) join this Ray cluster instead of starting a local one each "
                                         "(the test suite's smoke run; 'Ray start' is then a connection)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse flags and run; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.smoke:
        args.prompts, args.size, args.steps, args.batch_size = 4, 32, 2, 2
        args.samples_per_shard, args.repeats = 2, 1
    for name in ("prompts", "steps", "size", "batch_size", "samples_per_shard", "repeats", "cpus_per_actor"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.size % 8:
        raise SystemExit(f"--size must be a multiple of 8, got {args.size}")
    if args.arch and args.model:
        raise SystemExit("give --model or --arch, not both")
    try:
        sizes = [int(x) for x in args.batch_sweep.split(",")] if args.batch_sweep else []
    except ValueError:
        raise SystemExit(f"--batch-sweep must be comma-separated integers, got {args.batch_sweep!r}") from None
    if any(b < 1 for b in sizes):
        raise SystemExit("--batch-sweep sizes must be >= 1")
    code = under_cpu_actor_malloc(argv if argv is not None else sys.argv[1:])
    if code is not None:
        return code
    import_s = import_plain_stack()
    with tempfile.TemporaryDirectory(prefix="synthmill-bench-") as work:
        model = args.model
        if args.arch:
            model = full_size_model(args.arch, args.model_dir or os.path.join(work, args.arch))
        elif model is None:
            from synthmill.testing.tiny import save_tiny_pipeline

            model = save_tiny_pipeline(os.path.join(work, "tiny-sd"), "sd")
        model = os.path.abspath(model) if os.path.exists(model) else model
        options: dict[str, Any] = {"compile": True} if args.compile else {}
        if args.channels_last != "auto":
            options["channels_last"] = args.channels_last == "true"
        cfg = Settings(model, args.prompts, args.steps, args.size, args.batch_size, args.samples_per_shard,
                       args.guidance_scale, args.seed, args.repeats, args.cpus_per_actor, tuple(options.items()))
        if args.batch_sweep:
            table = render_sweep(sweep(cfg, work, sizes))
        else:
            table = render(benchmark(cfg, work, import_s, args.ray_data, args.ray_address))
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
