"""Chaos benchmark: the same generate job undisturbed, then with actors SIGKILLed on a schedule.

    python -m benchmarks.chaos                 # defaults: 2 actors, 3 kills, 4 s apart (CPU, tiny model)
    python -m benchmarks.chaos --smoke         # seconds; used by the test suite

Prints samples lost, samples duplicated, shards retried, shards byte-identical to the undisturbed run,
and the slowdown (chaos wall time / undisturbed wall time), both measured in this run.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
import signal
import tarfile
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
COCO = REPO / "configs" / "prompts" / "coco2014_5k_captions.tsv"


def cluster_processes(title: str) -> list:
    """Live processes whose title holds ``title`` (Ray sets a worker's title to ``ray::<Class>...``), workers of the
    Ray cluster this process is connected to, so those of another Ray on the same machine are left alone: a
    worker's environment names its raylet's PID (``RAY_RAYLET_PID``), and the raylet's command line its node."""
    import psutil
    import ray

    nodes = {n["NodeID"] for n in ray.nodes()}
    raylets: dict[str, bool] = {}

    def ours(proc: psutil.Process) -> bool:
        pid = proc.environ().get("RAY_RAYLET_PID", "")
        if pid not in raylets:
            try:
                raylets[pid] = any(a.startswith("--node_id=") and a.split("=", 1)[1] in nodes
                                   for a in psutil.Process(int(pid)).cmdline())
            except (ValueError, psutil.Error):
                raylets[pid] = False
        return raylets[pid]

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        try:
            if cmd and title in cmd[0] and ours(p):
                found.append(p)
        except psutil.Error:
            continue
    return found


def actor_pids(title: str = "ray::GeneratorActor") -> list[int]:
    """PIDs of the live actor processes of the connected Ray cluster (:func:`cluster_processes`)."""
    return [p.pid for p in cluster_processes(title)]


def write_inputs(folder: Path, prompts: int, size: int, steps: int, per_shard: int, actors: int) -> dict:
    """Tiny pipeline, prompt file and a spec dict (output path filled in per run)."""
    from synthmill.testing.tiny import save_tiny_pipeline

    model = save_tiny_pipeline(folder / "model", "sd", seed=0)
    with open(COCO, encoding="utf-8") as fh:
        captions = [r["caption"] for r in csv.DictReader(fh, delimiter="\t")][:prompts]
    (folder / "prompts.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    return {
        "kind": "generate",
        "model": {"path": model},
        "prompts": {"path": str(folder / "prompts.txt")},
        "sampling": {"steps": steps, "height": size, "width": size, "seed": 0},
        "output": {"path": "", "samples_per_shard": per_shard},
        "cluster": {"num_actors": actors, "batch_size": 2, "inflight_per_actor": 1, "max_attempts": 10},
    }


def run(spec: dict, folder: Path, name: str) -> tuple[dict, float]:
    from synthmill.jobs import generate
    from synthmill.jobs.spec import load_spec

    spec = dict(spec, output=dict(spec["output"], path=str(folder / name)))
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    t0 = time.perf_counter()
    summary = generate.run(generate.prepare(load_spec(str(path))))
    return summary, time.perf_counter() - t0


def shard_bytes(output: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((output / "shards").glob("*.tar"))}


def keys_in(tars: dict[str, bytes]) -> Counter:
    keys: Counter = Counter()
    for data in tars.values():
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            keys.update({m.name.split(".", 1)[0] for m in tf.getmembers()})
    return keys


def killer(kills: int, interval: float, stop: threading.Event, log: list, seed: int = 0) -> None:
    """Kill one random live actor every ``interval`` seconds, ``kills`` times, once actors exist."""
    rng = random.Random(seed)
    while not actor_pids() and not stop.is_set():
        time.sleep(0.1)
    for _ in range(kills):
        if stop.wait(interval):
            return
        pids = actor_pids()
        if pids:
            victim = rng.choice(pids)
            os.kill(victim, signal.SIGKILL)
            log.append((time.monotonic(), victim))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--samples-per-shard", type=int, default=4)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--interval", type=float, default=4.0)
    ap.add_argument("--smoke", action="store_true", help="tiny and fast: checks the benchmark code runs")
    ap.add_argument("--ray-address", default=None,
                    help="join this Ray cluster instead of starting a local one (the test suite's; the killer picks "
                         "this cluster's GeneratorActors by process title and node)")
    args = ap.parse_args(argv)
    if args.smoke:
        # one actor: the kill still makes the pool restart it and retry its shard, with two actor starts
        # (a fresh interpreter importing torch and diffusers each) fewer than two actors would need
        args.prompts, args.size, args.steps, args.kills, args.interval, args.actors = 8, 32, 2, 1, 1.0, 1
    import ray

    if args.ray_address:
        ray.init(address=args.ray_address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec = write_inputs(folder, args.prompts, args.size, args.steps, args.samples_per_shard, args.actors)
        base_summary, base_s = run(spec, folder, "undisturbed")
        stop, kills = threading.Event(), []
        t = threading.Thread(target=killer, args=(args.kills, args.interval, stop, kills))
        t.start()
        try:
            chaos_summary, chaos_s = run(spec, folder, "chaos")
        finally:
            ended = time.monotonic()
            stop.set()
            t.join()
        base, chaos = shard_bytes(folder / "undisturbed"), shard_bytes(folder / "chaos")
    ray.shutdown()
    expected = {f"{i:010d}" for i in range(base_summary["samples"])}
    got = keys_in(chaos)
    result = {
        "samples": base_summary["samples"],
        "shards": base_summary["shards"],
        "actors_killed": sum(when < ended for when, _ in kills),
        "samples_lost": len(expected - set(got)),
        "samples_duplicated": sum(c - 1 for c in got.values() if c > 1) + len(set(got) - expected),
        "shards_retried": chaos_summary["retries"],
        "actors_lost": chaos_summary["actors_lost"],
        "shards_identical": sum(chaos.get(n) == b for n, b in base.items()),
        "undisturbed_s": round(base_s, 2),
        "chaos_s": round(chaos_s, 2),
        "slowdown": round(chaos_s / base_s, 3),
    }
    width = max(map(len, result))
    print("\n".join(f"{k:<{width}}  {v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
