"""``s3://`` for prompts, model and output, against a real S3-protocol server (moto) on 127.0.0.1.

The server enforces credentials (IAM auth on), so a wrong key is really refused. Credentials reach
the Ray actors through the spec's ``storage`` options, which also checks that secrets never appear
in job.yaml, summary.json or markers; the driver-only commands also get them from the standard AWS
environment variables with no storage section at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from synthmill.cli import main
from tests.conftest import run_eval, run_job, tar_hashes
from tests.netproxy import FlakyProxy

SECRET = "s3cr3t-value-that-must-never-leak"


@pytest.fixture(scope="module")
def s3(tiny_sd, prompts_tsv):
    """A moto server with IAM auth, a user with full access, and bucket 'synth' holding prompts and the model."""
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import logging

    import boto3
    import moto.settings
    import requests
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # the three IAM calls below go unauthenticated, every later call is authenticated. moto keeps its state and
    # its request count per process, not per server: both are reset here (another moto server of this run, or
    # this fixture for another module, may have served requests and created the user)
    requests.post(f"{endpoint}/moto-api/reset", timeout=30).raise_for_status()
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"3", timeout=30).raise_for_status()
    iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    iam.create_user(UserName="synth")
    key = iam.create_access_key(UserName="synth")["AccessKey"]
    iam.put_user_policy(UserName="synth", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    creds = {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, **creds)
    fs.mkdir("synth")
    fs.put_file(prompts_tsv, "synth/prompts/prompts.tsv")
    fs.put(tiny_sd, "synth/models/tiny-sd", recursive=True)
    fs.pipe_file("synth/afile", b"not a folder")
    yield {"endpoint": endpoint, "port": port, "creds": creds, "fs": fs}
    server.stop()
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")


def s3_spec(reference_spec: dict, s3: dict, output: str, endpoint: str | None = None) -> dict:
    spec = json.loads(json.dumps(reference_spec))
    spec["model"]["path"] = "s3://synth/models/tiny-sd"
    spec["prompts"]["path"] = "s3://synth/prompts/prompts.tsv"
    spec["output"]["path"] = output
    spec["storage"] = {"endpoint_url": endpoint or s3["endpoint"], "key": s3["creds"]["key"], "secret": SECRET}
    return spec


def members(tar_bytes: bytes) -> dict[str, bytes]:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def same_samples_except_model_path(remote: dict[str, bytes], local: dict[str, bytes]) -> None:
    """Images and prompts identical; metadata identical except the model path it names."""
    assert remote.keys() == local.keys()
    for name in remote:
        if name.endswith(".json"):
            a, b = json.loads(remote[name]), json.loads(local[name])
            assert a.pop("model") == "s3://synth/models/tiny-sd"
            b.pop("model")
            assert a == b, name
        else:
            assert remote[name] == local[name], name


def remote_hashes(fs, prefix: str) -> dict[str, str]:
    return {
        os.path.basename(p): hashlib.sha256(fs.cat_file(p)).hexdigest()
        for p in sorted(fs.glob(f"{prefix}/shards/*.tar"))
    }


def with_secret(spec: dict, s3: dict) -> dict:
    spec["storage"]["secret"] = s3["creds"]["secret"]
    return spec


def test_generate_from_and_to_s3_matches_local_samples(reference, s3, write_spec, tmp_path, monkeypatch, capsys):
    ref_spec, ref_out = reference
    spec = with_secret(s3_spec(ref_spec, s3, "s3://synth/runs/a"), s3)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SYNTHMILL_CACHE", str(cache))  # the driver's env; actors use their node's cache
    summary = run_job(write_spec, spec)
    assert summary["samples"] == 22
    fs = s3["fs"]
    fs.invalidate_cache()
    assert sorted(remote_hashes(fs, "synth/runs/a")) == sorted(tar_hashes(ref_out))
    for k in range(5):
        same_samples_except_model_path(members(fs.cat_file(f"synth/runs/a/shards/{k:06d}.tar")),
                                       members(open(os.path.join(ref_out, "shards", f"{k:06d}.tar"), "rb").read()))
    first = remote_hashes(fs, "synth/runs/a")
    secret = s3["creds"]["secret"]
    for name in ["job.yaml", "summary.json", "plan.json", "shards/000000.json", "shards/000004.json"]:
        text = fs.cat_file(f"synth/runs/a/{name}").decode()
        assert secret not in text, name
    job = fs.cat_file("synth/runs/a/job.yaml").decode()
    assert "secret: <redacted>" in job and s3["endpoint"] in job
    # Resume on S3: drop a marker, run again, only that shard runs.
    fs.rm_file("synth/runs/a/shards/000002.json")
    again = run_job(write_spec, spec)
    assert (again["shards_resumed"], again["shards_run"]) == (4, 1)
    fs.invalidate_cache()
    assert remote_hashes(fs, "synth/runs/a") == first


def test_status_and_dry_run_with_aws_environment_only(reference, s3, write_spec):
    """No storage section: endpoint and credentials come from AWS_* variables, as on a real cluster."""
    ref_spec, _ = reference
    if not s3["fs"].exists("synth/runs/a/summary.json"):
        pytest.fail("needs test_generate_from_and_to_s3_matches_local_samples to have run first")
    spec = s3_spec(ref_spec, s3, "s3://synth/runs/a")
    del spec["storage"]
    path = write_spec(spec)
    env = dict(os.environ, AWS_ENDPOINT_URL=s3["endpoint"], AWS_ACCESS_KEY_ID=s3["creds"]["key"],
               AWS_SECRET_ACCESS_KEY=s3["creds"]["secret"])
    exe = os.path.join(os.path.dirname(sys.executable), "synthmill")
    dry = subprocess.run([exe, "run", path, "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr[-1500:]
    assert json.loads(dry.stdout)["shards_done"] == 5
    st = subprocess.run([exe, "status", "s3://synth/runs/a"], env=env, capture_output=True, text=True, timeout=120)
    assert st.returncode == 0, st.stderr[-1500:]
    assert "5 / 5 done" in st.stdout and "complete" in st.stdout
    assert s3["creds"]["secret"] not in dry.stdout + dry.stderr + st.stdout + st.stderr


def test_status_of_a_job_spec_uses_its_storage_options(reference, s3, write_spec, capsys):
    """``synthmill status JOB.yaml [key=value ...]``: the output named by the spec (after overrides), read with
    the spec's storage options; this process has no AWS endpoint in its environment, so only those reach moto."""
    ref_spec, _ = reference
    if not s3["fs"].exists("synth/runs/a/summary.json"):
        pytest.fail("needs test_generate_from_and_to_s3_matches_local_samples to have run first")
    assert "AWS_ENDPOINT_URL" not in os.environ
    path = write_spec(with_secret(s3_spec(ref_spec, s3, "s3://synth/runs/elsewhere"), s3))
    assert main(["status", path, "--json", "output.path=s3://synth/runs/a"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["output"], st["complete"], st["shards_done"], st["samples_done"]) == ("s3://synth/runs/a", True, 5, 22)
    assert main(["status", "s3://synth/runs/a", "output.path=x"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "s3://synth/runs/a: key=value overrides need a job spec YAML, not an output folder")
    # storage options the endpoint refuses: exit 2 naming the URL, not a traceback, and never the secret
    assert main(["status", write_spec(s3_spec(ref_spec, s3, "s3://synth/runs/a"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("synthmill: error: ") and "s3://synth/runs/a" in err and SECRET not in err, err


def bad(capsys, write_spec, spec: dict, *needles: str) -> str:
    t0 = time.monotonic()
    code = main(["validate", write_spec(spec)])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2, line
    for n in needles:
        assert n in line, (n, line)
    assert SECRET not in line
    assert time.monotonic() - t0 < 60
    return line


def test_bad_s3_inputs_exit_2_naming_the_url(reference, s3, write_spec, capsys, monkeypatch):
    ref_spec, _ = reference
    cases = [  # (section, new path, what the message must say)
        ("output", "s3://no-such-bucket/out", "bucket 'no-such-bucket' does not exist"),
        ("output", "s3://synth/afile", "is a file"),
        ("prompts", "s3://synth/prompts/missing.tsv", "not found"),
        ("model", "s3://synth/models/nothing-here", "model_index.json"),
    ]
    for section, url, needle in cases:
        spec = with_secret(s3_spec(ref_spec, s3, "s3://synth/runs/bad"), s3)
        spec[section]["path"] = url
        bad(capsys, write_spec, spec, url, needle)
    spec = s3_spec(ref_spec, s3, "s3://synth/runs/bad")  # SECRET is not the user's secret
    bad(capsys, write_spec, spec, "s3://synth/", "PermissionError")
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    spec = with_secret(s3_spec(ref_spec, s3, "s3://synth/runs/bad", endpoint=f"http://127.0.0.1:{dead}"), s3)
    from synthmill.sharding import storage

    monkeypatch.setattr(storage, "RETRY_SECONDS", 2.0)  # SYNTHMILL_STORAGE_RETRY_SECONDS=2 caps validation's 10 s
    line = bad(capsys, write_spec, spec, "s3://synth/", "s (retry budget 2s): ", "Could not connect")
    assert re.search(r"still failing after \d+ attempts in \d+s \(retry budget 2s\)", line), line
    assert not s3["fs"].exists("synth/runs/bad")


def test_endpoint_outage_mid_job_is_ridden_out(reference, s3, write_spec):
    """The S3 endpoint refuses and resets connections for several seconds while shards are committing."""
    ref_spec, _ = reference
    if not s3["fs"].exists("synth/runs/a/summary.json"):
        pytest.fail("needs test_generate_from_and_to_s3_matches_local_samples to have run first")
    proxy = FlakyProxy(("127.0.0.1", s3["port"]))
    try:
        spec = with_secret(s3_spec(ref_spec, s3, "s3://synth/runs/outage", endpoint=proxy.url), s3)
        spec["cluster"]["num_actors"] = 1
        spec["cluster"]["inflight_per_actor"] = 1
        result: dict = {}

        def job() -> None:
            try:
                result["summary"] = run_job(write_spec, spec)
            except BaseException as e:  # reported by the assertion below
                result["error"] = e

        thread = threading.Thread(target=job)
        thread.start()
        fs = s3["fs"]
        deadline = time.time() + 180
        while time.time() < deadline and not fs.glob("synth/runs/outage/shards/*.json"):
            time.sleep(0.1)
            fs.invalidate_cache()
        committed = len(fs.glob("synth/runs/outage/shards/*.json"))
        assert committed >= 1
        proxy.outage(6.0)
        thread.join(300)
        assert "error" not in result, repr(result.get("error"))
        assert committed < 5, "the outage came after the job had finished"
        fs.invalidate_cache()
        assert remote_hashes(fs, "synth/runs/outage") == remote_hashes(fs, "synth/runs/a")
    finally:
        proxy.close()


def test_remote_model_downloads_on_a_thread_while_the_actor_imports(s3, tiny_sd, tmp_path, monkeypatch):
    """An actor starts fetching an ``s3://`` model before its imports (models/loading.py,
    fetch_in_background): the call returns at once, even while the endpoint is down, and the download
    finishes on its own thread into the node's cache once it is back; ``load_pipeline`` loads from the
    folder the future gives and raises the future's error (the fetch's own, for a folder with no files)."""
    from concurrent.futures import Future

    from synthmill.jobs.generate_spec import ModelSpec
    from synthmill.models.fetch import local_model_path
    from synthmill.models.loading import fetch_in_background, load_pipeline, preload_pipeline_modules

    monkeypatch.setenv("SYNTHMILL_CACHE", str(tmp_path / "cache"))
    assert fetch_in_background(ModelSpec(path=str(tmp_path))) is None  # local folders and hub ids load as before
    assert fetch_in_background(ModelSpec(path="segmind/tiny-sd")) is None
    # The pipeline's classes are imported from the remote model_index.json, as from a local one (the
    # imports then run while the folder downloads); a hub id or a missing folder imports nothing here.
    opts0 = {"endpoint_url": s3["endpoint"], **s3["creds"]}
    local_classes = preload_pipeline_modules(tiny_sd)
    assert "diffusers.StableDiffusionPipeline" in local_classes and "transformers.CLIPTextModel" in local_classes
    assert preload_pipeline_modules("s3://synth/models/tiny-sd", opts0) == local_classes
    assert preload_pipeline_modules("s3://synth/models/none", opts0) == []
    assert preload_pipeline_modules("segmind/tiny-sd") == []
    proxy = FlakyProxy(("127.0.0.1", s3["port"]))
    try:
        opts = {"endpoint_url": proxy.url, **s3["creds"]}
        down = threading.Thread(target=proxy.outage, args=(3.0,))
        down.start()
        time.sleep(0.3)  # the port is closed now
        t0 = time.monotonic()
        fetched = fetch_in_background(ModelSpec(path="s3://synth/models/tiny-sd"), opts)
        returned_s = time.monotonic() - t0
        assert isinstance(fetched, Future) and not fetched.done()
        assert returned_s < 1.0, returned_s
        down.join()
        path = fetched.result(timeout=120)  # ridden out by storage.retrying once the endpoint is back
        assert os.path.isfile(os.path.join(path, "model_index.json")) and path.startswith(str(tmp_path / "cache"))
        assert local_model_path("s3://synth/models/tiny-sd", opts) == path  # the node's cache, complete
        # A fetch that died mid-way left its temporary folder and no complete copy: the next one removes it.
        os.makedirs(path + ".tmp-died/unet")
        os.remove(os.path.join(path, ".complete"))
        assert local_model_path("s3://synth/models/tiny-sd", opts) == path
        assert not os.path.exists(path + ".tmp-died") and os.path.isfile(os.path.join(path, ".complete"))
        pipe = load_pipeline(ModelSpec(path="s3://synth/models/tiny-sd"), "cpu", opts, fetched)
        assert pipe.unet is not None and pipe.name_or_path == path
        elsewhere: Future = Future()  # load_pipeline takes the future's folder, not a fetch of its own
        elsewhere.set_result(tiny_sd)
        assert load_pipeline(ModelSpec(path="s3://synth/models/tiny-sd"), "cpu", opts,
                             elsewhere).name_or_path == tiny_sd
        broken: Future = Future()
        broken.set_exception(RuntimeError("the future's own error"))
        with pytest.raises(RuntimeError, match="the future's own error"):
            load_pipeline(ModelSpec(path="s3://synth/models/tiny-sd"), "cpu", opts, broken)

        missing = ModelSpec(path="s3://synth/models/none")
        failed = fetch_in_background(missing, opts)
        with pytest.raises(FileNotFoundError, match="s3://synth/models/none: no files"):
            load_pipeline(missing, "cpu", opts, failed)
    finally:
        proxy.close()


def test_distill_sdxl_teacher_data_checkpoints_and_pipeline_on_s3(reference, s3, write_spec, tmp_path):
    """A distill job whose teacher, data, Ray Train checkpoints, metrics and exported pipeline all live on S3;
    also the suite's SDXL distillation (a tiny SDXL teacher -> the SSD-1B layout; one run covers both)."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from synthmill.jobs import distill
    from synthmill.jobs.spec import load_spec
    from synthmill.testing.tiny import save_tiny_pipeline
    from tests.test_distill import distill_spec

    fs = s3["fs"]
    fs.put(save_tiny_pipeline(tmp_path / "teacher", "sdxl", seed=5, unet_layout="full"), "synth/distill/teacher",
           recursive=True)
    fs.put(reference[1], "synth/distill/data", recursive=True)
    spec = distill_spec("s3://synth/distill/teacher", "s3://synth/distill/data", "s3://synth/distill/out",
                        arch="ssd-1b", max_steps=2, checkpoint_every=1, gradient_accumulation=1, ema=False,
                        gradient_checkpointing=False)
    spec["cluster"]["num_workers"] = 1
    spec["data"]["loader_workers"] = 0
    spec["storage"] = {"endpoint_url": s3["endpoint"], "key": s3["creds"]["key"], "secret": s3["creds"]["secret"]}
    path = write_spec(spec)
    summary = distill.run(distill.prepare(load_spec(path)))
    assert summary["steps"] == 2 and summary["workers"] == 1 and summary["pipeline"] == "s3://synth/distill/out/pipeline"
    fs.invalidate_cache()
    kept = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("synth/distill/out/checkpoints"))
    assert "step_00000001" in kept and "step_00000002" in kept
    lines = [json.loads(ln) for ln in fs.cat_file("synth/distill/out/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert s3["creds"]["secret"] not in fs.cat_file("synth/distill/out/job.yaml").decode()
    fs.get("synth/distill/out/pipeline", str(tmp_path / "pipeline"), recursive=True)
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "pipeline"))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    depths = [[len(a.transformer_blocks) for a in getattr(b, "attentions", [])] for b in pipe.unet.down_blocks]
    assert depths == [[], [2, 2], [4, 4]] and type(pipe.unet.mid_block).__name__ == "UNetMidBlock2D"
    # the Ray Train checkpoint's student is what was exported
    fs.get("synth/distill/out/checkpoints/step_00000002/student", str(tmp_path / "student"), recursive=True)
    saved = load_file(str(tmp_path / "student" / "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == pipe.unet.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in pipe.unet.state_dict().items())
    image = pipe("a red bus", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    # a rerun finds the checkpoint on S3 and trains nothing
    assert distill.prepare(load_spec(path)).steps_done == 2
    assert distill.run(distill.prepare(load_spec(path)))["steps_run"] == 0


def test_evaluate_from_and_to_s3_equals_local(evaluated, reference, image_folders, s3, write_spec):
    """The shared local evaluation, redone with every input and the output on S3: the same FID and CLIP score,
    bit for bit, and the same Inception Score to 1e-5 relative. IS reads the logits of torch-fidelity's network,
    whose last layer is a BLAS matrix product: on this CPU its logits move by up to 5e-4 with the torch thread
    count and with how a batch is split (measured on the random test weights), and the pool3 features FID reads
    do not; the two runs' actors need not run their batches under the same threading (the local run's IS mean
    and std differed from the S3 run's by 8e-7 and 3e-6 relative, on this code and on the code before it)."""
    spec, local = evaluated
    fs = s3["fs"]
    fs.put(reference[1], "synth/eval/generated", recursive=True)
    fs.put(image_folders[1], "synth/eval/real", recursive=True)
    fs.put(spec["fid"]["weights"], "synth/eval/inception.pth")
    remote = json.loads(json.dumps(spec))
    remote["generated"]["path"] = "s3://synth/eval/generated"
    remote["reference"]["path"] = "s3://synth/eval/real"
    remote["fid"]["weights"] = "s3://synth/eval/inception.pth"  # fetched, hashed and cached like a download
    remote["output"]["path"] = "s3://synth/eval/out"
    remote["storage"] = {"endpoint_url": s3["endpoint"], **s3["creds"]}
    result = run_eval(write_spec, remote)

    def numbers(metrics: dict) -> dict:  # fid_reference names the paths
        return {k: v for k, v in metrics.items() if k not in ("fid_reference", "inception_score")}

    assert numbers(result["metrics"]) == numbers(local["metrics"])
    ours, theirs = result["metrics"]["inception_score"], local["metrics"]["inception_score"]
    for key in ("mean", "std"):
        assert abs(ours[key] - theirs[key]) <= 1e-5 * abs(theirs[key]), (key, ours, theirs)
    assert {k: v for k, v in ours.items() if k not in ("mean", "std")} == {
        k: v for k, v in theirs.items() if k not in ("mean", "std")}
    assert result["samples"] == local["samples"] and result["units"] == local["units"]
    fs.invalidate_cache()
    names = {p.rsplit("/", 1)[-1] for p in fs.ls("synth/eval/out")}
    assert {"metrics.json", "fid_stats.npz", "reference_stats.npz", "job.yaml", "plan.json", "partials"} <= names
    assert s3["creds"]["secret"] not in fs.cat_file("synth/eval/out/job.yaml").decode()
    again = run_eval(write_spec, remote)  # everything committed: nothing is scored again
    assert again["units_run"] == 0 and numbers(again["metrics"]) == numbers(local["metrics"])
