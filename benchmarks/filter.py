"""Filter: samples/s of ``kind: filter`` over a large output on local disk, against a plain webdataset loop.

The source is built directly (no model): ``--samples`` samples (100,000) in shards of ``--per-shard`` (1,000),
each a small random PNG (32x32 noise, ~3.1 KB; one of 1,009 made from ``--seed``, in turn), a caption and a
generate-style json, committed with markers and index parts through synthmill's own writer and
``CommittedUnits``, with an ``index.parquet``; beside it a ``scores.parquet`` (key, shard, prompt_index,
clip_score uniform in [0.20, 0.36), nsfw true for 1 in 20), all from ``--seed``. The condition
``clip_score > 0.28 AND NOT nsfw`` keeps about 47% of the samples; the output has ``--per-shard`` samples a
shard.

(a) a plain webdataset read-and-write loop: ``wds.WebDataset(tars)`` (no decoding) over every source sample,
    the chosen ones (a set of keys, from the same selection as (b)) rewritten with their new key and the
    ``source_key`` in their json and written by ``wds.ShardWriter`` in shards of the same size;
(b) synthmill's copier in one process, no Ray (``ShardCopier.process_shard`` for each output shard in turn:
    copy, index part, commit with marker), the selection made by ``filter.prepare`` as the job makes it
    (its seconds reported apart, not in (b)'s);
(c) ``synthmill run filter.yaml`` end to end in a child process on a local Ray it starts, ``--actors`` copier
    actors (Ray's start-up and the driver's selection included).

(a) and (b) each run in a fresh child process (``--repeats`` times, interleaved, best kept). Reported: seconds,
source samples/s and chosen samples/s; the ratios (b)/(a) and (c)/(a) of samples/s (goal >= 0.9 for (b)); each
child's peak RSS (``ru_maxrss``) and how far it rose while copying; and, in one more untimed pass of (b) under
``tracemalloc`` over ``--memory-shards`` output shards, the peak of Python's allocations against the largest
source shard and the largest sample: the copier holds one sample at a time, never a shard. Every output of (b)
and (c) is checked against (a)'s: the same samples, member for member.

    python -m benchmarks filter              # 100,000 samples, 2 actors
    python -m benchmarks filter --smoke      # 2,000 samples in shards of 100; what tests/test_filter.py runs
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WHERE = "clip_score > 0.28 AND NOT nsfw"
SMOKE = {"samples": 2000, "per_shard": 100, "repeats": 1, "actors": 1, "memory_shards": 3}


def build_source(folder: str, samples: int, per_shard: int, seed: int, side: int = 32) -> dict[str, Any]:
    """A complete generate-like output at ``folder`` and ``folder``-scores.parquet; returns its sizes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from synthmill.sharding.index import index_table, merge_index
    from synthmill.sharding.layout import PLAN, SUMMARY, OutputLayout
    from synthmill.sharding.plan import sample_key
    from synthmill.sharding.units import LocalPayload
    from synthmill.sharding.writer import ShardTarWriter

    rng = np.random.default_rng(seed)
    layout = OutputLayout(folder)
    os.makedirs(layout.local_path("shards"), exist_ok=True)
    shards = -(-samples // per_shard)
    layout.write_json(PLAN, {"kind": "generate", "fingerprint": f"bench{seed}", "prompts": samples,
                             "samples": samples, "shards": shards, "samples_per_shard": per_shard})
    largest_shard = largest_sample = 0
    pool = []  # PNGs of random noise: 1,009 of them (a prime), taken in turn (encoding one per sample is slow)
    for _ in range(min(samples, 1009)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="png")
        pool.append(buf.getvalue())
    for k in range(shards):
        writer = ShardTarWriter(layout.local_path("shards"))
        rows = []
        for i in range(k * per_shard, min((k + 1) * per_shard, samples)):
            prompt = f"a photo of thing {i}"
            meta = {"key": sample_key(i), "shard": k, "prompt": prompt, "seed": i, "prompt_index": i,
                    "image_index": 0, "source_row": i, "height": side, "width": side}
            member = {"__key__": sample_key(i), "png": pool[i % len(pool)], "txt": prompt.encode(),
                      "json": json.dumps(meta, sort_keys=True).encode()}
            largest_sample = max(largest_sample, sum(len(v) for k_, v in member.items() if k_ != "__key__"))
            writer.write(member)
            rows.append({**meta, "prompt_tokens": 8, "truncated": False, "blank_prompt": False, "nsfw": None})
        path, size, sha = writer.close()
        largest_shard = max(largest_shard, size)
        part = io.BytesIO()
        pq.write_table(index_table(rows), part)
        layout.shards.commit(k, LocalPayload(path, size, sha), {"count": len(rows), "fingerprint": f"bench{seed}"},
                             [part.getvalue()])
    merge_index(layout, range(shards))
    layout.write_json(SUMMARY, {"status": "complete", "kind": "generate", "fingerprint": f"bench{seed}"})
    keys = [sample_key(i) for i in range(samples)]
    scores = pa.table({"key": keys, "shard": [i // per_shard for i in range(samples)],
                       "prompt_index": list(range(samples)),
                       "clip_score": rng.uniform(0.20, 0.36, samples), "nsfw": rng.random(samples) < 0.05})
    pq.write_table(scores, folder + "-scores.parquet")
    return {"shards": shards, "largest_shard": largest_shard, "largest_sample": largest_sample,
            "bytes": sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "shards", "*.tar")))}


