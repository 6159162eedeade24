"""``synthmill status OUTPUT``: progress of any job's output, read from OUTPUT alone.

``plan.json`` names the job's kind (an output of the first versions, which wrote none, is a generate job);
the kind's runner (:data:`synthmill.jobs.kinds.KINDS`) reads and renders the rest. ``synthmill status JOB.yaml
[key=value ...]`` reads the spec's ``output.path`` with its ``storage`` options (an S3 endpoint or credentials
that only the spec holds).
"""

from __future__ import annotations

from typing import Any

from synthmill.errors import SpecError
from synthmill.jobs.kinds import KINDS
from synthmill.jobs.outputs import check_plan_matches_job
from synthmill.sharding import storage
from synthmill.sharding.layout import PLAN, OutputLayout

#: Seconds a storage outage may last while status reads before it gives up (as validation does).
RETRY_S = 10.0


def _check_plan(layout: OutputLayout, plan: dict[str, Any]) -> Any:
    """The runner of the plan's kind; SpecError naming plan.json when it lacks what status reads."""
    where = layout.file(PLAN)
    kind = plan.get("kind", "generate")
    if not isinstance(kind, str) or kind not in KINDS:
        raise SpecError(f"{where}: damaged, unknown job kind {kind!r}")
    runner = KINDS[kind].module()
    for key, want in runner.PLAN_KEYS.items():
        if not isinstance(plan.get(key), want) or isinstance(plan.get(key), bool):
            raise SpecError(f"{where}: damaged, its '{key}' is missing or not "
                            f"{'a number' if want is int else 'an object' if want is dict else 'text'}")
    problem = runner.check_plan(plan)
    if problem:
        raise SpecError(f"{where}: damaged, {problem}")
    return runner


def collect(output: str, opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """The state of an output folder, from its plan, markers, failures and summary (or metrics); ``opts`` are
    fsspec storage options (a spec's ``storage``)."""
    plan = storage.read_plan(output, opts)
    if plan is None:
        raise SpecError(f"{output}: not a synthmill output (no {PLAN})")
    layout = OutputLayout(output, opts)
    runner = _check_plan(layout, plan)
    check_plan_matches_job(layout.url, opts, plan)
    state = runner.status(layout, plan)
    return {**state, "output": output}


def render(st: dict[str, Any]) -> str:
    """One screen of text."""
    return KINDS[st["kind"]].module().render_status(st)
