"""Secrets, signals, full disks and the first run: what reaches the terminal when the run is not a good day.

Everything runs the installed command in a subprocess, as a user does: secrets against a moto S3 server with a
session token (``tests/test_s3.py``'s), SIGTERM to the driver's whole process group, a file system that is really
full (a size-limited tmpfs the kernel fills, where this machine lets a test mount one; else the driver's
``RLIMIT_FSIZE``), and the README's first command without a hub to ask.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

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
