"""Connecting to Ray: ``cluster.address``, else ``RAY_ADDRESS``, else a local in-process instance."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def connect(address: str | None = None) -> dict[str, float]:
    """Make sure this process is connected to a Ray cluster; return its total resources.

    An already-initialised Ray (a test session, a Ray job's driver) is reused as it is. Under
    ``ray job submit`` the job's environment sets ``RAY_ADDRESS``, so the same command works there.
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            ray.init(address=address, log_to_driver=True)
        else:  # "local": never join a cluster that happens to run on this machine unasked
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
        log.info("connected to Ray at %s", ray.get_runtime_context().gcs_address)
    return {k: float(v) for k, v in ray.cluster_resources().items()}


def actor_count(requested: int | str, resources: dict[str, float], cpus_per_actor: int) -> tuple[int, bool]:
    """(number of actors, use GPUs?): ``auto`` is one per GPU, or one per ``cpus_per_actor`` CPUs without GPUs."""
    gpus = int(resources.get("GPU", 0))
    if requested == "auto":
        if gpus:
            return gpus, True
        return max(1, int(resources.get("CPU", 1)) // cpus_per_actor), False
    return int(requested), gpus > 0
