"""The one order every job kind runs in (docs/design.md, invariants 3 and 4).

1. A complete earlier run of the same job is kept as it is (``kept``): nothing is connected or rewritten.
2. Ray is connected before anything is written, when there is work to do: a cluster that cannot be
   reached, or cannot hold the job's actors, is bad input and leaves no trace (``placed``).
3. ``plan.json`` first, then ``job.yaml``. plan.json makes the folder this job's (a run killed after it
   resumes): it is created exclusively, so of two different jobs started into one folder at once only one runs,
   and it is only ever replaced by this same job's (``outputs.claim_output``).
4. The job's final file (``summary.json`` or ``metrics.json``), its commit, is withdrawn while work is redone.
5. The kind's own work. Units that failed every attempt go to ``failures.json`` and fail the job (exit 1;
   the same command retries them); otherwise ``failures.json`` goes.
6. The kind's closing work (``finish``: merging the index, the metrics, exporting a model).
7. Temporaries that killed runs left anywhere in a local output, older than this run's start, go (newer
   ones may belong to another run into the same folder, still writing).
8. The final file, last.

A kind gives its own steps as a :class:`Job`; the driver holds nothing a rerun cannot rebuild from the output.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from typing import Any

from synthmill.errors import JobFailed
from synthmill.jobs.outputs import claim_output, write_job_yaml
from synthmill.sharding import storage
from synthmill.sharding.layout import FAILURES, LOGS, OutputLayout

log = logging.getLogger(__name__)


class Job(ABC):
    """One run of a job kind: the steps of the lifecycle that are its own. Subclasses set ``spec`` and
    ``layout``, give ``plan`` and ``finish``, and override what else they need (the defaults do nothing)."""

    spec: Any
    layout: OutputLayout
    final_file: str = "summary.json"
    dashboard: bool = False  # connect Ray with its dashboard (Ray Train needs it)
    unit_noun: str = "units"  # how failures.json and the failure line name what failed

    def kept(self) -> dict[str, Any] | None:
        """The result of a complete earlier run of this same job, returned as it is; None to run."""
        return None

    def pending(self) -> bool:
        """Whether there is work for the cluster (then Ray is connected first)."""
        return False

    # a hook, not abstract: its default checks nothing
    def placed(self, resources: dict[str, float]) -> None:  # noqa: B027
        """After connecting: check that the cluster can run the work (SpecError if it cannot)."""

    @abstractmethod
    def plan(self) -> dict[str, Any]:
        """The content of ``plan.json``."""

    def work(self, resources: dict[str, float]) -> dict[str, str]:
        """Do the pending work; return the units that failed every attempt (name -> error)."""
        return {}

    def failures_record(self, failures: dict[str, str]) -> dict[str, Any]:
        """The content of ``failures.json``."""
        return {f"failed_{self.unit_noun}": failures}

    def failure_message(self, failures: dict[str, str]) -> str:
        names = ", ".join(list(failures)[:10]) + (" ..." if len(failures) > 10 else "")
        return f"{len(failures)} {self.unit_noun} failed ({names}); first error: {next(iter(failures.values()))}."

    @abstractmethod
    def finish(self) -> dict[str, Any]:
        """The closing work; returns the content of the final file."""


def _logs_of_this_run(layout: OutputLayout, since: float) -> str:
    """The end of the failure line, ``Full tracebacks: URL/logs/ (N files of this run).``, when this run's actors
    left failure logs; "" otherwise.

    The logs are named by the time their run started (``cluster.pool.FailureLog``), so this run's sort at or
    after ``since`` to the second; earlier runs' files are not counted."""
    try:
        names = storage.list_sizes(layout.file(LOGS), layout.opts)
    except Exception:  # noqa: BLE001 - the failure line must come out even when the listing cannot
        return ""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(int(since)))
    ours = [n for n in names if n.endswith(".log") and n[:len(stamp)] >= stamp]
    if not ours:
        return ""
    files = f"{len(ours)} file{'s' * (len(ours) > 1)}"
    return f" Full tracebacks: {storage.redact_url(layout.file(LOGS))}/ ({files} of this run)."


def run(job: Job) -> dict[str, Any]:
    """Run ``job`` through the lifecycle above; return its final file's content."""
    from synthmill.cluster.connect import connect

    wall0 = time.time()
    layout = job.layout
    kept = job.kept()
    if kept is not None:
        storage.remove_stale_temporaries(layout.url, wall0)
        return kept
    pending = job.pending()
    resources: dict[str, float] = {}
    if pending:
        resources = connect(job.spec.cluster.address, dashboard=job.dashboard)
        job.placed(resources)
    claim_output(layout, job.plan())  # plan.json: created exclusively, or found to be this same job's
    write_job_yaml(job.spec, layout)
    if pending:
        layout.remove(job.final_file)
        failures = job.work(resources)
        if failures:
            layout.write_json(FAILURES, job.failures_record(failures))
            raise JobFailed(job.failure_message(failures) + _logs_of_this_run(layout, wall0))
    layout.remove(FAILURES)
    result = job.finish()
    storage.remove_stale_temporaries(layout.url, wall0)
    layout.write_json(job.final_file, result)
    return result
