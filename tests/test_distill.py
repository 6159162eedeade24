"""Distill jobs end to end on the session's Ray: Ray Train workers (gloo on CPU), tiny teachers built in code.

The teacher has the full SD 1.x block structure at tiny widths (testing/tiny.py, ``unet_layout="full"``),
saved with ``save_pretrained`` and loaded back by ``from_pretrained``; the data are the suite's reference
generate job (22 image-caption samples in 5 WebDataset shards). One run is killed with SIGKILL after its
first checkpoint and run again; a second run trains the same steps without stopping; their weights must be
equal bit for bit; that second run is ``synthmill run`` with no cluster address, on a local Ray of its own,
as a user types it. The SDXL path (tiny SDXL teacher -> SSD-1B layout) runs in tests/test_s3.py, where one
job covers it and S3 storage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from synthmill.cli import main
from tests.conftest import initial_malloc_env, write_image_folder

pytestmark = pytest.mark.usefixtures("ray_address")


@pytest.fixture(scope="session")
def sd_teacher(tmp_path_factory) -> str:
    from synthmill.testing.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("teacher") / "sd", "sd", seed=3, unet_layout="full")


def distill_spec(teacher: str, data: str, output: str, arch: str = "bk-small", **train) -> dict:
    t = {"max_steps": 6, "batch_size": 2, "gradient_accumulation": 2, "learning_rate": 1.0e-3,
         "checkpoint_every": 2, "log_every": 1, "ema": True, "ema_decay": 0.9, "gradient_checkpointing": True}
    t.update(train)
    return {
        "kind": "distill",
        "teacher": {"path": teacher},
        "student": {"arch": arch},
        "data": {"path": data, "resolution": 32, "loader_workers": 1, "shuffle_buffer": 8},
        "loss": {"task": 1.0, "output_kd": 1.0, "feature_kd": 1.0},
        "train": t,
        "cluster": {"num_workers": 2},
        "output": {"path": output},
    }


def run_distill(write_spec, spec: dict, *overrides: str) -> dict:
    from synthmill.jobs import distill
    from synthmill.jobs.spec import load_spec

    return distill.run(distill.prepare(load_spec(write_spec(spec), overrides)))


def metrics_lines(output: str) -> list[dict]:
    with open(os.path.join(output, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def unet_weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def _fixed_loss(teacher: str, unet, data: str, weights) -> float:
    """The distill loss of ``unet`` on the first 8 samples with fixed noise and timesteps."""
    from diffusers import DDPMScheduler

    from synthmill.distill.data import ShardStream, StreamSpec
    from synthmill.distill.train import encode_text, load_teacher, tokenizers
    from synthmill.jobs.generate_spec import ModelSpec
    from synthmill.models.kd import DistillLoss
    from synthmill.sharding.images import open_image_set

    pipe = load_teacher(ModelSpec(path=teacher), None)
    units = open_image_set(data).units
    stream = ShardStream(StreamSpec(units, 32, True, False, 0, 8, 0), tokenizers(pipe), 0, 1)
    items = [s for _, s in zip(range(8), stream.iter_as(0, 1), strict=False)]
    batch = {k: torch.stack([s[k] for s in items]) for k in items[0]}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = (pipe.vae.encode(batch["pixel_values"]).latent_dist.sample(generator=g)
                   * pipe.vae.config.scaling_factor)
        cond = encode_text(pipe, batch, torch.device("cpu"))
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
        noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, t)
        total, _ = DistillLoss(unet.eval(), pipe.unet.requires_grad_(False), weights)(noisy, t, cond, noise)
    return float(total)


# ---------------------------------------------------------------------------------------------------------
# kill -> rerun resumes exactly; the loss goes down; the pipeline loads and generates


@pytest.fixture(scope="session")
def distilled(ray_address, sd_teacher, reference, tmp_path_factory):
    """(spec, killed-and-resumed output, uninterrupted output, killed run's stderr) for bk-small, 2 workers."""
    from synthmill.jobs import distill
    from synthmill.jobs.spec import load_spec

    _, data = reference
    folder = tmp_path_factory.mktemp("distill")
    resumed, straight = str(folder / "resumed"), str(folder / "straight")
    spec = distill_spec(sd_teacher, data, resumed)
    spec_path = folder / "distill.yaml"
    import yaml

    spec_path.write_text(yaml.safe_dump(spec))
    # 3) the same job straight through, elsewhere, as a user types it: `synthmill run` with no cluster address,
    # so the job starts (and stops) its own local Ray. It runs while 1) and 2) run on the session's Ray: one
    # job alone leaves ~30% of the 2 cores idle (Ray Train's start), and the three take ~2 minutes in a row.
    log = open(folder / "local.log", "w+", encoding="utf-8")  # a file, not a pipe: Ray's output would fill one
    local = subprocess.Popen([sys.executable, "-m", "synthmill.cli", "run", str(spec_path), f"output.path={straight}"],
                             env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    # 1) a run that dies (SIGKILL to the driver) right after its first checkpoint
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    proc = subprocess.Popen([sys.executable, "-m", "synthmill.cli", "run", str(spec_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    snapshot = os.path.join(resumed, "checkpoints", "checkpoint_manager_snapshot.json")
    deadline = time.time() + 240
    while not os.path.isfile(snapshot) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.isfile(snapshot), (
        f"no first checkpoint; driver exit {proc.poll()}: {proc.stderr.read().decode()[-2000:]}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(resumed, "pipeline"))
    assert not os.path.exists(os.path.join(resumed, "summary.json"))
    killed_at = distill.steps_done(load_spec(str(spec_path)))
    # 2) the same command again resumes; while it runs, one Ray Train worker process is SIGKILLed right
    # after the step after the checkpoint is logged: the driver restarts the worker group from the checkpoint
    worker_killed: list[int] = []
    worker_env: dict[str, str] = {}

    metrics = os.path.join(resumed, "metrics.jsonl")
    # The killed run may have logged step killed_at + 1 before it died; the rerun rewrites the file from its
    # checkpoint (a new file, renamed into place) before training on, so only a line in a new file counts.
    stale_inode = os.stat(metrics).st_ino if os.path.exists(metrics) else None

    def kill_a_worker() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                with open(metrics, encoding="utf-8") as fh:
                    fresh = os.fstat(fh.fileno()).st_ino != stale_inode
                    steps = [json.loads(line)["step"] for line in fh if line.endswith("}\n")]
                if fresh and killed_at + 1 in steps:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        workers = [p for p in train_workers() if p.pid not in leftovers]
        if workers:
            worker_env.update(initial_malloc_env(workers[0].pid))
            workers[0].send_signal(signal.SIGKILL)
            worker_killed.append(workers[0].pid)

    def train_workers() -> list:
        """The Ray Train worker actor processes of the session's Ray (benchmarks/chaos.py: not the workers of
        3)'s local Ray or of a benchmark's), not their DataLoader processes, which are forked and carry the
        same title."""
        from benchmarks.chaos import cluster_processes

        def first(proc) -> bool:
            try:
                return "RayTrainWorker" not in " ".join(proc.parent().cmdline())
            except Exception:  # gone, or no parent
                return False

        return [p for p in cluster_processes("RayTrainWorker") if first(p)]

    import threading

    leftovers = {p.pid for p in train_workers()}  # the killed run's, if Ray has not reaped them yet
    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    summary = distill.run(distill.prepare(load_spec(str(spec_path))))
    killer.join(timeout=5)
    try:
        local.wait(timeout=300)
    finally:
        if local.poll() is None:
            os.killpg(local.pid, signal.SIGKILL)
    log.seek(0)
    local_output = log.read()
    log.close()
    assert local.returncode == 0, local_output[-3000:]
    with open(os.path.join(straight, "summary.json"), encoding="utf-8") as fh:
        straight_summary = json.load(fh)
    return {"spec": spec, "spec_path": str(spec_path), "resumed": resumed, "straight": straight, "killed_at": killed_at,
            "summary": summary, "straight_summary": straight_summary, "worker_killed": worker_killed,
            "worker_env": worker_env, "local_output": local_output}


def test_kill_and_rerun_resumes_exactly(distilled):
    """Driver SIGKILLed after the first checkpoint, rerun, a worker SIGKILLed during the rerun: the same
    weights as a run that never stopped."""
    d = distilled
    assert d["worker_killed"], "no Ray Train worker was found to kill"
    from synthmill.cluster.connect import CPU_MALLOC_ENV

    assert d["worker_env"] == CPU_MALLOC_ENV  # CPU workers start with synthmill's malloc settings
    s = d["summary"]
    assert s["attempts"] == 2, s  # the worker group was restarted once
    assert s["status"] == "complete" and s["steps"] == 6 and s["workers"] == 2
    assert s["steps_resumed"] == d["killed_at"] >= 2 and s["steps_run"] == 6 - d["killed_at"]
    # each step logged once, in order, although the killed run may have logged steps past its checkpoint
    lines = metrics_lines(d["resumed"])
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    straight = metrics_lines(d["straight"])
    for a, b in zip(lines, straight, strict=True):
        assert ({k: v for k, v in a.items() if k != "samples_per_s"}
                == {k: v for k, v in b.items() if k != "samples_per_s"})
    assert set(lines[0]) >= {"step", "loss", "loss_task", "loss_output_kd", "loss_feature_kd", "lr", "samples_per_s"}
    # the resumed run's student (and its EMA) equal the uninterrupted run's, bit for bit
    for sub in ("student", "ema"):
        a = unet_weights(os.path.join(d["resumed"], "checkpoints", "step_00000006", sub))
        b = unet_weights(os.path.join(d["straight"], "checkpoints", "step_00000006", sub))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    # Ray Train keeps train.checkpoints_kept (2) checkpoints
    kept = sorted(n for n in os.listdir(os.path.join(d["resumed"], "checkpoints")) if n.startswith("step_"))
    assert kept == ["step_00000004", "step_00000006"]


def test_distill_on_its_own_local_ray_says_only_what_happened(distilled):
    """The uninterrupted run was ``synthmill run`` without a cluster: it trained on a local Ray it started.
    Ray Train asks Ray's State API once a second whether its controller lives; that API is served by Ray's
    dashboard, so a local Ray started without one printed a warning a second for the whole run."""
    out = distilled["local_output"]
    assert "Started a local Ray instance" in out and distilled["straight_summary"]["status"] == "complete"
    assert "Failed to query Ray Train Controller" not in out, out[-3000:]
    # nor does one machine need Ray Train's preemption watcher, which logs an error-level line as it starts
    assert "PreemptionWatcher" not in out, out[-3000:]
    assert "done: bk-small" in out and "at step 6" in out


def test_rerun_of_a_finished_job_trains_nothing(distilled, capsys):
    before = os.stat(os.path.join(distilled["resumed"], "pipeline", "model_index.json")).st_mtime_ns
    # a run killed while it exported the pipeline or wrote summary.json left their temporaries: they go
    dead = [os.path.join(distilled["resumed"], ".pipeline.tmp-x1y2"),
            os.path.join(distilled["resumed"], "summary.json.tmp-" + "0a" * 16)]
    os.makedirs(os.path.join(dead[0], "unet"))
    open(dead[1], "wb").close()
    for path in dead:
        os.utime(path, (time.time() - 60, time.time() - 60))
    assert main(["run", distilled["spec_path"]]) == 0
    assert not any(map(os.path.exists, dead))
    out = capsys.readouterr().out
    assert "at step 6" in out and "0 steps run" in out
    assert os.stat(os.path.join(distilled["resumed"], "pipeline", "model_index.json")).st_mtime_ns == before
    assert main(["status", distilled["resumed"]]) == 0
    status = capsys.readouterr().out
    assert "state      complete" in status and "checkpoint step 6 of 6" in status and "logged     step 6" in status
    # a smaller max_steps than what is trained is refused
    assert main(["run", distilled["spec_path"], "train.max_steps=4"]) == 2
    assert "below step 6" in capsys.readouterr().err


def test_loss_goes_down(distilled, sd_teacher, reference):
    """On fixed samples, noise and timesteps, the trained student's loss is below the copied student's."""
    from diffusers import UNet2DConditionModel

    from synthmill.distill.train import load_teacher
    from synthmill.jobs.generate_spec import ModelSpec
    from synthmill.models.kd import LossWeights
    from synthmill.models.students import make_student

    weights = LossWeights(1.0, 1.0, 1.0)
    initial = make_student(load_teacher(ModelSpec(path=sd_teacher), None).unet, "bk-small")
    trained = UNet2DConditionModel.from_pretrained(
        os.path.join(distilled["resumed"], "checkpoints", "step_00000006", "student"))
    before = _fixed_loss(sd_teacher, initial, reference[1], weights)
    after = _fixed_loss(sd_teacher, trained, reference[1], weights)
    assert after < 0.9 * before, (before, after)
    lines = metrics_lines(distilled["resumed"])
    assert lines[-1]["loss"] < lines[0]["loss"]


def test_exported_pipeline_loads_and_generates(distilled, write_spec, prompts_tsv, tmp_path):
    from diffusers import DiffusionPipeline

    from tests.conftest import base_spec, read_wds, run_job

    folder = os.path.join(distilled["resumed"], "pipeline")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet.mid_block is None and [len(b.resnets) for b in pipe.unet.down_blocks] == [1, 1, 1, 1]
    # the exported UNet is the EMA weights of the last checkpoint
    ema = unet_weights(os.path.join(distilled["resumed"], "checkpoints", "step_00000006", "ema"))
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in ema.items())
    spec = base_spec(folder, prompts_tsv, str(tmp_path / "gen"))
    spec["prompts"]["limit"] = 3
    spec["sampling"]["images_per_prompt"] = 1
    spec["cluster"]["num_actors"] = 1
    summary = run_job(write_spec, spec)
    assert summary["samples"] == 3
    samples = read_wds(spec["output"]["path"])
    assert len(samples) == 3 and all(s["png"][:4] == b"\x89PNG" for s in samples)


# ---------------------------------------------------------------------------------------------------------
# the data stream: every sample once per epoch across readers; resumed readers give the same batches


def test_stream_split_and_exact_resume(reference, sd_teacher):
    from synthmill.distill.data import ShardStream, StreamSpec
    from synthmill.distill.train import load_teacher, tokenizers
    from synthmill.jobs.generate_spec import ModelSpec
    from synthmill.sharding.images import open_image_set

    units = open_image_set(reference[1]).units  # 5 units, 22 samples
    toks = tokenizers(load_teacher(ModelSpec(path=sd_teacher), None))

    # 4 readers (2 workers x 2 loader processes) over 5 units: unit-level split; the first epoch covers
    # each sample exactly once
    spec = StreamSpec(units, 32, True, False, 4, 1, 7)
    seen = [s.name for c in range(4) for _, s in _take_epoch(ShardStream(spec, toks, c // 2, 2)._raw(c, 4))]
    assert len(seen) == len(set(seen)) == 22
    # 8 readers > 5 units: sample-level split, still each sample once
    spec8 = StreamSpec(units, 32, True, False, 0, 1, 7)
    seen = [s.name for c in range(8) for _, s in _take_epoch(ShardStream(spec8, toks, c, 8)._raw(c, 8))]
    assert len(seen) == len(set(seen)) == 22

    # a DataLoader with 3 processes takes batch i from process i % 3; resuming at batch 5 must continue
    # the same sequence of batches
    def batches(start, n, procs=3, bs=2):
        spec = StreamSpec(units, 32, False, True, 4, bs, 11)
        its = [ShardStream(spec, toks, 0, 1, start_batch=start).iter_as(p, procs) for p in range(procs)]
        out = []
        for i in range(n):
            it = its[i % procs]
            out.append(torch.stack([next(it)["pixel_values"] for _ in range(bs)]))
        return out

    straight = batches(0, 9)
    resumed = batches(5, 4)
    assert all(torch.equal(a, b) for a, b in zip(straight[5:], resumed, strict=True))


def _take_epoch(raw):
    for epoch, sample in raw:
        if epoch > 0:
            return
        yield epoch, sample


# ---------------------------------------------------------------------------------------------------------
# bad input: exit 2, one line naming the field or file, nothing written


def _bad(write_spec, capsys, spec: dict, *overrides: str) -> str:
    code = main(["run", write_spec(spec), *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not os.path.exists(spec["output"]["path"]), "a refused job must not write its output folder"
    lines = [ln for ln in err.splitlines() if ln.startswith("synthmill: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_inputs(sd_teacher, reference, write_spec, capsys, tmp_path):
    import webdataset as wds

    data = reference[1]
    out = str(tmp_path / "never")
    spec = distill_spec(sd_teacher, data, out)
    msg = _bad(write_spec, capsys, spec, "student.arch=bk-huge")
    assert "student.arch" in msg and "bk-base, bk-small, bk-tiny, ssd-1b, vega" in msg
    msg = _bad(write_spec, capsys, spec, "student.arch=ssd-1b")
    assert "student.arch" in msg and "SDXL" in msg and "bk-base" in msg
    msg = _bad(write_spec, capsys, spec, "data.resolution=36")
    assert "data.resolution" in msg and "multiple of 8" in msg
    msg = _bad(write_spec, capsys, spec, "data.resolution=24")  # 12x12 latents, the UNet halves 3 times
    assert "data.resolution" in msg and "multiple of 16" in msg
    # shards whose samples carry no caption
    bare = tmp_path / "bare"
    bare.mkdir()
    with wds.TarWriter(str(bare / "000000.tar")) as w:
        for s in read_samples(data)[:3]:
            w.write({"__key__": s["__key__"], "png": s["png"]})
    msg = _bad(write_spec, capsys, spec, f"data.path={bare}/*.tar")
    assert "000000.tar" in msg and "no caption" in msg
    msg = _bad(write_spec, capsys, spec, f"teacher.path={tmp_path / 'nothing'}")
    assert "teacher.path" in msg
    msg = _bad(write_spec, capsys, spec, "loss.task=0", "loss.output_kd=0", "loss.feature_kd=0")
    assert "loss" in msg


def _config_teacher(folder, unet: str | None = None, vae: str | None = None) -> str:
    """A teacher folder of configs only (validation reads no weights); ``unet`` / ``vae`` replace a config.json."""
    from synthmill.testing.tiny import tiny_unet_config

    configs = {"unet": unet or json.dumps(tiny_unet_config("sd")), "vae": vae or '{"block_out_channels": [16, 32]}'}
    for name, text in configs.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(text)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return str(folder)


def _file(folder, name: str, data: bytes) -> str:
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(data)
    return str(folder / name)


# Teacher, student and data files that cannot be read as what they stand for: the field, how the test makes one in
# tmp_path, and what the one error line says. All are found by validation, which reads no weights.
BAD_FILES = {
    "unet config not JSON": ("teacher.path", lambda t: _config_teacher(t / "bad", unet="{not json"),
                             "unet/config.json is not valid JSON"),
    "unet config a list": ("teacher.path", lambda t: _config_teacher(t / "bad", unet="[1, 2]"),
                           "unet/config.json holds a JSON list"),
    "vae channels a number": ("teacher.path", lambda t: _config_teacher(t / "bad", vae='{"block_out_channels": 5}'),
                              "vae/config.json gives block_out_channels 5"),
    "student config a list": ("student.arch", lambda t: os.path.dirname(_file(t / "student", "config.json", b"[1]")),
                              "config.json' holds a JSON list"),
    "data not a tar": ("data.path", lambda t: _file(t, "fake.tar", b"not a tar file"),
                       "fake.tar: not a readable tar file"),
    "data plan.json not JSON": ("data.path", lambda t: os.path.dirname(_file(t / "out", "plan.json", b"{not json")),
                                "plan.json: damaged, not a JSON document"),
    "data caption not UTF-8": ("data.path", lambda t: os.path.dirname(_file(t / "data", "000000.txt", b"\xff")),
                               "000000.png: its caption (.txt) is not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files(case, write_spec, capsys, tmp_path):
    field, make, what = BAD_FILES[case]
    data = write_image_folder(tmp_path / "data", 4)
    spec = distill_spec(_config_teacher(tmp_path / "teacher"), data, str(tmp_path / "never"))
    msg = _bad(write_spec, capsys, spec, f"{field}={make(tmp_path)}")
    assert field in msg and what in msg, msg


def test_caption_missing_deep_in_the_stream_is_exit_2(sd_teacher, reference, write_spec, capsys, tmp_path):
    """validate sees only the first sample; a later tar without captions stops training with exit 2 naming it."""
    import webdataset as wds

    samples = read_samples(reference[1])
    data = tmp_path / "data"
    data.mkdir()
    with wds.TarWriter(str(data / "000000.tar")) as w:
        for s in samples[:2]:
            w.write({"__key__": s["__key__"], "png": s["png"], "txt": s["txt"]})
    with wds.TarWriter(str(data / "000001.tar")) as w:
        for s in samples[2:6]:
            w.write({"__key__": s["__key__"], "png": s["png"]})
    spec = distill_spec(sd_teacher, f"{data}/*.tar", str(tmp_path / "out"), max_steps=4, gradient_accumulation=1,
                        ema=False, gradient_checkpointing=False)
    spec["cluster"]["num_workers"] = 1
    spec["data"].update(loader_workers=0, shuffle_buffer=0)
    path = write_spec(spec)
    assert main(["validate", path]) == 0
    capsys.readouterr()
    assert main(["run", path]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("synthmill: error:")]
    assert len(lines) == 1 and "000001.tar" in lines[0] and "no caption" in lines[0], lines


def read_samples(output: str) -> list[dict]:
    from tests.conftest import read_wds

    return read_wds(output)
