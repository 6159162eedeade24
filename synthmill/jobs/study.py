"""Running a study: for each model a generate job into ``OUTPUT/models/NAME`` and an evaluate job of its images into
``OUTPUT/scores/NAME``, then the table (``table.json``, ``table.csv``, ``table.md``) and ``report.html``.

The sub-jobs are the generate and evaluate kinds' own runs, each through its lifecycle, so each resumes from
its own output and refuses its own conflicts (a model whose settings changed: named with the model). The study
itself keeps no state a rerun cannot rebuild: a model is done when its generate output is complete and its
evaluation is complete with nothing left to score.

Scoring overlaps generating (``_Pipeline``): the evaluation of model i runs on a thread of the driver from the
start of model i's generation, scoring each shard as it is committed, and model i+1 generates as soon as model
i's images are made; the scorer actors and the generator actors share the cluster.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from synthmill.errors import JobFailed, SpecError
from synthmill.jobs import evaluate, generate, lifecycle
from synthmill.jobs.evaluate_spec import PATHS as EVALUATE_PATHS
from synthmill.jobs.evaluate_spec import EvaluateSpec
from synthmill.jobs.generate_spec import PATHS as GENERATE_PATHS
from synthmill.jobs.generate_spec import GenerateSpec
from synthmill.jobs.outputs import VALIDATE_RETRY_S, check_output_folder, versions
from synthmill.jobs.study_spec import StudySpec
from synthmill.sharding import storage
from synthmill.sharding.layout import METRICS as METRICS_FILE
from synthmill.sharding.layout import SUMMARY, OutputLayout

log = logging.getLogger(__name__)

TABLE_JSON, TABLE_CSV, TABLE_MD, REPORT = "table.json", "table.csv", "table.md", "report.html"


@dataclass
class Part:
    """One model of the study: its generate and evaluate specs, and what of them is done."""

    name: str
    gen_spec: GenerateSpec
    eval_spec: EvaluateSpec
    gen: generate.Prepared
    generated: bool  # its generate output is complete
    scored: bool  # and its evaluation too, with nothing left to score


@dataclass
class Prepared:
    spec: StudySpec
    parts: list[Part] = field(default_factory=list)

    @property
    def layout(self) -> OutputLayout:
        return OutputLayout(self.spec.output.path, self.spec.storage)


def _complete(layout: OutputLayout, final: str) -> bool:
    result = layout.read_json(final)
    return isinstance(result, dict) and result.get("status") == "complete"


def _in_model(name: str, e: Exception) -> SpecError:
    return SpecError(f"model {name}: {e}")


# ---- each model's generate and evaluate specs ----

def model_generate_spec(spec: StudySpec, i: int) -> GenerateSpec:
    """Model ``i``'s generate spec (resolved and checked): the study's settings with its overrides."""
    m = spec.entries()[i]
    where = f"models[{i}] ({m.name})"
    sampling = {k: v for k, v in asdict(spec.sampling).items() if k != "scheduler"}
    scheduler = m.sampling.get("scheduler", spec.sampling.scheduler)
    base = {"model": {**spec.model, "path": m.path, **({"scheduler": scheduler} if scheduler else {})},
            "prompts": asdict(spec.prompts), "sampling": sampling,
            "output": {**asdict(spec.output), "path": spec.model_output(m.name)},
            "cluster": asdict(spec.cluster), "storage": dict(spec.storage)}
    over = {"model": dict(m.model), "sampling": {k: v for k, v in m.sampling.items() if k != "scheduler"},
            "cluster": dict(m.cluster)}
    return _checked(_build(GenerateSpec, [base, over], where), GENERATE_PATHS, where)


def model_evaluate_spec(spec: StudySpec, i: int) -> EvaluateSpec:
    """Model ``i``'s evaluate spec (resolved and checked): the study's ``evaluate`` on its images."""
    m = spec.entries()[i]
    base = {"generated": {"path": spec.model_output(m.name)}, "output": {"path": spec.scores_output(m.name)},
            "storage": dict(spec.storage)}
    over = {"cluster": {"address": spec.cluster.address}} if spec.cluster.address else {}
    built = _build(EvaluateSpec, [spec.evaluate, base, over], "evaluate")
    return _checked(built, EVALUATE_PATHS, f"evaluate (models[{i}] {m.name})")


def model_specs(spec: StudySpec) -> list[tuple[str, GenerateSpec, EvaluateSpec]]:
    """(name, generate spec, evaluate spec) of every model, each resolved and checked: a bad override or setting is
    a SpecError naming the model. The study spec gets the resolved paths (its job.yaml holds them)."""
    out = []
    for i, name in enumerate(spec.names):
        gen, ev = model_generate_spec(spec, i), model_evaluate_spec(spec, i)
        spec.models[i]["path"] = gen.model.path
        out.append((name, gen, ev))
    for dotted in EVALUATE_PATHS:
        section, _, leaf = dotted.partition(".")
        if out and isinstance(spec.evaluate.get(section), dict) and leaf in spec.evaluate[section]:
            spec.evaluate[section][leaf] = getattr(getattr(out[0][2], section), leaf)
    return out


def _build(schema: type, layers: list[dict[str, Any]], where: str) -> Any:
    """``schema`` with ``layers`` merged in order by OmegaConf in struct mode; an unknown key or a wrong type is a
    SpecError naming ``where``."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from synthmill.jobs.spec import _explain

    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), *(OmegaConf.create(layer) for layer in layers))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise SpecError(f"{where}: field '{missing[0]}' is required and has no value")
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _explain(e, schema, where) from None


