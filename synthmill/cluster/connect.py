"""Connecting to Ray: ``cluster.address``, else ``RAY_ADDRESS``, else a local in-process instance."""

from __future__ import annotations

import glob
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

#: glibc malloc settings for actors and Ray Train workers that run torch on a CPU. Their networks run on
#: threads other than the process's main one (the generator's device thread, the scorer's Ray threads, Ray
#: Train's training thread), and glibc gives such threads their own arenas, which hand freed memory back
#: to the OS and fault it in again on the next allocation: with the full-size SD 1.5 UNet at 64x64 a
#: thread took 3.2x the main thread's page faults and ~25% longer per batch. One arena, a fixed mmap
#: threshold (32 MiB, the upper limit mallopt(3) documents for 64-bit systems) and no trimming keep freed
#: blocks under 32 MiB mapped for reuse: no faults for them after the first batch, on any thread, and the
#: same peak memory. glibc reads these once, at process start, so they go in through the runtime
#: environment. GPU actors and workers do not get them (their tensors are not malloc's; not measured).
CPU_MALLOC_ENV: dict[str, str] = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(2**40),
}
#: How long ``ray.init`` tries to reach the cluster at ``cluster.address`` / ``RAY_ADDRESS``. With Ray's defaults an
#: address nobody answers at fails only after ~14 minutes (Ray 2.60: 20 attempts, RAY_NUM_REDIS_GET_RETRIES, of
#: ~41 s each: RAY_gcs_rpc_server_connect_timeout_s=5 for the GCS channel and as much for its pubsub channel, then
#: RAY_py_gcs_connect_timeout_s=30 waiting for the GCS to answer, then a second's sleep; measured here, still
#: retrying when stopped after 5.5 minutes). One attempt (Ray reads RAY_gcs_server_port_wait_time_s as the number
#: of attempts) keeps Ray's waits within it and fails in ~41 s. Set while ``ray.init`` runs only; yours win.
CONNECT_ENV: dict[str, str] = {"RAY_gcs_server_port_wait_time_s": "1"}
_local_workers_inherit_malloc_env = False  # set by connect() when it starts a local Ray without GPUs
_started_local_ray = False  # set by connect() when it starts a local Ray; shutdown_local() stops it


def connect(address: str | None = None, dashboard: bool = False) -> dict[str, float]:
    """Make sure this process is connected to a Ray cluster; return its total resources.

    An already-initialised Ray (a test session, a Ray job's driver) is reused as it is. Under
    ``ray job submit`` the job's environment sets ``RAY_ADDRESS``, so the same command works there.
    ``dashboard``: a local Ray starts its dashboard (~0.8 s more here), which serves Ray's State API. Ray
    Train needs that: its placement-group cleaner asks the State API once a second whether the training
    controller is alive, and without it logs a warning each time (and could not clean up after a dead one).
    """
    import ray

    if not ray.is_initialized():
        with _keeping_sigterm_handler():
            _init(address, dashboard)
        log.info("connected to Ray at %s", ray.get_runtime_context().gcs_address)  # its SIGTERM handler undone
    return {k: float(v) for k, v in ray.cluster_resources().items()}


@contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """Keep this process's SIGTERM handler across ``ray.init``: Ray sets its own (Python's ``sys.exit(15)``, then
    its C++ core worker's, which prints a stack dump), and the caller's (the CLI's: stop like Ctrl-C, say how to
    resume, exit 143) would be lost. Only the main thread can set handlers."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _init(address: str | None, dashboard: bool) -> None:
    """``ray.init``: join the cluster at ``address`` (else RAY_ADDRESS), or start a local one."""
    import ray

    source = "cluster.address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _join(address, source)
    else:  # "local": never join a cluster that happens to run on this machine unasked
        global _local_workers_inherit_malloc_env, _started_local_ray
        if not _gpu_devices():
            # Every actor of a local Ray without GPUs runs on CPUs: Ray's processes inherit the settings
            # from here, so actors need no runtime environment of their own (one costs the first actor
            # ~0.7 s on a fresh local Ray, waiting for Ray's runtime-env agent).
            for k, v in CPU_MALLOC_ENV.items():
                os.environ.setdefault(k, v)
            _local_workers_inherit_malloc_env = True
        if dashboard and (missing := _dashboard_dependency_error()):
            # ray without its [default] extras (e.g. installed from a bare wheel): Ray would refuse to start
            log.warning("starting Ray without its dashboard (%s); Ray Train will warn that its State API is "
                        "unavailable", missing)
            dashboard = False
        # Ray turns token authentication on for a new local cluster when RAY_AUTH_MODE is unset, and warns that it
        # did on every start, a line about Ray's defaults on the first screen of every local run: it stays on,
        # without that line (Ray's warning that authentication is off, when RAY_AUTH_MODE=disabled, stays)
        logging.getLogger(_RAY_AUTH_LOGGER).addFilter(_quiet_token_auth_default)
        ray.init(address="local", include_dashboard=dashboard, log_to_driver=True)
        _started_local_ray = True


#: The logger of Ray's token-authentication set-up (Ray 2.60), and its message when it turns authentication on.
_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_TOKEN_AUTH_ENABLED = "Token authentication is enabled for this Ray cluster"


def _quiet_token_auth_default(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_TOKEN_AUTH_ENABLED)


def starts_local_ray(address: str | None = None) -> bool:
    """Whether :func:`connect` would start a local Ray (this machine its only node): no ``address``, no
    ``RAY_ADDRESS``, and no Ray already initialised in this process. Cheap: Ray is not imported for it."""
    if address or os.environ.get("RAY_ADDRESS"):
        return False
    ray = sys.modules.get("ray")
    return ray is None or not ray.is_initialized()


def _join(address: str, source: str) -> None:
    """``ray.init(address)``, within :data:`CONNECT_ENV`'s bound; a cluster that does not answer is a SpecError
    naming ``source`` (the setting that gave the address), raised before the job writes anything."""
    import ray

    from synthmill.errors import SpecError, first_line

    saved = {k: os.environ.get(k) for k in CONNECT_ENV}
    for k, v in CONNECT_ENV.items():
        os.environ.setdefault(k, v)
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, TimeoutError, ValueError) as e:  # no GCS there, Ray Client timed out, not an address
        raise SpecError(f"{source} {address}: no Ray cluster answers there ({first_line(e)}); give the address of a "
                        "running cluster's head (host:6379 by default), or leave cluster.address and RAY_ADDRESS "
                        "unset to start a local Ray") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _dashboard_dependency_error() -> str | None:
    """Why Ray's dashboard cannot start in this environment (a package of ``ray[default]`` missing), or None."""
    try:
        from ray._private.utils import get_dashboard_dependency_error
    except ImportError:  # a Ray without the check: let ray.init decide
        return None
    error = get_dashboard_dependency_error()
    return str(error) if error else None


def started_local_ray() -> bool:
    """Whether :func:`connect` started this process's Ray (one machine, stopped by :func:`shutdown_local`)."""
    return _started_local_ray


def shutdown_local(now: bool = False) -> None:
    """Stop the local Ray that :func:`connect` started in this process; a Ray it joined is left alone.

    ``ray.shutdown()`` stops Ray's processes one after the other, and its autoscaler monitor answers
    SIGTERM by trying to report to the GCS, which Ray has stopped just before: it sits out its whole
    second before Ray kills it. A local single-node Ray has nothing for the autoscaler to do, so the
    monitor is killed first; with the interpreter's exit-time shutdown (which waits 0.5 s for log lines)
    that took the end of a ``synthmill run`` from ~1.9 s to ~0.4 s here. Ray's internals may change: if the
    monitor cannot be found, Ray's own shutdown does the rest as before.

    ``now``: the process is about to end at once (``os._exit``, after SIGTERM): every process of the local Ray
    (every process this one started, and theirs: GCS, raylet, agents, workers) is killed, and this process does
    not disconnect from them. After a SIGTERM to the whole process group (a container stop) Ray's processes are
    stopping already, and the driver's orderly disconnect from them took 3 to 8 s here, most of the grace a
    container stop gives.
    """
    global _started_local_ray
    if not _started_local_ray:
        return
    _started_local_ray = False
    import ray

    if not ray.is_initialized():
        return
    if now:
        _kill_descendants()
        return
    try:
        from ray._private import ray_constants
        from ray._private.worker import _global_node

        for info in (_global_node.all_processes if _global_node else {}).get(ray_constants.PROCESS_TYPE_MONITOR, []):
            info.process.kill()
            info.process.wait(timeout=5)
    except Exception as e:  # noqa: BLE001 - an optimisation only; ray.shutdown() stops it anyway
        log.debug("could not stop Ray's autoscaler monitor first: %r", e)
    ray.shutdown()


