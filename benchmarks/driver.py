"""Driver scale: a 10,000,000-row dry run and the actor pool's dispatch overhead per shard, same-run baselines.

1. Planning. A parquet prompt source of ``--rows`` rows (one string column ``caption``, real COCO captions
   of ``configs/prompts/coco2014_5k_captions.tsv`` repeated in order, ``--row-groups`` row groups) is
   written to a temp folder, with a generate spec like ``configs/quickstart.yaml`` whose ``prompts.path``
   points at it (``model.path: segmind/tiny-sd``, a hub id; ``samples_per_shard`` 1000, so 10,000 shards;
   ``cluster.address`` set, as a job this size runs on a cluster: the dry run never connects to it).
   Each of these runs in a fresh child process from the repository root, ``--repeats`` times, interleaved:

   (a) ``python -c "import synthmill.cli"``: the interpreter and the CLI module alone;
   (b) ``python -c "import synthmill.jobs.generate, synthmill.jobs.evaluate, synthmill.jobs.distill"``:
       the job modules that ``synthmill run`` imports before it reads any spec (``cli._job_module``);
   (c) ``python -m synthmill.cli run spec.yaml --dry-run`` on a ``--base-rows`` (1,000-row) parquet;
   (d) the same dry run on the ``--rows``-row parquet.

   Reported: wall seconds and CPU seconds (user + system, from the same rusage; less sensitive to other
   load on the machine), each the best of the repeats, and the child's peak RSS (the largest of the repeats).
   Peak RSS is ``ru_maxrss`` of the rusage that ``os.wait4`` returns for that one child (the per-child
   form of ``resource.getrusage(RUSAGE_CHILDREN)``, so no other child's peak can leak into a row;
   psutil is not used). Each child is started and timed by a small launcher process (``LAUNCHER``), not
   by this process: Linux counts the RSS a child had when it was forked, and this process holds pyarrow.
   Ratios: (d)/(c) shows how the dry run's cost grows with 10,000x the rows, (d)/(a) what it costs over
   a bare interpreter with the CLI imported. Checked on every dry run: the plan it
   prints has the expected prompts and shards, and ``output.path`` does not exist afterwards. Once more,
   untimed, the dry run is called in-process through ``synthmill.cli.main`` in a child that then reports
   whether Ray is initialized and whether diffusers was ever imported (neither may be: a dry run starts
   no Ray and loads no model). The children get ``HF_HUB_OFFLINE=1``, so a dry run that tried to
   download ``segmind/tiny-sd`` would fail instead of silently passing (``check_model_path`` then asks the
   hub nothing; online it makes one HEAD request for the id's ``model_index.json``, left out here).

2. Dispatch. A local Ray is started in this process (``ray.init(address="local")``; ``--ray-address``
   joins a running one instead) and ``--actors`` no-op actors (``num_cpus=0``, so they fit on any machine;
   ``max_concurrency = inflight + 1`` and ``max_restarts=0`` as the generate job creates its actors):
   ``ready()`` returns an info dict and ``process_shard(k, attempt)`` returns a minimal marker dict at once.
   Over ``--shards`` shards, with the same actors, already started and warmed up (actor start-up is left
   out of both):

   (e) a plain Ray loop: ``--inflight`` calls queued per actor, ``ray.wait(num_returns=1)`` on all calls
       in flight, the actor that answered gets the next shard;
   (f) synthmill's ``ShardPool(num_actors, inflight=...)`` handing out the same shards through
       ``pool.run(shard_ids, on_result)`` (its ``ready()`` round trip and the final ``ray.kill`` of the
       actors included; no progress bar).

   Reported: seconds, ms per shard and the driver's own CPU ms per shard (``time.process_time`` of this
   process), best of ``--repeats`` (fresh actors each repeat, (e) then (f)); the ratio (f)/(e) per shard.
   Ray is shut down at the end.

    python -m benchmarks driver            # the numbers in RESULTS.md: 10,000,000 rows; 2,000 shards on 8 actors
    python -m benchmarks driver --smoke    # 20,000 rows, no (b); 200 shards on 2 actors;
                                           # what tests/test_benchmarks.py runs
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROMPTS_TSV = REPO / "configs" / "prompts" / "coco2014_5k_captions.tsv"
MODEL = "segmind/tiny-sd"  # a hub id, as in configs/quickstart.yaml: a dry run must not contact the hub
CLUSTER = "ray-head.invalid:6379"  # the spec's cluster.address: the dry run plans for a cluster, never joins it
SMOKE = {"rows": 20_000, "shards": 200, "actors": 2, "repeats": 1}


# -- 1. planning: the dry run in a child process -------------------------------------------------------


def write_prompts(path: str, rows: int, row_groups: int) -> float:
    """A parquet file of ``rows`` COCO captions (the TSV's 5,000 in order, repeated) in ``row_groups``
    row groups; returns the seconds it took."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    with open(PROMPTS_TSV, encoding="utf-8", newline="") as fh:
        captions = pa.array([row["caption"] or "" for row in csv.DictReader(fh, delimiter="\t")], pa.string())
    per_group = -(-rows // row_groups)
    with pq.ParquetWriter(path, pa.schema([("caption", pa.string())])) as writer:
        for lo in range(0, rows, per_group):
            take = np.arange(lo, min(rows, lo + per_group)) % len(captions)
            writer.write_table(pa.table({"caption": captions.take(pa.array(take))}), row_group_size=per_group)
    return time.perf_counter() - t0


def write_spec(path: str, prompts: str, output: str, samples_per_shard: int) -> None:
    """configs/quickstart.yaml with the parquet as the prompt source and ``output`` as output.path."""
    import yaml

    spec = {
        "kind": "generate",
        "model": {"path": MODEL, "dtype": "auto"},
        "prompts": {"path": prompts, "column": "caption"},
        "sampling": {"steps": 25, "guidance_scale": 7.5, "height": 512, "width": 512, "seed": 0},
        "output": {"path": output, "format": "png", "samples_per_shard": samples_per_shard},
        # a 10M-prompt job runs on a cluster, whose nodes' caches may hold the hub id: validation does not
        # require it in this machine's cache (a local Ray would), and a dry run never connects
        "cluster": {"address": CLUSTER, "num_actors": "auto", "batch_size": 8},
    }
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(spec, fh, sort_keys=False)


def child_env() -> dict[str, str]:
    """This environment less RAY_ADDRESS, with the hub switched off (HF_HUB_OFFLINE=1)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HF_HUB_OFFLINE"] = "1"
    return env


@dataclass
class ChildRun:
    """One child process: its wall seconds, CPU seconds (user + system), peak RSS (bytes) and stdout."""

    seconds: float
    cpu_s: float
    peak_rss: int
    stdout: str


#: Starts one command, reaps it with ``os.wait4`` and prints its wall seconds and rusage as JSON. A child
#: forked from this (big) benchmark process would report at least this process's RSS as its own peak:
#: Linux keeps the larger of the pre-exec and post-exec high-water marks in ``ru_maxrss``. Started from
#: this small launcher instead, a child's floor is the launcher's few MiB, below any Python's own.
LAUNCHER = """\
import json, os, subprocess, sys, time
with open(sys.argv[2], "wb") as out, open(sys.argv[3], "wb") as err:
    t0 = time.perf_counter()
    proc = subprocess.Popen(json.loads(sys.argv[1]), stdout=out, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "seconds": seconds,
                  "cpu_s": usage.ru_utime + usage.ru_stime, "maxrss": usage.ru_maxrss}))
