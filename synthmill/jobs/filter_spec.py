"""The ``kind: filter`` spec: which output to select from, by what condition, into which new output."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

from omegaconf import MISSING

from synthmill.jobs.fields import check_actor_pool, one_of, require
from synthmill.jobs.generate_spec import RESUME_CHECKS
from synthmill.sharding.plan import count
from synthmill.sharding.storage import REDACTED


@dataclass
class FilterSourceSpec:
    """A complete generate (or filter) output: its index.parquet, shards and markers."""

    path: str = MISSING


@dataclass
class FilterScoresSpec:
    """Per-sample scores to select by: an evaluate output holding ``scores.parquet``, or such a file itself."""

    path: Optional[str] = None


@dataclass
class FilterOutputSpec:
    path: str = MISSING
    samples_per_shard: int = 1000
    resume_check: str = "size"  # size | sha256: how a committed tar is checked against its marker


@dataclass
class FilterClusterSpec:
    """Ray settings of the copiers: CPU actors, one output shard at a time each (plus ``inflight_per_actor - 1``
    queued)."""

    address: Optional[str] = None  # else RAY_ADDRESS, else a local Ray instance
    num_actors: Union[int, str] = "auto"  # auto = one per cpus_per_actor CPUs of the cluster
    cpus_per_actor: int = 1
    inflight_per_actor: int = 2
    max_attempts: int = 3
    resources: Dict[str, float] = field(default_factory=dict)
    start_timeout_s: float = 600.0


#: The fields of a filter spec that may hold a local path, and how each is read (jobs/spec.resolve_paths).
PATHS = {"source.path": "input", "scores.path": "input", "output.path": "output"}


@dataclass
class FilterSpec:
    """A filter job: the samples of an output for which ``where`` holds, copied into a new output."""

    kind: str = "filter"
    source: FilterSourceSpec = field(default_factory=FilterSourceSpec)
    scores: FilterScoresSpec = field(default_factory=FilterScoresSpec)
    where: str = MISSING  # a DuckDB SQL condition over the source's index columns and the scores' columns
    output: FilterOutputSpec = field(default_factory=FilterOutputSpec)
    cluster: FilterClusterSpec = field(default_factory=FilterClusterSpec)
    storage: Dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        o, c = self.output, self.cluster
        require(bool(self.source.path.strip()), "source.path", "must not be empty")
        require(self.scores.path is None or bool(self.scores.path.strip()), "scores.path", "must not be empty")
        require(bool(self.where.strip()), "where", "must not be empty (a condition such as 'clip_score > 0.28')")
        require(bool(o.path.strip()), "output.path", "must not be empty")
        require(1 <= o.samples_per_shard <= 1_000_000, "output.samples_per_shard",
                f"must be in 1..1000000, got {o.samples_per_shard}")
        one_of(o.resume_check, RESUME_CHECKS, "output.resume_check")
        check_actor_pool(c)

    def fingerprint(self, inputs: dict[str, Any]) -> str:
        """Hash of what the output's bytes depend on: the source's identity (its job's fingerprint and its shards'
        sha256), the scores' sha256, the condition, the samples chosen (``selection``: a condition with
        ``random()`` chooses others on each run, which must not resume into one output) and the shard size.
        ``inputs``: the plan's ``source_fingerprint``, ``source_digest``, ``scores_sha256`` and
        ``selection_digest``."""
        basis = {**{k: inputs.get(k) for k in INPUT_KEYS}, "where": self.where,
                 "samples_per_shard": self.output.samples_per_shard}
        return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:16]

    def plan_mismatch(self, plan: dict[str, Any]) -> str | None:
        """How ``plan`` (an output's plan.json) disagrees with this spec (the output's job.yaml), or None."""
        samples, shards, per = (plan.get(k) for k in ("samples", "shards", "samples_per_shard"))
        mine = self.output.samples_per_shard
        if count(per) and per != mine:
            return f'its "samples_per_shard" is {per:,}, and output.samples_per_shard {mine:,}'
        if isinstance(samples, int) and isinstance(shards, int) and shards != -(-samples // mine):
            return (f'its "shards" is {shards:,}, and {samples:,} samples at output.samples_per_shard '
                    f'{mine:,} are {-(-samples // mine):,} shards')
        if all(k in plan for k in INPUT_KEYS) and REDACTED not in self.where:
            fingerprint = self.fingerprint(plan)
            if plan.get("fingerprint") != fingerprint:
                return f'its "fingerprint" is {plan.get("fingerprint")!r}, and these settings give {fingerprint!r}'
        return None


#: The plan.json keys that identify a filter's inputs (they enter its fingerprint).
INPUT_KEYS = ("source_fingerprint", "source_digest", "scores_sha256", "selection_digest")
