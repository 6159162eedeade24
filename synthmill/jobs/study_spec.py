"""The ``kind: study`` spec: a list of models, each generated with one protocol and scored with one evaluation.

A study builds, for each model, a generate spec and an evaluate spec of the kinds' own schemas: the study's
``prompts``, ``sampling``, ``output`` settings and ``cluster`` with the model's own overrides merged in by
OmegaConf (so a key those schemas lack is an unknown key, named with the model), and its ``evaluate`` section
with ``generated`` and ``output`` filled in. Model NAME writes ``OUTPUT/models/NAME`` and ``OUTPUT/scores/NAME``.
The runner (:func:`synthmill.jobs.study.model_specs`) builds and checks those specs: this module imports no loader.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from synthmill.errors import SpecError, first_line
from synthmill.jobs.evaluate_spec import EvaluateSpec
from synthmill.jobs.fields import require
from synthmill.jobs.generate_spec import ClusterSpec, OutputSpec, PromptsSpec, SamplingSpec

#: A model's name is one folder under OUTPUT/models and OUTPUT/scores: a word of letters, digits, ., _ and -.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

#: Published numbers may name a table column by the metric's short name.
PUBLISHED_ALIASES = {"is": "is_mean", "clip": "clip_score"}

#: The table columns each metric of ``evaluate.metrics`` gives (its numbers in metrics.json, an Inception Score's
#: mean and std flattened); a metric not listed gives the column of its own name.
METRIC_COLUMNS = {"fid": ("fid",), "fid_stats": (), "is": ("is_mean", "is_std"), "clip": ("clip_score",),
                  "kid": ("kid", "kid_std"), "precision_recall": ("precision", "recall", "f_score")}

#: Settings of the evaluate section a study fills in itself.
_FILLED = ("kind", "generated", "output", "storage")


@dataclass
class StudySamplingSpec(SamplingSpec):
    """A generate job's sampling, and the scheduler (``model.scheduler`` of each generate spec)."""

    scheduler: Optional[str] = None


@dataclass
class StudyModelSpec:
    """One row of the table: a model, and what of the study's settings it changes."""

    name: str = MISSING  # a folder-safe word: OUTPUT/models/NAME, OUTPUT/scores/NAME
    path: str = MISSING  # hub id or diffusers folder (model.path)
    model: Dict[str, Any] = field(default_factory=dict)  # model.* overrides (dtype, variant, ...)
    sampling: Dict[str, Any] = field(default_factory=dict)  # sampling.* overrides (scheduler, steps, ...)
    cluster: Dict[str, Any] = field(default_factory=dict)  # cluster.* overrides of its generate job


#: The fields of a study spec that may hold a local path (jobs/spec.resolve_paths); the models' and the
#: evaluation's are resolved in each generate and evaluate spec the study builds.
PATHS = {"prompts.path": "input", "output.path": "output"}


@dataclass
class StudySpec:
    """A study: every model generated from one prompt set with one protocol, each scored the same way."""

    kind: str = "study"
    models: List[Dict[str, Any]] = field(default_factory=list)  # each a StudyModelSpec (checked as one, by index)
    model: Dict[str, Any] = field(default_factory=dict)  # model.* settings every model shares
    prompts: PromptsSpec = field(default_factory=PromptsSpec)
    sampling: StudySamplingSpec = field(default_factory=StudySamplingSpec)
    evaluate: Dict[str, Any] = field(default_factory=dict)  # an evaluate spec without generated / output
    published: Dict[str, Dict[str, float]] = field(default_factory=dict)  # model -> metric -> a paper's number
    output: OutputSpec = field(default_factory=OutputSpec)  # path: the study's folder; the rest: each model's shards
    cluster: ClusterSpec = field(default_factory=ClusterSpec)  # the generate jobs' (evaluate.cluster: the scorers')
    storage: Dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        require(bool(self.models), "models", "must list at least one model ({name: ..., path: ...})")
        names: dict[str, int] = {}
        for i, m in enumerate(self.entries()):
            require(bool(NAME.fullmatch(m.name)) and m.name.strip(".") != "", f"models[{i}].name",
                    f"{m.name!r} is not a folder-safe word (letters, digits, '.', '_', '-'; at most 100)")
            require(m.name not in names, f"models[{i}].name",
                    f"{m.name!r} is also the name of models[{names.get(m.name)}]; each model needs its own")
            names[m.name] = i
        for key in _FILLED:
            require(key not in self.evaluate, f"evaluate.{key}",
                    "is set by the study (each model's images, OUTPUT/scores/NAME, the study's storage); remove it")
        for name, numbers in self.published.items():
            require(name in names, f"published.{name}",
                    f"no model of that name in models ({', '.join(names)})")
            for key in numbers:
                column = PUBLISHED_ALIASES.get(key, key)
                require(column in self.metric_columns(), f"published.{name}.{key}",
                        f"not a column of this study's table ({', '.join(self.metric_columns())})")

    def entries(self) -> list[StudyModelSpec]:
        """The models, each checked against :class:`StudyModelSpec` (an unknown key is named with its index)."""
        return [_entry(i, m) for i, m in enumerate(self.models)]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.entries()]

    def metric_columns(self) -> list[str]:
        """The table's metric columns, in the order of ``evaluate.metrics``."""
        metrics = self.evaluate.get("metrics") or EvaluateSpec().metrics
        return [c for m in metrics for c in METRIC_COLUMNS.get(m, (m,))]

    def published_of(self, name: str) -> dict[str, float]:
        """Model ``name``'s published numbers, by table column."""
        return {PUBLISHED_ALIASES.get(k, k): float(v) for k, v in (self.published.get(name) or {}).items()}

    def model_output(self, name: str) -> str:
        from synthmill.sharding import storage

        return storage.join(self.output.path, "models", name)

    def scores_output(self, name: str) -> str:
        from synthmill.sharding import storage

        return storage.join(self.output.path, "scores", name)

    def fingerprint(self) -> str:
        """What the study's own folder is claimed by. It is the same for every study: the models' settings are
        each in its own outputs' fingerprints (a changed model is refused there, by name), and a model added to
        the list is more of the same study."""
        return hashlib.sha256(b"synthmill study 1").hexdigest()[:16]

    def plan_mismatch(self, plan: dict[str, Any]) -> str | None:
        if plan.get("fingerprint") != self.fingerprint():
            return f'its "fingerprint" is {plan.get("fingerprint")!r}, and a study\'s is {self.fingerprint()!r}'
        return None


def _entry(i: int, m: dict[str, Any]) -> StudyModelSpec:
    """``models[i]`` as a :class:`StudyModelSpec`; a SpecError naming ``models[i]`` for an unknown key or type."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    known = [f.name for f in fields(StudyModelSpec)]
    unknown = [k for k in m if k not in known]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), known, n=1)
        hint = f"; did you mean 'models[{i}].{close[0]}'?" if close else ""
        raise SpecError(f"models[{i}]: unknown key '{unknown[0]}'{hint} (known keys here: {', '.join(known)})")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(StudyModelSpec), OmegaConf.create(dict(m)))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise SpecError(f"field 'models[{i}].{missing[0]}' is required and has no value")
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise SpecError(f"field 'models[{i}]{'.' + key if key else ''}': {first_line(e)}") from None