"""


def run_child(cmd: list[str], what: str) -> ChildRun:
    """Run ``cmd`` from the repository root through :data:`LAUNCHER`: its wall time and own peak RSS."""
    with tempfile.TemporaryDirectory(prefix="synthmill-bench-child-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = subprocess.run([sys.executable, "-c", LAUNCHER, json.dumps(cmd), out, err], cwd=REPO,
                              env=child_env(), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"the launcher for {what} exited with {proc.returncode}: {proc.stderr[-4000:]}")
        result = json.loads(proc.stdout)
        with open(out, encoding="utf-8", errors="replace") as fh:
            stdout = fh.read()
        with open(err, encoding="utf-8", errors="replace") as fh:
            stderr = fh.read()
    if result["code"] != 0:
        raise RuntimeError(f"{what} exited with {result['code']}: {' '.join(cmd)}\n{(stdout + stderr)[-4000:]}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return ChildRun(result["seconds"], result["cpu_s"], result["maxrss"] * scale, stdout)


IMPORT_JOBS = "import synthmill.jobs.generate, synthmill.jobs.evaluate, synthmill.jobs.distill"

#: Runs the dry run in-process, then reports what it left behind in that process.
CHECK_NO_RAY = """\
import contextlib, io, json, sys
from synthmill.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main(["run", sys.argv[1], "--dry-run"])
ray = sys.modules.get("ray")
print(json.dumps({"code": code, "ray_imported": ray is not None,
                  "ray_initialized": bool(ray is not None and ray.is_initialized()),
                  "diffusers_imported": "diffusers" in sys.modules, "torch_imported": "torch" in sys.modules}))