def filter_spec(source: str, output: str, per_shard: int, actors: int) -> dict[str, Any]:
    return {"kind": "filter", "source": {"path": source}, "scores": {"path": source + "-scores.parquet"},
            "where": WHERE, "output": {"path": output, "samples_per_shard": per_shard},
            "cluster": {"num_actors": actors}}


def _prepare(spec_path: str):
    from synthmill.jobs import filter as filter_job
    from synthmill.jobs.spec import load_spec

    return filter_job.prepare(load_spec(spec_path))


# -- the children: (a) and (b) in fresh interpreters ---------------------------------------------------------


def child_plain(spec_path: str, out: str) -> dict[str, Any]:
    """(a): read every sample with webdataset, keep the chosen, write them with wds.ShardWriter."""
    import webdataset as wds

    p = _prepare(spec_path)
    chosen = {key: i for i, key in enumerate(p.selection.keys.to_pylist())}
    tars = sorted(glob.glob(os.path.join(p.source.url, "shards", "*.tar")))
    per = p.spec.output.samples_per_shard
    os.makedirs(out, exist_ok=True)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    seen = 0
    with wds.ShardWriter(os.path.join(out, "%06d.tar"), maxcount=per, verbose=0) as sink:
        for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
            seen += 1
            i = chosen.get(sample["__key__"])
            if i is None:
                continue
            meta = json.loads(sample["json"])
            meta.update(key=f"{i:010d}", shard=i // per, source_key=sample["__key__"])
            sink.write({"__key__": f"{i:010d}", "png": sample["png"], "txt": sample["txt"],
                        "json": json.dumps(meta, sort_keys=True).encode()})
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "read": seen, "written": len(chosen), "rss0_kib": rss0,
            "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def _work(p, out: str):
    from synthmill.cluster.copier import CopyWork

    return CopyWork(p.source.url, out, {}, p.fingerprint, p.spec.output.samples_per_shard, p.selection, p.schema)


def child_synthmill(spec_path: str, out: str) -> dict[str, Any]:
    """(b): synthmill's copier over every output shard, in this process."""
    from synthmill.cluster.copier import ShardCopier

    t_sel = time.perf_counter()
    p = _prepare(spec_path)
    select_s = time.perf_counter() - t_sel
    copier = ShardCopier(_work(p, out))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for k in range(p.num_shards):
        copier.process_shard(k)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "read": p.counts["source_samples"], "written": len(p.selection),
            "select_s": select_s, "rss0_kib": rss0, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def child_memory(spec_path: str, out: str, shards: int) -> dict[str, Any]:
    """(b) under tracemalloc over the first ``shards`` output shards: the peak of Python's allocations."""
    import tracemalloc

    from synthmill.cluster.copier import ShardCopier

    p = _prepare(spec_path)
    copier = ShardCopier(_work(p, out))
    copier.process_shard(0)  # imports and first-use caches, outside the measurement
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for k in range(1, min(shards + 1, p.num_shards)):
        copier.process_shard(k)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return {"peak_bytes": peak, "shards": min(shards + 1, p.num_shards) - 1}


def _child(kind: str, *args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.filter", "--child", kind, *args], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _samples(tars: list[str]) -> list[dict[str, Any]]:
    """Every sample of ``tars`` as webdataset reads it, the json parsed (and only the fields both runs write)."""
    import webdataset as wds

    out = []
    for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        meta = json.loads(s["json"])
        out.append({"key": s["__key__"], "png": s["png"], "txt": s["txt"], "source_key": meta["source_key"],
                    "json_key": meta["key"], "prompt": meta["prompt"]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks filter", description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--memory-shards", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="2,000 samples in shards of 100, one repeat, one actor")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        fn = {"a": child_plain, "b": child_synthmill}.get(kind)
        result = fn(*rest) if fn else child_memory(rest[0], rest[1], int(rest[2]))
        print(json.dumps(result))
        return 0
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    import yaml

    root = tempfile.mkdtemp(prefix="filterbench-")
    try:
        t0 = time.perf_counter()
        source = os.path.join(root, "source")
        built = build_source(source, args.samples, args.per_shard, args.seed)
        print(f"source: {args.samples:,} samples in {built['shards']} shards of {args.per_shard}, "
              f"{built['bytes'] / 2**20:.1f} MiB of tars (largest shard {built['largest_shard'] / 2**20:.2f} MiB, "
              f"largest sample {built['largest_sample']:,} bytes), built in {time.perf_counter() - t0:.1f}s; "
              f"where: {WHERE}", flush=True)
        spec_path = os.path.join(root, "filter.yaml")
        runs: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
        for r in range(args.repeats):
            for kind in ("a", "b"):
                out = os.path.join(root, f"{kind}{r}")
                Path(spec_path).write_text(yaml.safe_dump(filter_spec(source, out, args.per_shard, args.actors)))
                runs[kind].append(_child(kind, spec_path, out))
        best = {k: min(v, key=lambda x: x["seconds"]) for k, v in runs.items()}
        a, b = best["a"], best["b"]
        for kind, what in (("a", "plain webdataset loop, 1 process"), ("b", "synthmill copier, 1 process, no Ray")):
            x = best[kind]
            print(f"({kind}) {what}: {x['seconds']:.2f}s, {x['read'] / x['seconds']:,.0f} source samples/s, "
                  f"{x['written'] / x['seconds']:,.0f} chosen samples/s ({x['written']:,} of {x['read']:,}); "
                  f"peak RSS {x['peak_kib'] / 1024:.0f} MiB, {max(0, x['peak_kib'] - x['rss0_kib']) / 1024:.1f} MiB "
                  "more than before copying", flush=True)
        print(f"(b) selection in the driver (filter.prepare: index, scores, DuckDB): {b['select_s']:.2f}s")
        # (c): the whole job, end to end
        out_c = os.path.join(root, "c")
        Path(spec_path).write_text(yaml.safe_dump(filter_spec(source, out_c, args.per_shard, args.actors)))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        for attempt in range(3):  # a loaded machine's raylet may miss Ray's fixed 30 s to register: start again
            tc = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "synthmill.cli", "run", spec_path], cwd=REPO, env=env,
                                  capture_output=True, text=True)
            c_s = time.perf_counter() - tc
            if proc.returncode == 0 or "node timed out during startup" not in proc.stderr or attempt == 2:
                break
            print(f"(c) attempt {attempt + 1}: Ray's local node did not start in time; again", file=sys.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"synthmill run failed:\n{proc.stderr[-3000:]}")
        summary = json.loads(Path(out_c, "summary.json").read_text())
        markers = [json.loads(Path(m).read_text()) for m in glob.glob(os.path.join(out_c, "shards", "*.json"))]
        shard_s = sum(m["elapsed_s"] for m in markers)
        print(f"(c) synthmill run, {args.actors} actor{'s' if args.actors > 1 else ''} on a local Ray: {c_s:.2f}s "
              f"wall, {a['read'] / c_s:,.0f} source samples/s; its summary: {summary['samples_per_s']:,.0f} chosen "
              f"samples/s from the end of the selection (Ray's start included); its markers: "
              f"{sum(m['count'] for m in markers) / shard_s:,.0f} chosen samples/s per actor (shard time)")
        mem = _child("m", spec_path, os.path.join(root, "m"), str(args.memory_shards))
        print(f"memory: (b) under tracemalloc over {mem['shards']} output shards: peak {mem['peak_bytes'] / 2**10:.0f} "
              f"KiB of Python allocations; largest source shard {built['largest_shard'] / 2**10:.0f} KiB, largest "
              f"sample {built['largest_sample'] / 2**10:.1f} KiB")
        ref = _samples(sorted(glob.glob(os.path.join(root, "a0", "*.tar"))))
        for kind, folder in (("b", os.path.join(root, "b0")), ("c", out_c)):
            got = _samples(sorted(glob.glob(os.path.join(folder, "shards", "*.tar"))))
            same = sum(x == y for x, y in zip(got, ref, strict=False)) if len(got) == len(ref) else 0
            print(f"same samples as (a): ({kind}) {same}/{len(ref)}")
            if same != len(ref):
                return 1
        ratio_b = (b["read"] / b["seconds"]) / (a["read"] / a["seconds"])
        ratio_c = (a["read"] / c_s) / (a["read"] / a["seconds"])
        print(f"ratios: samples/s (b)/(a) = {ratio_b:.3f} (goal >= 0.9: {'met' if ratio_b >= 0.9 else 'not met'}), "
              f"(c)/(a) = {ratio_c:.3f} (end to end, Ray start-up and selection included)")
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