def _checked(spec: Any, paths: dict[str, str], where: str) -> Any:
    """``spec`` with its paths resolved and its own checks passed; a SpecError says ``where`` it came from."""
    from synthmill.jobs.spec import check_output_outside_inputs, resolve_paths

    try:
        resolve_paths(spec, paths)
        spec.check()
        check_output_outside_inputs(spec, paths)
    except SpecError as e:
        raise SpecError(f"{where}: {e}") from None
    return spec


def prepare(spec: StudySpec) -> Prepared:
    """Check every model's generate and evaluate inputs and outputs without loading a model or writing anything."""
    specs = model_specs(spec)
    try:
        with storage.retry_budget(VALIDATE_RETRY_S):
            check_output_folder(spec.output.path, spec.fingerprint(), spec.storage, "study")
    except storage.StorageError as e:
        raise SpecError(f"output.path: {e}") from None
    p = Prepared(spec)
    for name, gen_spec, eval_spec in specs:
        try:
            gen = generate.prepare(gen_spec)
        except SpecError as e:
            raise _in_model(name, e) from None
        gen_layout = gen.layout
        done = generate.done_shards(gen_layout, range(gen.plan.num_shards), gen.shard_fingerprint(),
                                    gen_spec.output.resume_check)
        generated = len(done) == gen.plan.num_shards and _complete(gen_layout, SUMMARY)
        scored = False
        try:
            if generated:  # the images are there: the evaluation is checked whole
                ev = evaluate.prepare(eval_spec)
                scored = _complete(ev.layout, METRICS_FILE) and not evaluate.EvaluateJob(ev).todo
            else:
                evaluate.check_before_generated(eval_spec)
        except SpecError as e:
            raise _in_model(name, e) from None
        p.parts.append(Part(name, gen_spec, eval_spec, gen, generated, scored))
    return p


def plan_summary(p: Prepared) -> dict[str, Any]:
    """What ``--dry-run`` prints: each model's generate plan and whether it is generated and scored."""
    models = {}
    for part in p.parts:
        g = generate.plan_summary(part.gen)
        models[part.name] = {"path": part.gen_spec.model.path, "samples": g["samples"], "shards": g["shards"],
                             "shards_done": g["shards_done"], "generated": part.generated, "scored": part.scored}
    return {"kind": "study", "models": models, "metrics": p.spec.metric_columns(),
            "output": storage.redact_url(p.spec.output.path)}


def ok_line(spec_path: str, plan: dict[str, Any]) -> str:
    models = plan["models"]
    samples = {m["samples"] for m in models.values()}
    each = f"{samples.pop()} samples each" if len(samples) == 1 else "samples: " + ", ".join(
        f"{n} {m['samples']}" for n, m in models.items())
    return f"ok: {spec_path}: {len(models)} models ({', '.join(models)}), {each}; {', '.join(plan['metrics'])}"


def done_line(summary: dict[str, Any], output: str) -> str:
    if summary.get("complete_already"):
        return (f"done already: {summary['models']} models at {output}, complete since {summary['finished_at']}; "
                "nothing to run")
    ran = summary["models_run"]
    return (f"done: {summary['models']} models ({len(ran)} run: {', '.join(ran) or 'none'}) in "
            f"{summary['elapsed_s']:.1f}s -> {output}/{TABLE_MD}")