"""


@dataclass
class PlanRow:
    """One row of the planning table: best wall and CPU seconds and largest peak RSS over the repeats."""

    name: str
    rows: int | None
    shards: int | None
    seconds: list[float]
    cpu_s: list[float]
    peak_rss: list[int]

    @property
    def best_s(self) -> float:
        return min(self.seconds)

    @property
    def best_cpu_s(self) -> float:
        return min(self.cpu_s)

    @property
    def rss_mib(self) -> float:
        return max(self.peak_rss) / 2**20


def dry_run_plan(stdout: str, rows: int, samples_per_shard: int, output: str, what: str) -> dict[str, Any]:
    """The JSON plan a dry run printed, checked against the file's rows; and that output.path is absent."""
    plan = json.loads(stdout)
    shards = -(-rows // samples_per_shard)
    if plan["prompts"] != rows or plan["shards"] != shards or plan["shards_done"] != 0:
        raise RuntimeError(f"{what}: the dry run planned {plan}, expected {rows} prompts in {shards} shards")
    if os.path.exists(output):
        raise RuntimeError(f"{what}: the dry run created the output folder {output}")
    return plan


def measure_planning(work: str, rows: int, base_rows: int, row_groups: int, samples_per_shard: int,
                     repeats: int, job_imports: bool = True) -> tuple[list[PlanRow], dict[str, Any]]:
    """Write both parquet files and specs, run (a)-(d) ``repeats`` times interleaved (without (b) unless
    ``job_imports``), check the dry run."""
    files = {}
    for n in (base_rows, rows):
        parquet = os.path.join(work, f"prompts-{n}.parquet")
        write_s = write_prompts(parquet, n, min(row_groups, n))
        spec, output = os.path.join(work, f"spec-{n}.yaml"), os.path.join(work, f"out-{n}")
        write_spec(spec, parquet, output, samples_per_shard)
        files[n] = (spec, output)
        print(f"wrote {parquet}: {n:,} rows in {min(row_groups, n)} row groups, "
              f"{os.path.getsize(parquet) / 2**20:.1f} MiB, in {write_s:.2f} s", flush=True)

    py = sys.executable
    runs: list[tuple[str, int | None, list[str], str | None]] = [
        ("(a) `python -c \"import synthmill.cli\"`", None, [py, "-c", "import synthmill.cli"], None),
        ("(b) `python -c \"import synthmill.jobs.{generate,evaluate,distill}\"`", None, [py, "-c", IMPORT_JOBS], None),
        (f"(c) `synthmill run --dry-run`, {base_rows:,} rows", base_rows,
         [py, "-m", "synthmill.cli", "run", files[base_rows][0], "--dry-run"], files[base_rows][1]),
        (f"(d) `synthmill run --dry-run`, {rows:,} rows", rows,
         [py, "-m", "synthmill.cli", "run", files[rows][0], "--dry-run"], files[rows][1]),
    ]
    table = [PlanRow(name, n, -(-n // samples_per_shard) if n else None, [], [], []) for name, n, _, _ in runs]
    for r in range(repeats):
        for row, (name, n, cmd, output) in zip(table, runs, strict=True):
            if cmd[-1] == IMPORT_JOBS and not job_imports:
                continue
            child = run_child(cmd, name)
            if n is not None:
                dry_run_plan(child.stdout, n, samples_per_shard, output, name)
            row.seconds.append(child.seconds)
            row.cpu_s.append(child.cpu_s)
            row.peak_rss.append(child.peak_rss)
        print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{row.name.split()[0]} {row.seconds[-1]:.2f} s "
                                                       f"(CPU {row.cpu_s[-1]:.2f} s) "
                                                       f"{row.peak_rss[-1] / 2**20:.0f} MiB"
                                                       for row in table if row.seconds),
              flush=True)
    spec, output = files[rows]
    check = json.loads(run_child([py, "-c", CHECK_NO_RAY, spec], "in-process dry run").stdout)
    if check["code"] != 0 or check["ray_initialized"] or check["diffusers_imported"] or os.path.exists(output):
        raise RuntimeError(f"the dry run started Ray, imported diffusers or wrote {output}: {check}")
    check["output_created"] = os.path.exists(files[base_rows][1]) or os.path.exists(output)
    return table, check


# -- 2. dispatch: ShardPool vs a plain ray.wait loop over no-op actors ---------------------------------


class NoopShardActor:
    """What ``ShardPool`` expects of an actor (as ``GeneratorActor``), doing no work."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def ready(self) -> dict[str, Any]:
        return {"pid": self.pid, "device": "none"}

    def process_shard(self, k: int, attempt: int = 1) -> dict[str, Any]:
        return {"shard": k, "count": 0, "attempt": attempt, "pid": self.pid}


def start_actors(n: int, inflight: int, warmup: int) -> list[Any]:
    """``n`` no-op actors, ready, each having answered ``warmup`` process_shard calls."""
    import ray

    cls = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=inflight + 1)(NoopShardActor)
    actors = [cls.remote() for _ in range(n)]
    ray.get([a.ready.remote() for a in actors])
    ray.get([a.process_shard.remote(-1 - i) for a in actors for i in range(warmup)])
    return actors


def plain_loop(actors: list[Any], shards: int, inflight: int) -> dict[int, Any]:
    """(e) ``inflight`` calls queued per actor; whichever answers gets the next shard."""
    import ray

    todo = iter(range(shards))
    pending: dict[Any, tuple[int, Any]] = {}
    for actor in actors:
        for _ in range(inflight):
            k = next(todo, None)
            if k is not None:
                pending[actor.process_shard.remote(k, 1)] = (k, actor)
    results: dict[int, Any] = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            k, actor = pending.pop(ref)
            results[k] = ray.get(ref)
            nxt = next(todo, None)
            if nxt is not None:
                pending[actor.process_shard.remote(nxt, 1)] = (nxt, actor)
    return results


def pool_loop(actors: list[Any], shards: int, inflight: int, fresh: Callable[[], Any]) -> dict[int, Any]:
    """(f) synthmill's ShardPool over the started ``actors`` (a replacement, if it asks, from ``fresh``)."""
    from synthmill.cluster.pool import ShardPool

    handles = iter(actors)
    pool = ShardPool(lambda: next(handles, None) or fresh(), len(actors), inflight=inflight)
    markers: dict[int, Any] = {}
    report = pool.run(list(range(shards)), markers.__setitem__)
    if report.failed or report.actors_lost or any(a != 1 for a in report.attempts.values()):
        raise RuntimeError(f"the pool did not run every shard once: failed {report.failed}, "
                           f"lost {report.actors_lost}, retries {sum(report.attempts.values()) - shards}")
    return markers


@dataclass
class DispatchRow:
    name: str
    seconds: list[float]
    cpu_s: list[float]

    def best(self) -> int:
        return min(range(len(self.seconds)), key=self.seconds.__getitem__)


def measure_dispatch(shards: int, n_actors: int, inflight: int, repeats: int,
                     ray_address: str | None = None) -> list[DispatchRow]:
    """(e) and (f) ``repeats`` times on a local Ray started here, or on the cluster at ``ray_address``
    (disconnected from, or shut down, before returning)."""
    import ray

    if ray_address:
        ray.init(address=ray_address, log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        where = f"cluster at {ray_address}" if ray_address else "local instance"
        print(f"ray {ray.__version__}: {where} with {ray.cluster_resources().get('CPU', 0):.0f} CPUs; "
              f"{n_actors} no-op actors (num_cpus=0), {inflight} calls in flight per actor", flush=True)
        rows = [DispatchRow("(e) plain Ray loop, `ray.wait` on the calls in flight", [], []),
                DispatchRow("(f) synthmill `ShardPool.run`", [], [])]
        warmup = 4 * inflight
        for r in range(repeats):
            actors = start_actors(n_actors, inflight, warmup)
            for row, loop in zip(rows, (plain_loop, pool_loop), strict=True):
                extra = (lambda: start_actors(1, inflight, 0)[0],) if loop is pool_loop else ()
                args = (actors, shards, inflight) + extra
                c0, t0 = time.process_time(), time.perf_counter()
                results = loop(*args)
                row.seconds.append(time.perf_counter() - t0)
                row.cpu_s.append(time.process_time() - c0)
                if sorted(results) != list(range(shards)) or any(m["shard"] != k for k, m in results.items()):
                    raise RuntimeError(f"{row.name}: results for {len(results)} of {shards} shards")
            print(f"repeat {r + 1}/{repeats}: " + ", ".join(
                f"{row.name.split()[0]} {row.seconds[-1]:.2f} s ({row.seconds[-1] / shards * 1e3:.3f} ms/shard)"
                for row in rows), flush=True)
        return rows  # ShardPool.run killed each repeat's actors; ray.shutdown ends anything left
    finally:
        ray.shutdown()


# -- the benchmark ----------------------------------------------------------------------------------


def render(plan: list[PlanRow], check: dict[str, Any], dispatch: list[DispatchRow], shards: int, n_actors: int,
           inflight: int, repeats: int) -> str:
    """The two markdown tables and their ratio lines."""
    a, b, c, d = plan
    lines = [f"planning (each a fresh process; best wall and CPU of {repeats}, largest peak RSS):", "",
             "| run | prompt rows | shards | wall s | CPU s (user+sys) | peak RSS MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in plan:
        rows = f"{row.rows:,}" if row.rows else ""
        shard_count = f"{row.shards:,}" if row.shards else ""
        figures = (f"{row.best_s:.2f} | {row.best_cpu_s:.2f} | {row.rss_mib:.0f}" if row.seconds
                   else "not run (--smoke) | |")
        lines.append(f"| {row.name} | {rows} | {shard_count} | {figures} |")
    yes = {True: "yes", False: "no"}
    lines += [
        "",
        (f"dry-run ratios: {d.rows:,} / {c.rows:,} rows: wall = {d.best_s / c.best_s:.3f}x, "
         f"CPU = {d.best_cpu_s / c.best_cpu_s:.3f}x, peak RSS = {d.rss_mib / c.rss_mib:.3f}x; "
         f"{d.rows:,} rows / import synthmill.cli: wall = {d.best_s / a.best_s:.2f}x, "
         f"CPU = {d.best_cpu_s / a.best_cpu_s:.2f}x, peak RSS = {d.rss_mib / a.rss_mib:.2f}x"),
        (f"job-module imports (b) / dry run (d): wall = {b.best_s / d.best_s:.3f}, "
         f"CPU = {b.best_cpu_s / d.best_cpu_s:.3f}, peak RSS = {b.rss_mib / d.rss_mib:.3f}"
         if b.seconds else "job-module imports (b): not run (--smoke)"),
        (f"dry run left behind: output folder created: {yes[check['output_created']]}; "
         f"Ray initialized: {yes[check['ray_initialized']]} (ray module imported: {yes[check['ray_imported']]}); "
         f"diffusers imported: {yes[check['diffusers_imported']]}; torch imported: {yes[check['torch_imported']]}"),
        "",
        f"dispatch: {shards:,} shards, {n_actors} no-op actors, {inflight} in flight per actor (best of {repeats}):",
        "",
        "| loop | seconds | ms/shard | driver CPU ms/shard |",
        "| --- | ---: | ---: | ---: |",
    ]
    per_shard = []
    for row in dispatch:
        i = row.best()
        per_shard.append(row.seconds[i] / shards * 1e3)
        lines.append(f"| {row.name} | {row.seconds[i]:.2f} | {per_shard[-1]:.3f} | {row.cpu_s[i] / shards * 1e3:.3f} |")
    lines += ["", (f"dispatch ratio: ShardPool / plain ray.wait loop = {per_shard[1] / per_shard[0]:.3f} "
                   f"({per_shard[1]:.3f} vs {per_shard[0]:.3f} ms/shard)")]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from synthmill.jobs.fields import ActorClusterSpec

    p = argparse.ArgumentParser(prog="python -m benchmarks driver", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000, help="prompt rows of the big parquet (default 10,000,000)")
    p.add_argument("--base-rows", type=int, default=1000, help="prompt rows of the baseline parquet (default 1,000)")
    p.add_argument("--row-groups", type=int, default=10, help="parquet row groups per file (default 10)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="output.samples_per_shard (default 1000)")
    p.add_argument("--shards", type=int, default=2000, help="shards dispatched in part 2 (default 2000)")
    p.add_argument("--actors", type=int, default=8, help="no-op actors in part 2 (default 8)")
    p.add_argument("--inflight", type=int, default=ActorClusterSpec.inflight_per_actor,
                   help=f"calls in flight per actor (default {ActorClusterSpec.inflight_per_actor}, the spec default)")
    p.add_argument("--repeats", type=int, default=3, help="runs of every measurement; the best counts (default 3)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny and fast: 20,000 rows, 200 shards on 2 actors, one repeat, without (b)")
    p.add_argument("--ray-address", help="part 2 on this Ray cluster instead of a local one started for it "
                                         "(the test suite's smoke run, to skip a Ray start)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse flags and run; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    for name in ("rows", "base_rows", "row_groups", "samples_per_shard", "shards", "actors", "inflight", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; python {sys.version.split()[0]}", flush=True)
    with tempfile.TemporaryDirectory(prefix="synthmill-bench-driver-") as work:
        plan, check = measure_planning(work, args.rows, args.base_rows, args.row_groups, args.samples_per_shard,
                                       args.repeats, job_imports=not args.smoke)
    dispatch = measure_dispatch(args.shards, args.actors, args.inflight, args.repeats, args.ray_address)
    print(f"load average {os.getloadavg()[0]:.2f}")
    print()
    print(render(plan, check, dispatch, args.shards, args.actors, args.inflight, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
