"""The table of job kinds: what ``kind:`` in a spec may say, and what serves each.

A row names the kind's spec schema, the fields of it that may hold a local path (how the loader makes them
absolute and how actors check that they see them), and its runner module. The command line, the spec
loader and ``synthmill status`` know no kind by name: they look it up here. A new kind is one runner module
(with its spec schema) plus one row.

A runner module (imported only when its kind runs: the imports of a job cost seconds) provides:

- ``prepare(spec) -> Prepared``: check every input without loading a model or writing anything;
- ``plan_summary(prepared) -> dict``: what ``run --dry-run`` prints; ``ok_line(spec_path, plan)``, the line
  ``validate`` prints;
- ``run(prepared) -> dict``: run the job through :mod:`synthmill.jobs.lifecycle`, return its summary;
  ``done_line(summary, output)``, the line ``run`` prints at the end;
- ``PLAN_KEYS``: the ``plan.json`` keys ``status`` reads, with their types; ``status(layout, plan)`` and
  ``render_status(state)``: ``synthmill status`` of one of its outputs.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType

from synthmill.jobs import distill_spec, evaluate_spec, filter_spec, finetune_spec, generate_spec


@dataclass(frozen=True)
class JobKind:
    name: str
    spec: type  # the dataclass schema its YAML loads into
    paths: Mapping[str, str]  # dotted field -> how a local path in it is read (spec.resolve_paths)
    runner: str  # the module that prepares, runs and reports it

    def module(self) -> ModuleType:
        return importlib.import_module(self.runner)


KINDS: dict[str, JobKind] = {k.name: k for k in (
    JobKind("generate", generate_spec.GenerateSpec, generate_spec.PATHS, "synthmill.jobs.generate"),
    JobKind("evaluate", evaluate_spec.EvaluateSpec, evaluate_spec.PATHS, "synthmill.jobs.evaluate"),
    JobKind("distill", distill_spec.DistillSpec, distill_spec.PATHS, "synthmill.jobs.distill"),
    JobKind("filter", filter_spec.FilterSpec, filter_spec.PATHS, "synthmill.jobs.filter"),
    JobKind("finetune", finetune_spec.FinetuneSpec, finetune_spec.PATHS, "synthmill.jobs.finetune"),
)}
