"""A local Ray that ``connect()`` starts (``synthmill run`` without ``cluster.address``), and how it stops.

The probe starts one in a fresh process (the test session's own Ray is joined, never started), so both
tests read one run of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import ray

from synthmill.cluster.connect import CPU_MALLOC_ENV, _gpu_devices, connect, shutdown_local
from tests.conftest import base_spec, eval_spec, write_image_folder

LOCAL_RAY_PROBE = """
import json, ray, psutil
import ray._private.worker as ray_worker
from ray._private import ray_constants
from synthmill.cluster.connect import connect, cpu_runtime_env, shutdown_local

@ray.remote(num_cpus=1)
def initial_malloc_env():
    with open("/proc/self/environ", "rb") as fh:
        return dict(e.decode().split("=", 1) for e in fh.read().split(b"\\0") if e.startswith(b"MALLOC_"))

connect()
out = {"worker": ray.get(initial_malloc_env.remote()), "runtime_env": cpu_runtime_env()}
node = ray_worker._global_node
monitor = node.all_processes[ray_constants.PROCESS_TYPE_MONITOR][0].process
ray_processes = psutil.Process().children(recursive=True)  # GCS, raylet, monitor, agents, workers
ray_shutdown = ray.shutdown
def shutdown(*args, **kwargs):  # what Ray's own shutdown finds when synthmill hands over to it
    out["monitor_stopped_before_ray_shutdown"] = monitor.poll() is not None
    gcs = node.all_processes[ray_constants.PROCESS_TYPE_GCS_SERVER][0].process
    out["gcs_alive_at_ray_shutdown"] = gcs.poll() is None
    return ray_shutdown(*args, **kwargs)
ray.shutdown = shutdown
shutdown_local()
shutdown_local()  # a second call finds nothing to stop
_, alive = psutil.wait_procs(ray_processes, timeout=20)
out.update(processes=len(ray_processes), alive=[p.pid for p in alive], initialized=ray.is_initialized())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def local_ray_probe(tmp_path_factory) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", LOCAL_RAY_PROBE], env=env, cwd=tmp_path_factory.mktemp("probe"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_local_ray_started_without_gpus_passes_the_malloc_settings_to_its_workers(local_ray_probe):
    """When synthmill starts its own local Ray on a machine without GPU device files, Ray's processes inherit
    the settings from the driver, so actors need no runtime environment (whose agent the first actor would
    wait for); on a machine with GPUs its workers keep glibc's defaults."""
    out = {k: local_ray_probe[k] for k in ("worker", "runtime_env")}
    if _gpu_devices():  # GPU workers keep glibc's defaults; CPU actors bring the settings themselves
        assert out == {"worker": {}, "runtime_env": {"env_vars": CPU_MALLOC_ENV}}, out
    else:
        assert out == {"worker": CPU_MALLOC_ENV, "runtime_env": {}}, out


def test_shutdown_local_stops_every_process_of_the_local_ray_monitor_first(local_ray_probe):
    """Every process the local Ray started is gone after ``shutdown_local()``, and the autoscaler monitor was
    stopped while the GCS still ran (else it spends a second trying to report its SIGTERM to a dead GCS)."""
    out = local_ray_probe
    assert out["processes"] >= 5, out  # at least GCS, raylet, monitor, the agents, a worker
    assert out["alive"] == [] and out["initialized"] is False, out
    assert out["monitor_stopped_before_ray_shutdown"] and out["gcs_alive_at_ray_shutdown"], out


def test_shutdown_local_leaves_a_ray_it_joined_running(ray_cluster):
    """The test session's Ray (like a cluster named by ``cluster.address``) was not started by synthmill."""
    assert ray.is_initialized()
    connect()
    shutdown_local()
    assert ray.is_initialized() and ray.cluster_resources().get("CPU", 0) > 0


# ---- an address no Ray cluster answers at: exit 2 naming the setting, nothing written, in bounded time ----

UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1
#: Ray waits 5 + 5 + 30 s per attempt to reach a GCS by default; these make an attempt ~4 s, so a connect that is
#: not bounded to one attempt (Ray's default is 20) runs past the subprocess timeout below.
FAST_ATTEMPT = {"RAY_gcs_rpc_server_connect_timeout_s": "1", "RAY_py_gcs_connect_timeout_s": "1"}