def _kill_descendants(timeout_s: float = 5.0) -> None:
    """SIGKILL every process descended from this one (read from /proc: Linux), and wait until they are gone."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            found.append(pid)
            todo.append(pid)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    for pid in found:
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break  # a child of this process, reaped
            except ChildProcessError:  # not this process's child: gone once /proc no longer has it running
                try:
                    with open(f"/proc/{pid}/stat", "rb") as fh:
                        if fh.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                            break
                except OSError:
                    break
            time.sleep(0.02)


def actor_count(requested: int | str, resources: dict[str, float], cpus_per_actor: int) -> tuple[int, bool]:
    """(number of actors, use GPUs?): ``auto`` is one per GPU, or one per ``cpus_per_actor`` CPUs without GPUs."""
    gpus = int(resources.get("GPU", 0))
    if requested == "auto":
        if gpus:
            return gpus, True
        return max(1, int(resources.get("CPU", 1)) // cpus_per_actor), False
    return int(requested), gpus > 0


def check_actor_fits(cluster: Any, resources: dict[str, float]) -> None:
    """Say at once when no node of the cluster can hold one actor of ``cluster`` (an ``ActorClusterSpec``):
    see :func:`check_fits`. Ray would keep the actor pending, and the job would wait ``cluster.start_timeout_s``."""
    _, use_gpu = actor_count(cluster.num_actors, resources, cluster.cpus_per_actor)
    options = actor_options(cluster, use_gpu)
    need = {"CPU": options["num_cpus"], "GPU": options.get("num_gpus", 0), **options.get("resources", {})}
    check_fits("actor", need, "cluster.cpus_per_actor" + (" / cluster.resources" if cluster.resources else ""),
               f"the job waits up to cluster.start_timeout_s={cluster.start_timeout_s:g}s")


def check_fits(what: str, need: dict[str, float], fields: str, waits: str, count: int = 1,
               count_field: str = "") -> None:
    """Whether the live nodes of the cluster have ``need`` (Ray resources, set by ``fields``) for ``count`` of
    ``what`` at once (``count_field`` sets it: Ray Train starts all its workers together, in one placement
    group; an actor pool needs one actor to start).

    A local Ray that :func:`connect` started has no more to give: too little is bad input (exit 2, before
    anything is written). A joined cluster's autoscaler may still add nodes that fit: a warning, and the
    job ``waits``.
    """
    import ray

    from synthmill.errors import SpecError

    need = {k: float(v) for k, v in need.items() if v}
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    holds = sum(int(min(node.get(k, 0) // v for k, v in need.items())) if need else count for node in nodes)
    if holds >= count:
        return
    have = "; ".join(", ".join(f"{k} {node.get(k, 0):g}" for k in need) for node in nodes[:4])
    have += " ..." if len(nodes) > 4 else ""
    needs = ", ".join(f"{k} {v:g}" for k, v in need.items())
    if holds == 0:
        message = (f"{fields}: one {what} needs {needs}, and no node of the Ray cluster has that much "
                   f"(its nodes: {have})")
    else:
        message = (f"{count_field} / {fields}: {count} {what}s need {needs} each, all at once, and the Ray "
                   f"cluster holds {holds} at most (its nodes: {have})")
    if started_local_ray():
        raise SpecError(message)
    log.warning("%s; %s for the autoscaler to add %s", message, waits, "one" if holds == 0 else "nodes")


def _gpu_devices() -> bool:
    """Whether this machine shows an NVIDIA or AMD GPU device file (cheap: no CUDA, no NVML)."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")


def cpu_runtime_env() -> dict[str, Any]:
    """The runtime environment of an actor or Ray Train worker that runs torch on a CPU: :data:`CPU_MALLOC_ENV`
    (values the driver's environment sets win), or nothing when the local Ray this process started on a
    machine without GPUs passes them to every worker already."""
    if _local_workers_inherit_malloc_env:
        return {}
    return {"env_vars": {k: os.environ.get(k, v) for k, v in CPU_MALLOC_ENV.items()}}


def actor_options(cluster: Any, use_gpu: bool) -> dict[str, Any]:
    """Ray options for a generator or scorer actor of ``cluster`` (an ``ActorClusterSpec``).

    One GPU each on GPU clusters; on CPUs, :func:`cpu_runtime_env`. One concurrency slot more than the
    shards in flight, for ``progress()``.
    """
    options: dict[str, Any] = {"num_cpus": cluster.cpus_per_actor, "max_concurrency": cluster.inflight_per_actor + 1}
    if use_gpu:
        options["num_gpus"] = 1
    elif runtime_env := cpu_runtime_env():
        options["runtime_env"] = runtime_env
    if cluster.resources:
        options["resources"] = dict(cluster.resources)
    return options
