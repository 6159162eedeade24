"""Secrets, signals, full disks and the first run: what reaches the terminal when the run is not a good day.

Everything runs the installed command in a subprocess, as a user does: secrets against a moto S3 server with a
session token (``tests/test_s3.py``'s), SIGTERM to the driver's whole process group, a file system that is really
full (a size-limited tmpfs the kernel fills, where this machine lets a test mount one; else the driver's
``RLIMIT_FSIZE``), and the README's first command without a hub to ask.
"""

from __future__ import annotations

import glob
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import base_spec
from tests.test_s3 import s3  # noqa: F401 - the moto server fixture

SYNTHMILL = [sys.executable, "-m", "synthmill.cli"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthmill(*args: str, env: dict | None = None, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*SYNTHMILL, *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else dict(os.environ), **kwargs)


# ---- secrets: -v, fsspec URLs and botocore's messages ----

def test_secrets_never_reach_the_terminal_even_at_debug_level(s3, tiny_sd, prompts_tsv, write_spec):  # noqa: F811
    """``-v`` turns on botocore's and fsspec's debug lines, which print request headers (``X-Amz-Security-Token``,
    ``Authorization: ... Credential=KEY/..., Signature=...``), canonical requests and URLs; and botocore's own
    error quotes a ``user:password@bucket`` it could not use as a bucket name. None of the secrets of the spec
    (access key, secret, session token, a URL's password) nor any signature appears in what synthmill prints."""
    # a session token made up here travels in every request (moto refuses it: that error is printed too)
    token = "IQoJb3JpZ2luX2VjEHoaCXVzLWVhc3QtMSJHMEUCIQD-session-token-not-shown"
    secrets = [s3["creds"]["key"], s3["creds"]["secret"], token]
    spec = base_spec(tiny_sd, prompts_tsv, "s3://synth/runs/secrets")
    spec["storage"] = {"endpoint_url": s3["endpoint"], "key": s3["creds"]["key"], "secret": s3["creds"]["secret"],
                       "token": token}
    path = write_spec(spec)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["HF_HUB_OFFLINE"] = "1"
    verbose = synthmill("run", path, "--dry-run", "-v", env=env)
    printed = verbose.stdout + verbose.stderr
    assert verbose.returncode == 2, verbose.stderr[-3000:]
    assert verbose.stderr.strip().splitlines()[-1].startswith("synthmill: error: output.path: list s3://synth/runs/")
    assert "x-amz-security-token" in printed.lower() and "Credential=" in printed  # the lines are there...
    for secret in secrets[:3]:
        assert secret not in printed  # ...without their values
    assert not re.search(r"Signature=[0-9a-f]{16}", printed)
    # a URL's password: in fsspec's debug lines, and in botocore's error quoting it as a bucket name
    for args in (("validate", path, "output.path=s3://user:PASSW0RD-not-shown@synth/x", "-v"),
                 ("validate", path, "output.path=s3://user:PASSW0RD-not-shown@synth/x")):
        proc = synthmill(*args, env=env)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "user:<redacted>@" in proc.stderr.strip().splitlines()[-1]
        assert "PASSW0RD" not in proc.stdout + proc.stderr


# ---- SIGTERM: a container stop, a scheduler's kill ----

def group_of(pgid: int) -> list[int]:
    """The processes (not zombies) whose process group is ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                found.append(int(entry))
    return found


def test_sigterm_to_the_process_group_stops_like_ctrl_c(tiny_sd, prompts_tsv, write_spec, tmp_path):
    """``kill -- -PGID`` (what a container stop does) while a job runs on the local Ray it started: one line saying
    the same command resumes, exit 143 (as a shell reports SIGTERM), no stack dump of Ray's nor an abort, and no
    process of the group left behind. Before: Ray's C++ dump, then SIGABRT 3 s later. Ray's warning that it turned
    on token authentication for the local cluster, on the first screen of every local run, is not printed."""
    spec = base_spec(tiny_sd, prompts_tsv, str(tmp_path / "out"))
    spec["cluster"].update(num_actors=1, cpus_per_actor=1)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("MALLOC_")}
    env["HF_HUB_OFFLINE"] = "1"
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as err:
        proc = subprocess.Popen([*SYNTHMILL, "run", write_spec(spec)], stdout=subprocess.DEVNULL, stderr=err,
                                env=env, cwd=tmp_path, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while "connected to Ray" not in (tmp_path / "stderr").read_text() and proc.poll() is None:
                assert time.monotonic() < deadline, (tmp_path / "stderr").read_text()[-3000:]
                time.sleep(0.1)
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            os.killpg(proc.pid, signal.SIGTERM)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        stderr = (tmp_path / "stderr").read_text()
    assert code == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == ("synthmill: terminated (SIGTERM); what was committed is kept, and the "
                                               "same command resumes from it"), stderr[-3000:]
    for bad in ("SIGTERM received", "SIGABRT", "Aborted", "Traceback", "Token authentication"):
        assert bad not in stderr, (bad, stderr[-3000:])
    deadline = time.monotonic() + 10
    while group_of(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_of(proc.pid)


# ---- the README's first command, without a hub to ask ----

def test_quickstart_offline_is_one_line_at_validate(tmp_path):
    """``synthmill run configs/quickstart.yaml`` on a machine without network (the hub does not answer) and without
    the model in its Hugging Face cache: on a local Ray this machine is the only node, so every actor would fail to
    load it. Exit 2 at validate, in one line, before Ray starts. On a cluster (RAY_ADDRESS) the nodes' caches may
    hold it: the check steps aside, as before."""
    import socket

    with socket.socket() as sock:  # a port nothing listens on: a hub that does not answer
        sock.bind(("127.0.0.1", 0))
        silent = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HF_HUB_OFFLINE")}
    env.update(HF_ENDPOINT=silent, HF_HUB_CACHE=str(tmp_path / "hub"))
    out = f"output.path={tmp_path / 'out'}"
    for command, extra, why in (("run", {}, f"{silent} did not answer"),
                                ("validate", {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set")):
        proc = synthmill(command, "configs/quickstart.yaml", out, env=dict(env, **extra), cwd=REPO)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines() == [
            f"synthmill: error: model.path segmind/tiny-sd: not in the local Hugging Face cache and {why}; connect to "
            "the hub once to download it (or set HF_ENDPOINT to a mirror), or give the path of a local diffusers "
            "folder"], proc.stderr[-3000:]
    assert not os.path.exists(tmp_path / "out")
    proc = synthmill("validate", "configs/quickstart.yaml", out, env=dict(env, RAY_ADDRESS="127.0.0.1:1"), cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.startswith("ok: configs/quickstart.yaml: 48 prompts"), proc.stderr


# ---- a full disk: the driver's writes and the actors' ----

@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs of 256 KiB that the kernel fills for real (skipped where a test may not mount one)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        # CI's machines let a test mount one: there, not being able to is a failure, never a quiet skip
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder, leave: int = 0) -> None:
    """Fill the file system of ``folder`` up, then free ``leave`` bytes."""
    fd = os.open(os.path.join(folder, "filler"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(os.path.join(folder, "filler"), max(0, os.path.getsize(os.path.join(folder, "filler")) - leave))


def limit_file_size(limit: int):
    """A preexec_fn: files of this process may not grow past ``limit`` bytes (``ulimit -f``), and a write past it
    fails with EFBIG instead of the default SIGXFSZ that would end the process."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_on_the_driver_is_one_line_naming_the_file(reference, write_spec, tmp_path, request):
    """The driver's own writes (plan.json first, index.parquet and summary.json at the end) finding no room: one line
    naming the file and that no space is left, exit 1, no traceback. Here: a complete output whose index and summary
    are to be written again (nothing for Ray to do), with the driver's files limited to 2 KiB (EFBIG, as a quota or
    ``ulimit -f`` gives), and where a test may mount a tmpfs, on a file system that is full (ENOSPC)."""
    spec, ref_out = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    for name in ("summary.json", "index.parquet"):
        os.unlink(out / name)
    path = write_spec(dict(spec, output=dict(spec["output"], path=str(out))))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = synthmill("run", path, env=env, preexec_fn=limit_file_size(2048))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert re.fullmatch(  # the index is written to a temporary first (TMPDIR), then moved into place
        rf"synthmill: error: {out}/index.parquet \(its temporary \S+\): cannot be written, no space left \(File too "
        r"large\); what was committed is kept, and the same command resumes once there is room",
        proc.stderr.strip().splitlines()[-1]), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not os.path.exists(out / "summary.json")
    disk = request.getfixturevalue("small_disk")  # skips here where no tmpfs can be mounted
    full = disk / "out"
    shutil.copytree(out, full)
    fill(disk)
    proc = synthmill("run", path, f"output.path={full}", env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"synthmill: error: {full}/plan.json: cannot be written, no space left (No space left on device); what was "
        "committed is kept, and the same command resumes once there is room"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    os.unlink(disk / "filler")  # room again: the same command completes the job
    proc = synthmill("run", path, f"output.path={full}", env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("done: 22 samples in 5 shards"), proc.stderr[-3000:]


def test_a_full_disk_under_the_actors_fails_shards_quietly(tiny_sd, prompts_tsv, ray_address, small_disk, write_spec):
    """Actors whose shards find no room: each failed shard is named with the file and 'no space left', exit 1, no
    'Exception ignored ... write to closed file' from the temporary tar, and the progress bar counts only the
    samples of committed shards (before: 11/11 while shards had failed)."""
    out = small_disk / "out"
    fill(small_disk, leave=52 * 1024)  # plan.json, job.yaml and one shard (a 30 KiB tar, its index part, its marker)
    job = base_spec(tiny_sd, prompts_tsv, str(out))  # 11 samples in 3 shards, on one actor
    job["sampling"]["images_per_prompt"] = 1
    job["cluster"].update(num_actors=1, max_attempts=2)
    proc = synthmill("run", write_spec(job), env=dict(os.environ, RAY_ADDRESS=ray_address, HF_HUB_OFFLINE="1"),
                     timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"synthmill: job failed: \d of 3 shards failed \(.*\); first error: DiskFull: \S+/out/shards/"
                    r"\S+: cannot be written, no space left \(No space left on device\)", last) or re.match(
        rf"synthmill: error: {out}/failures.json: cannot be written, no space left", last), last
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    committed = sum(json.load(open(m))["count"] for m in glob.glob(str(out / "shards" / "*.json")))
    shown = re.findall(r"(\d+)/11 \[", proc.stderr)
    assert 0 < committed < 11 and shown and int(shown[-1]) == committed, (committed, shown[-3:])