class StudyJob(lifecycle.Job):
    unit_noun = "models"

    def __init__(self, p: Prepared):
        self.p, self.spec, self.layout = p, p.spec, p.layout
        self.started = datetime.now(timezone.utc)
        self.t0 = time.perf_counter()
        self.todo = [part for part in p.parts if not part.scored]

    def kept(self) -> dict[str, Any] | None:
        if self.todo:
            return None
        finished = self.layout.read_json(SUMMARY)
        table = self.layout.read_json(TABLE_JSON)
        names = [part.name for part in self.p.parts]
        if (isinstance(finished, dict) and finished.get("status") == "complete" and isinstance(table, dict)
                and [r.get("model") for r in table.get("rows", [])] == names
                and all(r.get(f"{m}_published") == self.spec.published_of(r["model"]).get(m)
                        for r in table["rows"] for m in self.spec.metric_columns())):
            return {**finished, "complete_already": True}
        return None

    def pending(self) -> bool:
        return bool(self.todo)

    def plan(self) -> dict[str, Any]:
        return {"kind": "study", "fingerprint": self.spec.fingerprint(), "models": [part.name for part in self.p.parts],
                "seed": self.spec.sampling.seed, "prompts": storage.redact_url(self.spec.prompts.path)}

    def work(self, resources: dict[str, float]) -> dict[str, str]:
        return _Pipeline(self.todo).run()

    def failure_message(self, failures: dict[str, str]) -> str:
        return super().failure_message(failures) + " Run the same command again to resume them; done work is kept."

    def finish(self) -> dict[str, Any]:
        table = build_table(self.p)
        write_table(self.layout, table)
        report = write_report(self.layout)
        return {
            "status": "complete", "kind": "study", "models": len(self.p.parts),
            "models_run": [part.name for part in self.todo], "table": TABLE_JSON, "report": report,
            "elapsed_s": round(time.perf_counter() - self.t0, 3),
            "started_at": self.started.isoformat(timespec="seconds"),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(("synthmill",)),
        }


@dataclass
class _Generation:
    """What a model's scoring thread knows of its generate job: ended (returned, failed or raised), failed (its
    output will not be complete: the scoring stops), an actor starting (the scorers give it their place)."""

    ended: threading.Event = field(default_factory=threading.Event)
    failed: threading.Event = field(default_factory=threading.Event)
    starting: threading.Event = field(default_factory=threading.Event)


#: Seconds a scoring thread is given to stop once its generate job failed (it stops within a pool tick or two).
STOP_S = 60.0


