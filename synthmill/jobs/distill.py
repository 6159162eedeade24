"""Running a distill job: validate -> Ray Train TorchTrainer (resumes from OUTPUT/checkpoints) -> export.

The runner serves every training kind: ``kind: finetune`` (jobs/finetune.py) prepares through
:func:`prepare_training` and runs through :class:`DistillJob`; what is trained, on which loss, and what is
exported is the spec's objective (distill/objectives.py).

``prepare`` checks every input without loading weights: the teacher folder and its UNet / VAE configs,
the student layout against the teacher (on the meta device, so it also gives parameter counts), the
data shards (found, complete, the first sample an image with a caption), the resolution against the
VAE and UNet downsampling, the output folder and the steps already trained there.

``run`` starts (or resumes: Ray Train finds the checkpoints under ``OUTPUT/checkpoints/``) the
training, then writes ``OUTPUT/pipeline/``: the teacher pipeline with the student UNet (its EMA weights
when ``train.ema``), ``model_index.json`` last, and ``OUTPUT/summary.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from synthmill.cluster.connect import starts_local_ray
from synthmill.errors import JobFailed, SpecError
from synthmill.jobs import lifecycle
from synthmill.jobs.distill_spec import INIT_KEYWORDS, DistillSpec
from synthmill.jobs.outputs import VALIDATE_RETRY_S, check_output_folder, set_plan_check, versions
from synthmill.jobs.spec import node_paths
from synthmill.models.loading import check_model_path, is_hub_id
from synthmill.sharding import storage
from synthmill.sharding.images import ImageSet, ImageSetError, check_first_sample, open_image_set
from synthmill.sharding.layout import CHECKPOINTS, PIPELINE, SUMMARY, TRAIN_LOG, OutputLayout

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    spec: Any  # DistillSpec, or another training kind's spec (jobs/finetune.py)
    data: ImageSet
    models: dict[str, Any]  # what plan.json and summary.json say of the models (names, parameter counts)
    steps_done: int
    fingerprint: str
    model_field: str = "teacher"  # the spec section naming the pipeline that is loaded
    worker_spec: Any = None  # the spec the workers get, when it differs from ``spec`` (a resolved student.init)
    node_fields: tuple[str, ...] = ()  # more local-path fields every worker's node must see

    @property
    def teacher_params(self) -> int:
        return self.models["teacher_params"]

    @property
    def student_params(self) -> int:
        return self.models["student_params"]

    @property
    def layout(self) -> OutputLayout:
        return OutputLayout(self.spec.output.path, self.spec.storage)


def _component_config(spec: Any, name: str, section: str = "teacher") -> dict[str, Any]:
    """SECTION.path/NAME/config.json (``teacher.path`` of a distill job), read without loading weights (hub ids
    through the hub cache)."""
    model = getattr(spec, section)
    path = model.path
    if is_hub_id(path):
        from diffusers import ConfigMixin

        try:
            return dict(ConfigMixin.load_config(path, subfolder=name, revision=model.revision))
        except Exception as e:
            raise SpecError(f"{section}.path {path}: cannot read {name}/config.json "
                            f"({type(e).__name__}: {e})") from None
    url = storage.join(path, name, "config.json")
    try:
        cfg = storage.read_json(url, spec.storage)
    except ValueError as e:  # not JSON, or not UTF-8
        raise SpecError(f"{section}.path {path}: {name}/config.json is not valid JSON ({e})") from None
    except (IsADirectoryError, PermissionError) as e:
        raise SpecError(f"{section}.path {path}: cannot read {name}/config.json ({e.strerror})") from None
    if cfg is None:
        what = "a distill teacher" if section == "teacher" else f"a {spec.kind} model"
        raise SpecError(f"{section}.path {path}: has no {name}/config.json; {what} is a text-to-image "
                        "pipeline with a UNet and a VAE")
    if not isinstance(cfg, dict):
        raise SpecError(f"{section}.path {path}: {name}/config.json holds a JSON {type(cfg).__name__}, not an "
                        "object of settings")
    return cfg


def meta_unet(spec: Any, unet_cfg: dict[str, Any], section: str = "teacher", where: str | None = None) -> Any:
    """The UNet of ``unet_cfg`` on the meta device (its layout and parameter count, no memory); a config that
    builds none is a SpecError naming ``where`` (default: SECTION.path's unet/config.json)."""
    import diffusers
    import torch
    from diffusers import UNet2DConditionModel

    diffusers.utils.logging.set_verbosity_error()  # a meta-device .to(dtype) warns about nothing
    cfg = {k: v for k, v in unet_cfg.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(cfg)
    except Exception as e:
        where = where or f"{section}.path {getattr(spec, section).path}: unet/config.json"
        raise SpecError(f"{where} does not build a UNet2DConditionModel ({type(e).__name__}: {e})") from None


def _plan_student(spec: DistillSpec, unet_cfg: dict[str, Any]) -> tuple[int, int, int, str | None]:
    """(teacher params, student params, number of down blocks of the student, the UNet folder ``student.init``
    names or None) from configs on the meta device."""
    from synthmill.distill.objectives import objective
    from synthmill.models.students import count_parameters, first_mismatch

    teacher = meta_unet(spec, unet_cfg)
    try:
        student = objective(spec.objective()).plan_student(spec, teacher)
    except ValueError as e:
        raise SpecError(f"field 'student.arch': {e}") from None
    init = init_folder(spec)
    if init is not None:
        other = meta_unet(spec, storage.read_json(storage.join(init, "config.json"), spec.storage),
                          where=f"field 'student.init': {storage.redact_url(init)}/config.json")
        mismatch = first_mismatch(student, other)
        if mismatch:
            raise SpecError(f"field 'student.init': the UNet at {storage.redact_url(init)} does not fit the "
                            f"{spec.student.arch} layout of this teacher: {mismatch}")
    return count_parameters(teacher), count_parameters(student), len(student.down_blocks), init


#: The weight files a diffusers UNet folder may hold (one of them).
UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")


def init_folder(spec: DistillSpec) -> str | None:
    """The UNet folder ``student.init`` names, or None for ``teacher`` / ``random``. A previous distill or
    finetune output gives its exported ``pipeline/unet``, or (not exported yet) its latest checkpoint's
    ``student``; a pipeline folder its ``unet``; else the folder itself. SpecError when none holds a UNet."""
    init = spec.student.init
    if init in INIT_KEYWORDS:
        return None
    opts = spec.storage
    candidates = [storage.join(init, PIPELINE, "unet")]
    step = latest_step(init, opts)
    if step:
        from synthmill.distill.train import checkpoint_name

        candidates.append(OutputLayout(init, opts).file(CHECKPOINTS, checkpoint_name(step), "student"))
    candidates += [init, storage.join(init, "unet")]
    for folder in candidates:
        cfg = storage.read_json(storage.join(folder, "config.json"), opts)
        if cfg is None:
            continue
        if not isinstance(cfg, dict) or cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
            raise SpecError(f"field 'student.init': {storage.redact_url(folder)}/config.json is not the config of a "
                            "UNet2DConditionModel")
        if not set(UNET_WEIGHTS) & set(storage.list_sizes(folder, opts)):
            raise SpecError(f"field 'student.init': {storage.redact_url(folder)} has a UNet config but no weights "
                            f"({' or '.join(UNET_WEIGHTS)})")
        return folder
    raise SpecError(f"field 'student.init': {storage.redact_url(init)} is neither teacher, random, a diffusers UNet "
                    "folder, a pipeline folder with a unet/, nor a distill or finetune output (with a pipeline/ or a "
                    "checkpoint of a whole UNet)")


def _check_resolution(spec: Any, vae_cfg: dict[str, Any], unet_cfg: dict[str, Any], student_down: int,
                      section: str = "teacher") -> None:
    channels = vae_cfg.get("block_out_channels", [0, 0, 0, 0])
    if not isinstance(channels, list) or not channels:
        raise SpecError(f"{section}.path {getattr(spec, section).path}: vae/config.json gives block_out_channels "
                        f"{channels!r}, not a list of channel counts")
    vae_factor = 2 ** (len(channels) - 1)
    res = spec.data.resolution
    if res % vae_factor:
        raise SpecError(f"field 'data.resolution': {res} is not a multiple of the VAE's downsampling factor "
                        f"{vae_factor}")
    latent = res // vae_factor
    need = 2 ** (max(len(unet_cfg.get("down_block_types", [])), student_down) - 1)
    if latent % need:
        raise SpecError(f"field 'data.resolution': {res} gives {latent}x{latent} latents, which the UNet's "
                        f"{need}x downsampling cannot halve evenly; use a multiple of {vae_factor * need}")


def latest_step(output: str, storage_options: dict[str, Any] | None = None) -> int:
    """The step of the checkpoint Ray Train resumes from: the latest one its snapshot under
    ``OUTPUT/checkpoints/`` records (a checkpoint folder a crash left half-copied is not in it). 0 if none."""
    snapshot = storage.read_json(
        OutputLayout(output, storage_options).file(CHECKPOINTS, "checkpoint_manager_snapshot.json"), storage_options)
    latest = (snapshot or {}).get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("step", 0))


def steps_done(spec: DistillSpec) -> int:
    return latest_step(spec.output.path, spec.storage)


def prepare(spec: DistillSpec) -> Prepared:
    """Check every input without loading a model's weights or writing anything."""

    init: list[str | None] = []

    def models(unet_cfg: dict[str, Any]) -> tuple[dict[str, Any], int]:
        teacher_params, student_params, student_down, folder = _plan_student(spec, unet_cfg)
        init.append(folder)
        described = {"teacher": storage.redact_url(spec.teacher.path), "student": spec.student.arch,
                     "teacher_params": teacher_params, "student_params": student_params}
        if folder is not None:
            described["student_init"] = storage.redact_url(folder)
        return described, student_down

    p = prepare_training(spec, "teacher", models)
    if init[0] is not None:  # the workers take the UNet folder found here (the node check sees it too)
        p.worker_spec = dataclasses.replace(spec, student=dataclasses.replace(spec.student, init=init[0]))
        p.node_fields += ("student.init",)
    return p


def prepare_training(spec: Any, section: str, models: Any) -> Prepared:
    """The checks every training kind shares, without loading weights or writing anything: the pipeline of
    ``spec.<section>`` (its folder, UNet and VAE configs), ``models(unet_config) -> (plan fields, down blocks
    of the trained UNet)``, the resolution, the data, the output folder and the steps already trained."""
    field = f"{section}.path"
    model = getattr(spec, section)
    try:
        with storage.retry_budget(VALIDATE_RETRY_S):
            # the workers never load the pipeline's safety checker: its folder may be missing
            check_model_path(dataclasses.replace(model, safety_checker=False), spec.storage, field=section,
                             only_here=starts_local_ray(spec.cluster.address))
            unet_cfg = _component_config(spec, "unet", section)
            vae_cfg = _component_config(spec, "vae", section)
            described, down = models(unet_cfg)
            _check_resolution(spec, vae_cfg, unet_cfg, down, section)
            field = "data.path"
            try:
                data = open_image_set(spec.data.path, spec.storage, spec.data.samples_per_unit,
                                      set_plan_check(field, spec.storage))
                check_first_sample(data, spec.storage, f"{spec.kind} trains on image-text pairs",
                                   spec.data.max_image_pixels, "data.max_image_pixels")
            except ImageSetError as e:
                raise SpecError(f"data.path {e}") from None
            workers = spec.cluster.num_workers
            readers = (workers if isinstance(workers, int) else 1) * max(1, spec.data.loader_workers)
            n = data.num_samples
            if n is not None and n < readers:
                raise SpecError(f"data.path {spec.data.path}: {n} samples cannot feed {readers} readers "
                                f"(cluster.num_workers x data.loader_workers); use fewer, or more data")
            field = "output.path"
            check_output_folder(spec.output.path, spec.fingerprint(), spec.storage, spec.kind)
            done = steps_done(spec)
    except storage.StorageError as e:
        raise SpecError(f"{field}: {e}") from None
    if done > spec.train.max_steps:
        raise SpecError(f"field 'train.max_steps': {spec.train.max_steps} is below step {done}, already trained at "
                        f"{spec.output.path}; raise it to train further, or use a new output.path")
    return Prepared(spec, data, described, done, spec.fingerprint(), section)


def plan_summary(p: Prepared) -> dict[str, Any]:
    s, t = p.spec, p.spec.train
    return {
        **p.models,
        "data": storage.redact_url(s.data.path),
        "data_kind": p.data.kind,
        "data_units": len(p.data.units),
        "data_samples": p.data.num_samples,
        "resolution": s.data.resolution,
        "batch_per_worker": t.batch_size * t.gradient_accumulation,
        "max_steps": t.max_steps,
        "steps_done": p.steps_done,
        "output": storage.redact_url(s.output.path),
        "fingerprint": p.fingerprint,
    }


def _scaling(spec: DistillSpec, resources: dict[str, float]) -> tuple[int, bool]:
    c = spec.cluster
    gpus = int(resources.get("GPU", 0))
    use_gpu = gpus > 0 if c.use_gpu == "auto" else bool(c.use_gpu)
    if use_gpu and gpus == 0:
        raise SpecError("field 'cluster.use_gpu': true, but the Ray cluster has no GPUs; set it to auto or false")
    n = c.num_workers if isinstance(c.num_workers, int) else (gpus if use_gpu else 1)
    return n, use_gpu


def _storage_for_ray(spec: DistillSpec) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: a local folder, or fsspec through pyarrow."""
    layout = OutputLayout(spec.output.path, spec.storage)
    out = layout.url
    if layout.is_local:
        return layout.local_path(), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, inner = storage.filesystem(out, spec.storage)
    return inner.rstrip("/"), PyFileSystem(FSSpecHandler(fs))


def _trainer(p: Prepared, n_workers: int, use_gpu: bool):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from synthmill.cluster.connect import cpu_runtime_env
    from synthmill.distill.train import train_loop

    spec = p.spec
    storage_path, filesystem = _storage_for_ray(spec)
    per_worker = {"CPU": spec.cluster.cpus_per_worker, **spec.cluster.resources}
    return TorchTrainer(
        train_loop,
        train_loop_config={"spec": p.worker_spec or spec, "objective": spec.objective(), "units": p.data.units,
                           "fingerprint": p.fingerprint,
                           "node_paths": node_paths(p.worker_spec or spec, (f"{p.model_field}.path", "data.path",
                                                                             "output.path") + p.node_fields)},
        scaling_config=ScalingConfig(num_workers=n_workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=CHECKPOINTS, storage_path=storage_path, storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.checkpoints_kept),
            # work() retries (bad data must not be retried); a worker group that cannot be placed within
            # cluster.start_timeout_s ends the fit instead of being retried by Ray Train without a limit
            failure_config=FailureConfig(max_failures=0, controller_failure_limit=0),
            worker_runtime_env={} if use_gpu else cpu_runtime_env(),
        ),
    )


#: Ray Train's bound on placing a worker group (the driver passes it to its controller); cluster.start_timeout_s.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def _not_placed(exc: BaseException) -> bool:
    """Whether a training failure is Ray Train giving up on placing the worker group (its start timed out)."""
    cause = getattr(exc, "controller_failure", None)
    return type(cause).__name__ == "WorkerGroupStartupTimeoutError" or "worker group startup timed out" in str(exc)


def _fit(trainer: Any, start_timeout_s: float) -> Any:
    """``trainer.fit()`` with the worker group's placement bounded by ``start_timeout_s`` (Ray Train reads the
    bound from the environment when the fit starts its controller; the driver's environment is left as it was)."""
    saved = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = f"{start_timeout_s:g}"
    try:
        return trainer.fit()
    finally:
        if saved is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = saved


def _failure_message(exc: BaseException) -> str:
    from synthmill.distill.train import BAD_DATA

    text = str(exc)
    if BAD_DATA in text:
        line = text[text.index(BAD_DATA) + len(BAD_DATA):].splitlines()[0]
        raise SpecError(line) from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^\w*(Error|Exception)\b", ln.strip())]
    return (errors[-1] if errors else (lines[-1] if lines else type(exc).__name__)).strip()


def export_pipeline(spec: Any, checkpoint_dir: str) -> str:
    """Write what the spec's objective exports from a checkpoint (distill/objectives.py): ``OUTPUT/pipeline/``
    (the pipeline with the trained UNet, its EMA weights when trained with EMA; ``model_index.json`` last)
    and any file beside it (a LoRA's ``pytorch_lora_weights.safetensors``). Returns the pipeline's URL."""
    from synthmill.distill.objectives import objective

    layout = OutputLayout(spec.output.path, spec.storage)
    export = objective(spec.objective()).export
    if layout.is_local:
        out = layout.local_path(PIPELINE)
        # staged in the output folder (one rename each), under a name the lifecycle removes if a run dies here
        staged = tempfile.mkdtemp(prefix=".pipeline.tmp-", dir=layout.local_path())
        try:
            export(spec, checkpoint_dir, staged)
            for name in sorted(os.listdir(staged)):
                if name != PIPELINE:  # files beside the pipeline come first: the pipeline is never newer
                    os.replace(os.path.join(staged, name), layout.local_path(name))
            built = os.path.join(staged, PIPELINE)
            os.chmod(built, 0o777 & ~storage.umask())  # the pipeline is for others to load
            shutil.rmtree(out, ignore_errors=True)
            os.replace(built, out)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return out
    out = layout.file(PIPELINE)
    with tempfile.TemporaryDirectory(prefix="synthmill-export-") as staged:
        export(spec, checkpoint_dir, staged)
        for name in sorted(os.listdir(staged)):
            if name != PIPELINE:
                storage.put_file(os.path.join(staged, name), layout.file(name), spec.storage)
        built = os.path.join(staged, PIPELINE)
        storage.remove(storage.join(out, "model_index.json"), spec.storage)
        files = sorted(os.path.relpath(os.path.join(r, f), built) for r, _, fs in os.walk(built) for f in fs)
        # the index last: it makes the folder a pipeline
        for rel in sorted(files, key=lambda f: f == "model_index.json"):
            storage.put_file(os.path.join(built, rel), storage.join(out, *rel.split(os.sep)), spec.storage)
    return out


def _summary(p: Prepared, scaling: tuple[int, bool] | None, t0: float, t_train: float, checkpoint: str,
             pipeline: str, started: datetime) -> dict[str, Any]:
    import json

    spec, t = p.spec, p.spec.train
    steps_run = t.max_steps - p.steps_done if scaling else 0
    n_workers, use_gpu = scaling or (0, False)
    data = storage.read_bytes(p.layout.file(TRAIN_LOG), spec.storage)
    lines = [json.loads(ln) for ln in data.decode().splitlines() if ln.strip()]
    # steady state: the logged windows of this run after its first (which includes start-up)
    rates = [r["samples_per_s"] for r in lines if r["step"] > p.steps_done + t.log_every and r.get("samples_per_s")]
    return {
        "status": "complete",
        "kind": spec.kind,
        "fingerprint": p.fingerprint,
        **p.models,
        "steps": t.max_steps,
        "steps_resumed": p.steps_done if scaling else t.max_steps,
        "steps_run": steps_run,
        "workers": n_workers,
        "device": "GPU" if use_gpu else "CPU",
        "global_batch": t.batch_size * t.gradient_accumulation * n_workers,
        "samples_run": steps_run * t.batch_size * t.gradient_accumulation * n_workers,
        "final_loss": lines[-1]["loss"] if lines else None,
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "train_s": round(t_train - t0, 3),
        "samples_per_s": round(sum(rates) / len(rates), 4) if rates else None,
        "checkpoint": checkpoint,
        "pipeline": pipeline,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(("synthmill", "torch", "diffusers", "transformers", "ray")),
    }


def ok_line(spec_path: str, plan: dict[str, Any]) -> str:
    samples = plan["data_samples"] if plan["data_samples"] is not None else "?"
    start = f" from {plan['student_init']}" if plan.get("student_init") else ""
    return (f"ok: {spec_path}: {plan['teacher']} ({plan['teacher_params'] / 1e6:.1f}M) -> {plan['student']} "
            f"({plan['student_params'] / 1e6:.1f}M){start} on {samples} samples in {plan['data_units']} units at "
            f"{plan['resolution']}px; step {plan['steps_done']} of {plan['max_steps']}")


def done_line(summary: dict[str, Any], output: str) -> str:
    loss = f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "n/a"
    rate = f"{summary['samples_per_s']:.2f} samples/s" if summary["samples_per_s"] else "no steady-state rate"
    return (f"done: {summary['student']} ({summary['student_params'] / 1e6:.1f}M params) at step {summary['steps']} "
            f"({summary['steps_run']} steps run, {summary['steps_resumed']} resumed; {rate} "
            f"on {summary['workers']} {summary['device']} workers; loss {loss}) -> {summary['pipeline']}")


class DistillJob(lifecycle.Job):
    """Train to ``train.max_steps`` (resuming from the latest checkpoint), export the pipeline, summarise.

    With every step trained already (a run that died after training, or a complete one), nothing is
    connected: a complete run's summary is kept, else the pipeline is exported from the last checkpoint."""

    dashboard = True  # Ray Train: see cluster.connect.connect

    def __init__(self, p: Prepared):
        self.p, self.spec, self.layout = p, p.spec, p.layout
        self.started = datetime.now(timezone.utc)
        self.t0 = time.perf_counter()
        self.scaling: tuple[int, bool] | None = None
        self.result: Any = None
        self.attempts = 0

    def kept(self) -> dict[str, Any] | None:
        t = self.spec.train
        if self.p.steps_done < t.max_steps:
            return None
        summary = self.layout.read_json(SUMMARY)
        if (isinstance(summary, dict) and summary.get("steps") == t.max_steps
                and summary.get("fingerprint") == self.p.fingerprint):
            log.info("%s is trained to step %d already; nothing to do", self.layout.url, t.max_steps)
            return dict(summary, steps_run=0, steps_resumed=t.max_steps, samples_per_s=None)
        return None

    def pending(self) -> bool:
        return self.p.steps_done < self.spec.train.max_steps

    def placed(self, resources: dict[str, float]) -> None:
        from synthmill.cluster.connect import check_fits, started_local_ray

        spec, c = self.spec, self.spec.cluster
        n_workers, use_gpu = self.scaling = _scaling(spec, resources)
        check_fits("training worker", {"CPU": c.cpus_per_worker, "GPU": int(use_gpu), **c.resources},
                   "cluster.cpus_per_worker" + (" / cluster.resources" if c.resources else ""),
                   f"the job waits up to cluster.start_timeout_s={c.start_timeout_s:g}s", n_workers,
                   "cluster.num_workers" if isinstance(c.num_workers, int)
                   else "cluster.num_workers=auto (a worker per GPU)")
        if started_local_ray():
            # One machine has no node to lose to preemption; Ray Train's watcher for it (an actor process per
            # attempt) also logs an error-level line as it starts. The user's own setting wins.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray Train's controller learns that its workers finished (or died) at its next poll of them, every 2 s by
        # default; every 0.5 s ended a short run ~2.8 s sooner here (benchmarks/RESULTS.md). Yours wins.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

    def plan(self) -> dict[str, Any]:
        return {"kind": self.spec.kind, **plan_summary(self.p)}

    def work(self, resources: dict[str, float]) -> dict[str, str]:
        from ray.train import TrainingFailedError

        spec, out = self.spec, self.layout.url
        n_workers, use_gpu = self.scaling
        log.info("%s %s: %d workers (%s), steps %d..%d", spec.kind, storage.redact_url(spec.output.path), n_workers,
                 "GPU" if use_gpu else "CPU", self.p.steps_done, spec.train.max_steps)
        # Retries are the driver's, not Ray Train's (its FailureConfig retries every error): bad data fails at
        # once with exit 2, anything else restarts the worker group from the latest checkpoint.
        while True:
            self.attempts += 1
            try:
                result = _fit(_trainer(self.p, n_workers, use_gpu), spec.cluster.start_timeout_s)
                error = result.error
            except TrainingFailedError as e:
                error = e
            if error is None:
                break
            if _not_placed(error):  # as generate and evaluate: no retry, which would wait as long again
                c = spec.cluster
                need = ", ".join(f"{k} {v:g}" for k, v in
                                 {"CPU": c.cpus_per_worker, "GPU": int(use_gpu), **c.resources}.items() if v)
                raise JobFailed(
                    f"{n_workers} training worker{'s' if n_workers > 1 else ''} ({need} each, all at once) could not "
                    f"be placed within cluster.start_timeout_s={c.start_timeout_s:g}s (not enough free resources in "
                    f"the cluster, or a lost node not replaced); checkpoints are kept under {out}/{CHECKPOINTS}: run "
                    "the same command again to resume from the latest once the cluster can hold them")
            message = _failure_message(error)  # raises SpecError for bad data
            if self.attempts > spec.cluster.max_failures:
                raise JobFailed(f"training failed ({self.attempts} attempts): {message}. Checkpoints are kept under "
                                f"{out}/{CHECKPOINTS}; run the same command again to resume from the latest")
            log.warning("training failed (attempt %d of %d): %s; restarting from the latest checkpoint",
                        self.attempts, spec.cluster.max_failures + 1, message)
        if result.checkpoint is None:
            raise JobFailed(f"training ended without a checkpoint under {out}/{CHECKPOINTS}")
        self.result = result
        return {}

    def finish(self) -> dict[str, Any]:
        if self.result is None:  # trained before this run: export from the last checkpoint
            from ray.train import Checkpoint

            from synthmill.distill.train import checkpoint_name

            storage_path, filesystem = _storage_for_ray(self.spec)
            name = checkpoint_name(self.p.steps_done)
            t0 = time.perf_counter()
            with Checkpoint(f"{storage_path}/{CHECKPOINTS}/{name}", filesystem).as_directory() as folder:
                pipeline = export_pipeline(self.spec, folder)
            return _summary(self.p, None, t0, t0, name, pipeline, datetime.now(timezone.utc))
        t_train = time.perf_counter()
        with self.result.checkpoint.as_directory() as ckpt:
            pipeline = export_pipeline(self.spec, ckpt)
        summary = _summary(self.p, self.scaling, self.t0, t_train,
                           os.path.basename(self.result.checkpoint.path.rstrip("/")), pipeline, self.started)
        summary["attempts"] = self.attempts
        # the parameters of the UNets a worker held (distill/train.py): the trained one, and a teacher if any
        summary["worker_unet_params"] = (self.result.metrics or {}).get("unet_params")
        return summary


def run(p: Prepared) -> dict[str, Any]:
    """Train to ``train.max_steps`` (resuming), export the pipeline, write the summary."""
    return lifecycle.run(DistillJob(p))


# ---- synthmill status ----

#: plan.json keys that status reads, and their types
PLAN_KEYS: dict[str, type] = {"max_steps": int, "fingerprint": str}


def check_plan(plan: dict[str, Any]) -> str | None:
    """What is wrong with a plan.json of this kind beyond its keys' types, or None."""
    if plan["max_steps"] < 1:
        return f"its 'max_steps' is {plan['max_steps']}, not a positive whole number"
    return None


def status(layout: OutputLayout, plan: dict[str, Any]) -> dict[str, Any]:
    """The state of a distill output: the step of the latest checkpoint, the last metrics line, the summary."""
    import json

    summary = layout.read_json(SUMMARY)
    summary = summary if isinstance(summary, dict) else None
    try:
        text = storage.read_bytes(layout.file(TRAIN_LOG), layout.opts).decode(errors="replace")
    except FileNotFoundError:
        text = ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    try:
        last = json.loads(lines[-1]) if lines else None
    except ValueError:  # a line cut off by a crash mid-write (the job rewrites the file from its checkpoint)
        last = None
    if "teacher" in plan:
        model = f"{plan.get('teacher')} -> {plan.get('student')}"
    else:
        rank = plan.get("lora_rank")
        model = f"{plan.get('model')}" + (f" (LoRA rank {rank})" if rank else "")
    return {
        "output": layout.url, "kind": plan.get("kind", "distill"),
        "complete": bool(summary and summary.get("status") == "complete"),
        "student": plan.get("student"), "teacher": plan.get("teacher"), "model": model,
        "checkpoint_step": latest_step(layout.url, layout.opts), "max_steps": plan.get("max_steps"),
        "last_logged": last if isinstance(last, dict) else None,
        "pipeline": summary.get("pipeline") if summary else None,
    }


#: How ``synthmill status`` names a logged loss term; others by their key less ``loss_``.
TERM_LABELS = {"loss_task": "task", "loss_output_kd": "output KD", "loss_feature_kd": "feature KD"}


def render_status(st: dict[str, Any]) -> str:
    lines = [f"output     {st['output']}", f"state      {'complete' if st['complete'] else 'incomplete'}",
             f"model      {st['model']}",
             f"checkpoint step {st['checkpoint_step']} of {st['max_steps']}"]
    last = st["last_logged"]
    if last:
        keys = [k for k in TERM_LABELS if k in last] + sorted(k for k in last if k.startswith("loss_")
                                                                and k not in TERM_LABELS)
        terms = ", ".join(f"{TERM_LABELS.get(k, k[len('loss_'):])} {last[k]:.4g}" for k in keys
                          if isinstance(last[k], (int, float)))
        lines.append(f"logged     step {last['step']}: loss {last['loss']:.5g}" + (f" ({terms})" if terms else "")
                     + f", {last.get('samples_per_s')} samples/s")
    if st["pipeline"]:
        lines.append(f"pipeline   {st['pipeline']}")
    return "\n".join(lines)
