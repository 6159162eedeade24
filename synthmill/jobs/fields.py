"""What every job spec schema shares: checks that name the field they reject, and the cluster section.

The schemas (``generate_spec``, ``evaluate_spec``, ``distill_spec``) import these; the loader
(:mod:`synthmill.jobs.spec`) imports the schemas through the table of job kinds, never the other way.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

from synthmill.errors import SpecError


def require(cond: bool, field: str, message: str) -> None:
    """Raise a :class:`SpecError` naming ``field`` unless ``cond`` holds."""
    if not cond:
        raise SpecError(f"field '{field}': {message}")


def one_of(value: Any, known: Any, field: str) -> None:
    """Raise a :class:`SpecError` unless ``value`` is one of ``known`` (listed in the message)."""
    if value not in known:
        close = difflib.get_close_matches(str(value), [str(k) for k in known], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise SpecError(f"field '{field}': unknown value {value!r}{hint} (known: {', '.join(map(str, known))})")


@dataclass
class ActorClusterSpec:
    """Ray settings every job kind with an actor pool shares; a kind's own section adds to these."""

    address: Optional[str] = None  # else RAY_ADDRESS, else a local Ray instance
    num_actors: Union[int, str] = "auto"  # auto = one per GPU (CPU-only: one per cpus_per_actor CPUs)
    batch_size: int = 8
    cpus_per_actor: int = 1  # on CPU also the actor's torch thread count
    inflight_per_actor: int = 2  # work items queued per actor, so I/O overlaps compute
    max_attempts: int = 3  # per work item; an attempt ends in an error or with its actor's death
    resources: Dict[str, float] = field(default_factory=dict)  # extra Ray resources per actor (node labels)
    start_timeout_s: float = 1800.0  # fail if no actor is ready for this long (model download included)


def require_count_or_auto(value: Any, field: str) -> None:
    """A count of actors or workers: ``auto`` or an integer >= 1."""
    ok = value == "auto" if isinstance(value, str) else value >= 1
    require(ok, field, f"must be 'auto' or an integer >= 1, got {value!r}")


def check_cluster(c: Any) -> None:
    """The ``cluster`` settings every job kind with batched actors shares: counts, batch, retries, resources."""
    require(1 <= c.batch_size <= 4096, "cluster.batch_size", f"must be in 1..4096, got {c.batch_size}")
    check_actor_pool(c)


def check_actor_pool(c: Any) -> None:
    """The ``cluster`` settings of any actor pool (``cluster.pool.ShardPool``): counts, retries, resources."""
    require_count_or_auto(c.num_actors, "cluster.num_actors")
    require(c.cpus_per_actor >= 1, "cluster.cpus_per_actor", f"must be >= 1, got {c.cpus_per_actor}")
    require(1 <= c.inflight_per_actor <= 16, "cluster.inflight_per_actor",
            f"must be in 1..16, got {c.inflight_per_actor}")
    require(1 <= c.max_attempts <= 100, "cluster.max_attempts", f"must be in 1..100, got {c.max_attempts}")
    require(c.start_timeout_s > 0, "cluster.start_timeout_s", f"must be > 0, got {c.start_timeout_s}")
    check_resources(c.resources, "cluster.cpus_per_actor")


#: Largest seed: seeds go to torch.Generator.manual_seed and index columns as signed 64-bit integers.
MAX_SEED = 2**63 - 1


def check_resources(resources: dict[str, float], cpus_field: str) -> None:
    """Extra Ray resources: positive amounts, and not CPU or GPU, which Ray takes only as counts of their own."""
    for name, amount in resources.items():
        require(name not in ("CPU", "GPU"), f"cluster.resources.{name}",
                f"is set by synthmill ({cpus_field}; one GPU each where the cluster has GPUs), not here")
        require(amount > 0, f"cluster.resources.{name}", f"must be > 0, got {amount}")