class _Pipeline:
    """Each model's generate job, one after another on this thread; each model's evaluation on a thread of its own
    from the start of its generation (``evaluate.run_while_generated``: each shard is scored once it is committed),
    so the next model generates while the last one's remaining shards are scored. The scorer actors and the
    generator actors share the cluster (Ray places each as CPUs or GPUs free up); a model's scorers start once its
    first shard is committed, so they never hold the place its generators need, and free their places while one of
    its generators starts again (one that died), so a lost generator is replaced.

    A generate job that fails (its shards failed: JobFailed) is the model's failure, as when each job ran after the
    other: its scoring stops at once (what it committed is kept, nothing is merged) and the next model runs. One
    that raises stops every scoring thread and the study raises it."""

    def __init__(self, todo: list[Part]):
        self.todo = todo
        self.failures: dict[str, str] = {}
        self.lock = threading.Lock()

    def _fail(self, name: str, e: Exception) -> None:
        """The model's first failure is the one named (a failed generation, not the scoring it stopped)."""
        with self.lock:
            self.failures.setdefault(
                name, f"{type(e).__name__}: {e}" if not isinstance(e, (JobFailed, SpecError)) else str(e))

    def _score(self, part: Part, gen: _Generation | None) -> None:
        try:
            log.info("study: scoring %s", part.name)
            if gen is None:  # generated already: its evaluation as a job of its own
                evaluate.run(evaluate.prepare(part.eval_spec))
            else:
                evaluate.run_while_generated(part.eval_spec, gen.ended.is_set, part.gen.fingerprint,
                                             part.gen.plan.num_shards, gen.failed.is_set, gen.starting.is_set)
        except SpecError as e:
            self._fail(part.name, _in_model(part.name, e))
        except Exception as e:  # noqa: BLE001 - one model's failure is named; the others go on
            self._fail(part.name, e)

    def run(self) -> dict[str, str]:
        scoring: list[tuple[threading.Thread, _Generation | None]] = []
        errors: list[BaseException] = []

        def score(part: Part, gen: _Generation | None) -> None:
            thread = threading.Thread(target=self._guard(errors, self._score), args=(part, gen),
                                      name=f"score-{part.name}", daemon=True)
            thread.start()
            scoring.append((thread, gen))

        try:
            for part in self.todo:
                if part.generated:
                    score(part, None)
                    continue
                gen = _Generation()
                score(part, gen)
                log.info("study: generating %s", part.name)
                try:
                    generate.run(part.gen, gen.starting)
                except SpecError as e:
                    gen.failed.set()
                    raise _in_model(part.name, e) from None
                except JobFailed as e:
                    self._fail(part.name, e)  # named first: the scoring it stops fails after
                    gen.failed.set()
                    self._stop(scoring[-1][0], part.name)
                except BaseException:
                    gen.failed.set()
                    raise
                finally:
                    gen.ended.set()  # its evaluation scores the shards committed and ends
            for thread, _ in scoring:
                thread.join()
        finally:  # when the study raises: the scoring of the model whose generation raised stops (waited for)
            for thread, gen in scoring:
                if gen is not None:
                    gen.ended.set()
                if thread.is_alive():
                    if gen is not None and gen.failed.is_set():
                        self._stop(thread, thread.name[len("score-"):])
                    else:
                        thread.join(timeout=5)
        if errors:
            raise errors[0]
        return dict(sorted(self.failures.items()))

    @staticmethod
    def _stop(thread: threading.Thread, name: str) -> None:
        """Wait for a failed model's scoring thread to stop, so that the next model's generators find its place."""
        thread.join(timeout=STOP_S)
        if thread.is_alive():
            log.warning("study: the scoring of %s did not stop within %.0fs", name, STOP_S)

    @staticmethod
    def _guard(errors: list[BaseException], fn: Any) -> Any:
        def run(*args: Any) -> None:
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - raised again on the driver's thread
                errors.append(e)

        return run


# ---- the table ----

def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """metrics.json's numbers by table column: its plain numbers, and an Inception Score's mean and std."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
        elif key == "inception_score" and isinstance(value, dict):
            out["is_mean"], out["is_std"] = float(value["mean"]), float(value["std"])
    return out


def build_table(p: Prepared) -> dict[str, Any]:
    """``table.json``'s content: one row per model, in the order of ``models``."""
    spec = p.spec
    metrics = spec.metric_columns()
    columns = ["model", "path"]
    for m in metrics:
        columns += [m, f"{m}_published", f"{m}_difference"]
    columns += ["images_per_s", "unet_parameters", "pipeline_parameters", "samples"]
    rows = []
    for part in p.parts:
        gen_layout = OutputLayout(part.gen_spec.output.path, spec.storage)
        summary = gen_layout.read_json(SUMMARY) or {}
        result = OutputLayout(part.eval_spec.output.path, spec.storage).read_json(METRICS_FILE) or {}
        measured = _numbers(result.get("metrics") or {})
        published = spec.published_of(part.name)
        unet, pipeline = parameter_counts(part.gen_spec)
        row: dict[str, Any] = {"model": part.name, "path": storage.redact_url(part.gen_spec.model.path)}
        for m in metrics:
            value, paper = measured.get(m), published.get(m)
            row[m] = value
            row[f"{m}_published"] = paper
            row[f"{m}_difference"] = value - paper if value is not None and paper is not None else None
        row.update(images_per_s=float(summary.get("images_per_s") or 0.0), unet_parameters=unet,
                   pipeline_parameters=pipeline, samples=int(summary.get("samples") or 0))
        rows.append(row)
    return {"kind": "study", "metrics": metrics, "columns": columns, "rows": rows, "seed": spec.sampling.seed,
            "prompts": storage.redact_url(spec.prompts.path)}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def write_table(layout: OutputLayout, table: dict[str, Any]) -> None:
    """``table.json`` (numbers as they are), ``table.csv`` and ``table.md`` (six significant digits)."""
    layout.write_json(TABLE_JSON, table)
    columns = table["columns"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in table["rows"]:
        writer.writerow([_cell(row.get(c)) for c in columns])
    storage.write_bytes(layout.file(TABLE_CSV), buf.getvalue().encode(), layout.opts)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in table["rows"]]
    storage.write_bytes(layout.file(TABLE_MD), ("\n".join(lines) + "\n").encode(), layout.opts)