def _start_unreachable(spec_path: str, *overrides: str, ray_address: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(FAST_ATTEMPT)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.Popen([sys.executable, "-m", "synthmill.cli", "run", spec_path, *overrides], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def job_specs(tiny_sd, prompts_tsv, clip_model, tmp_path_factory) -> dict:
    """A small valid spec of each kind (inputs that pass validation), as dicts without output.path."""
    from synthmill.testing.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("unreachable")
    data = write_image_folder(root / "data", 4)
    teacher = save_tiny_pipeline(root / "teacher", "sd", seed=3, unet_layout="full")
    return {
        "generate": base_spec(tiny_sd, prompts_tsv, ""),
        "evaluate": eval_spec(data, "", "", clip_model, metrics=["clip"]),
        "distill": {"kind": "distill", "teacher": {"path": teacher}, "student": {"arch": "bk-small"},
                    "data": {"path": data, "resolution": 32}, "train": {"max_steps": 2}, "output": {"path": ""}},
    }


def test_unreachable_cluster_address_is_exit_2_and_writes_nothing(job_specs, write_spec, tmp_path):
    """Each job kind connects before it writes; the message names the setting that gave the address (one
    kind through RAY_ADDRESS). And an actor or training worker larger than any node of the local Ray that
    synthmill starts, which Ray would keep pending (until cluster.start_timeout_s, 30 minutes by default, or
    for ever with Ray Train), is exit 2 naming the field, and so are more training workers than the local Ray
    holds at once (Ray Train would retry starting them every minute, for ever). The five commands run at once:
    each mostly imports, then waits on Ray."""
    started = {}
    for kind, given in (("generate", "cluster.address"), ("evaluate", "RAY_ADDRESS"), ("distill", "cluster.address"),
                        ("generate", "cluster.cpus_per_actor"), ("distill", "cluster.num_workers")):
        out = tmp_path / given / "out"
        spec = dict(job_specs[kind], output=dict(job_specs[kind]["output"], path=str(out)))
        path = write_spec(spec)
        if given == "RAY_ADDRESS":
            proc = _start_unreachable(path, ray_address=UNREACHABLE)
            expected = f"synthmill: error: {given} {UNREACHABLE}: no Ray cluster answers there"
        elif given == "cluster.address":
            proc = _start_unreachable(path, f"{given}={UNREACHABLE}")
            expected = f"synthmill: error: {given} {UNREACHABLE}: no Ray cluster answers there"
        elif kind == "generate":  # no address: a local Ray starts, with this machine's CPUs
            proc = _start_unreachable(path, f"{given}=64")
            expected = f"synthmill: error: {given}: one actor needs CPU 64, and no node of the Ray cluster has " \
                       "that much (its nodes: CPU "
        else:  # Ray Train starts every worker at once: each of these fits on this machine, two do not
            cpus = os.cpu_count() // 2 + 1
            proc = _start_unreachable(path, f"{given}=2", f"cluster.cpus_per_worker={cpus}", "data.loader_workers=1")
            expected = f"synthmill: error: {given} / cluster.cpus_per_worker: 2 training workers need CPU {cpus} " \
                       "each, all at once, and the Ray cluster holds 1 at most (its nodes: CPU "
        started[given] = (kind, expected, out, proc)
    # the bound: one connection attempt (~41 s, synthmill.cluster.connect.CONNECT_ENV) plus five interpreters'
    # imports on a loaded 2-core machine; Ray alone would retry 20 times, ~14 minutes for an unreachable address
    deadline = time.monotonic() + 150
    try:
        for _given, (kind, expected, out, proc) in started.items():
            _, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            err = "\n".join(ln for ln in stderr.splitlines() if ln.startswith("synthmill:")) or stderr[-3000:]
            assert proc.returncode == 2, (kind, err)
            assert err.startswith(expected) and len(err.splitlines()) == 1, (kind, err)
            assert not os.path.exists(out), f"{kind} wrote {sorted(os.listdir(out))} before it connected"
    finally:
        for _, _, _, proc in started.values():
            proc.kill()


def test_an_actor_no_node_of_a_joined_cluster_can_hold_is_named_while_the_job_waits(ray_address, job_specs,
                                                                                     write_spec, tmp_path, caplog):
    """A joined cluster's autoscaler may add a node that fits, so the job warns at once, naming the field,
    and waits cluster.start_timeout_s for it."""
    from synthmill.errors import JobFailed
    from tests.conftest import run_job

    spec = dict(job_specs["generate"], output={"path": str(tmp_path / "out"), "samples_per_shard": 5},
                cluster=dict(job_specs["generate"]["cluster"], cpus_per_actor=64, resources={"ssd": 1},
                             start_timeout_s=1))
    with pytest.raises(JobFailed, match="no actor became ready within 1s"):
        run_job(write_spec, spec)
    warned = [r.getMessage() for r in caplog.records
              if r.levelname == "WARNING" and "one actor needs" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(
        "cluster.cpus_per_actor / cluster.resources: one actor needs CPU 64, ssd 1, and no node of the Ray cluster has "
        "that much (its nodes: CPU ") and warned[0].endswith(
        "; the job waits up to cluster.start_timeout_s=1s for the autoscaler to add one"), warned


def test_connect_joins_the_cluster_at_an_address_within_the_bound(ray_address):
    """The one-attempt bound leaves joining a live cluster as it was, and the environment as it was."""
    probe = ("import json, os; from synthmill.cluster.connect import connect; r = connect(os.environ.pop('ADDR')); "
             "print('PROBE', json.dumps([r.get('CPU', 0), os.environ.get('RAY_gcs_server_port_wait_time_s')]))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", probe], env=dict(env, ADDR=ray_address), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the line marked PROBE: a driver of the session's cluster also gets its autoscaler's messages on stdout (an
    # earlier test's actor that no node holds: "No available node types can fulfill resource request ...")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert len(lines) == 1, proc.stdout
    cpus, wait_env = json.loads(lines[0][len("PROBE "):])
    assert cpus > 0 and wait_env is None, proc.stdout


# ---- `ray job submit -- synthmill run JOB.yaml` works unchanged ----
# (docs/design.md, "Command line (frozen: extend, don't rename)")

def test_ray_job_submit_runs_the_same_command(ray_cluster, tiny_sd, prompts_tsv, tmp_path):
    """The job server starts the entrypoint in its copy of ``--working-dir`` with RAY_ADDRESS set: the same
    command joins the cluster, reads the relative prompts path from that copy, and writes to the absolute
    output folder. A relative output.path there is exit 2 naming the field (each node would write into its own
    copy of the working dir), which the job's status and log say."""
    import shutil

    import yaml

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(prompts_tsv, work / "prompts.tsv")
    spec = base_spec(tiny_sd, "prompts.tsv", str(tmp_path / "out"))
    spec["prompts"]["limit"] = 3
    spec["sampling"]["images_per_prompt"] = 1
    spec["cluster"]["num_actors"] = 1
    (work / "job.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def submit(*overrides: str) -> subprocess.CompletedProcess:
        deadline = time.monotonic() + 60
        while True:
            proc = subprocess.run(["ray", "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir",
                                   str(work), "--", "synthmill", "run", "job.yaml", *overrides],
                                  env=env, capture_output=True, text=True, timeout=300)
            # a cluster seconds old: the head's dashboard agent has not registered yet (Ray says to try again)
            if "No available agent to submit job" not in proc.stderr or time.monotonic() > deadline:
                return proc
            time.sleep(1)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # two jobs at once: the second is refused while the first runs
        running = pool.submit(submit)
        refused = pool.submit(submit, "output.path=out").result()
        done = running.result()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "done: 3 samples in 1 shards at " + str(tmp_path / "out") in done.stdout, done.stdout[-3000:]
    assert sorted(os.listdir(tmp_path / "out" / "shards")) == ["000000.json", "000000.tar"]
    log = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "Job entrypoint command failed with exit code 2" in log, log[-3000:]
    assert "synthmill: error: field 'output.path': 'out' is relative, and this job runs in Ray's copy of its " \
           "working_dir (" in log, log[-3000:]