def write_report(layout: OutputLayout) -> str:
    """``report.html``: the page ``synthmill report OUTPUT`` gives (synthmill.jobs.report); its file name."""
    from synthmill.jobs.report import build_report

    html = build_report([layout.url], layout.opts)
    storage.write_bytes(layout.file(REPORT), html.encode(), layout.opts)
    return REPORT


# ---- parameter counts, from the safetensors headers (no weights are read) ----

def _header_count(path: str) -> int:
    import struct

    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def _weight_files(folder: str, variant: str | None) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    plain = [n for n in names if n.count(".") == 1]
    chosen = [n for n in names if f".{variant}." in n] if variant else plain
    return [os.path.join(folder, n) for n in (chosen or plain or names)]


def _local_folder(spec: GenerateSpec) -> str | None:
    path = spec.model.path
    if os.path.isdir(path):
        return path
    if "://" in path:
        return None
    try:  # a hub id: its files when the local cache holds them (nothing is downloaded)
        from huggingface_hub import snapshot_download

        return snapshot_download(path, revision=spec.model.revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, not a hub id: no count
        return None


def parameter_counts(spec: GenerateSpec) -> tuple[int | None, int | None]:
    """(UNet, whole pipeline) parameter counts of a model's safetensors weights; None where they cannot be read
    on this machine (a remote folder, a hub model not in the local cache, pickled weights)."""
    folder = _local_folder(spec)
    if folder is None:
        return None, None
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as fh:
            index = json.load(fh)
        counts = {}
        for name, value in index.items():
            sub = os.path.join(folder, name)
            if name.startswith("_") or not isinstance(value, list) or not os.path.isdir(sub):
                continue
            files = _weight_files(sub, spec.model.variant)
            if files:
                counts[name] = sum(_header_count(f) for f in files)
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    unet = counts.get("unet", counts.get("transformer"))
    return unet, (sum(counts.values()) if counts else None)


def run(p: Prepared) -> dict[str, Any]:
    """Generate and score every model not done yet, then write the table and the report."""
    return lifecycle.run(StudyJob(p))


# ---- synthmill status ----

#: plan.json keys that status reads, and their types
PLAN_KEYS = {"models": list, "fingerprint": str}


def check_plan(plan: dict[str, Any]) -> str | None:
    if not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in plan["models"]):
        return "its 'models' holds a name that is not a folder name"
    return None


def status(layout: OutputLayout, plan: dict[str, Any]) -> dict[str, Any]:
    """The state of a study: each model's generate and evaluate state (from their own outputs)."""
    from synthmill.jobs import status as job_status

    models = {}
    for name in plan["models"]:
        entry: dict[str, Any] = {}
        for part, folder in (("generate", "models"), ("evaluate", "scores")):
            url = storage.join(layout.url, folder, name)
            if storage.read_plan(url, layout.opts) is None:
                entry[part] = None
                continue
            entry[part] = job_status.collect(url, layout.opts)
        models[name] = entry
    summary = layout.read_json(SUMMARY)
    complete = (isinstance(summary, dict) and summary.get("status") == "complete"
                and all(m["evaluate"] and m["evaluate"]["complete"] for m in models.values()))
    return {"output": layout.url, "kind": "study", "complete": complete, "models": models}


def render_status(st: dict[str, Any]) -> str:
    lines = [f"output     {st['output']}", f"state      {'complete' if st['complete'] else 'incomplete'}"]
    for name, m in st["models"].items():
        g, e = m["generate"], m["evaluate"]
        gen = (f"{g['shards_done']} / {g['shards']} shards, {g['samples_done']} / {g['samples']} samples"
               + (" (complete)" if g["complete"] else "")) if g else "not started"
        lines.append(f"model      {name}: generate {gen}")
        if e:
            units = "; ".join(f"{s} {v['units_done']} / {v['units']} units" for s, v in e["sets"].items())
            numbers = ", ".join(f"{k} {v:.6g}" for k, v in _numbers(e["metrics"] or {}).items()
                                if k in ("fid", "is_mean", "clip_score"))
            lines.append(f"           evaluate {units}" + (f" (complete: {numbers})" if e["complete"] else ""))
        else:
            lines.append("           evaluate not started")
    return "\n".join(lines)
