"""Scale-out figures for docs/scale.md: what the driver's per-shard work costs as a generate job grows.

Each part runs on local disk in a temporary folder, through synthmill's own functions:

(1) storage requests per shard. One shard of ``--samples-per-shard`` samples is committed through
    ``CommittedUnits.commit`` as a generate actor commits it (the tar, its index part, then its marker), the
    driver then checks it (``CommittedUnits.done``: one listing per folder, the marker read) and the index merge
    reads its part. Every call into ``synthmill.sharding.storage`` is counted by name. On S3 each call is one
    request, except a ``put_file`` of a tar of 100 MiB or more (s3fs uploads those in parts of 50 MiB), which is
    ceil(size / 50 MiB) + 2, and a listing, which is one request per 1,000 names.
(2) the driver's check of N committed shards (what ``synthmill status`` and a resumed run do first):
    ``CommittedUnits.done`` over N markers (size check), at N = ``--shards`` / 10 and ``--shards``. The N shards
    are copies of the one real commit of (1), with their markers' ids rewritten and their tars cut to 1 KiB (the
    size in each marker to match: the check compares sizes and reads no tar) and their index parts cut to 1 KiB
    (the check only sees that each exists). Wall and CPU seconds, and
    milliseconds per shard.
(3) the index merge at the end of a job: ``merge_index`` over ``--parts`` parts of ``--samples-per-shard``
    rows each (COCO captions), as the driver writes ``index.parquet``. Wall and CPU seconds, rows/s.

(4) the same merge from an S3-protocol server on 127.0.0.1 (moto's, as the tests use), ``--s3-parts`` parts, with
    the parts read one at a time (``READ_AHEAD`` 1, how the merge read them before) and read ahead on threads
    (synthmill's ``READ_AHEAD``), interleaved, best of 2 each. moto's requests cost less than S3's (a local
    Python server, no network), so the ratio is a lower bound of what reading ahead saves against S3.

CPU seconds (this process's user + system time) are printed beside wall seconds: they are less sensitive to
other load on the machine.

    python -m benchmarks scale               # 1,000,000 shards checked, a merge of 10,000 parts of 1,000 rows
    python -m benchmarks scale --smoke       # 2,000 shards, 50 parts, 20 on S3; what tests/test_benchmarks.py runs
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CAPTIONS = REPO / "configs" / "prompts" / "coco2014_5k_captions.tsv"
SMOKE = {"shards": 2000, "parts": 50, "samples_per_shard": 100, "s3_parts": 20}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process) of ``fn()``."""
    c0, t0 = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0, time.process_time() - c0


def _captions() -> list[str]:
    with open(CAPTIONS, encoding="utf-8", newline="") as fh:
        return [row["caption"] or "" for row in csv.DictReader(fh, delimiter="\t")]


def _index_part(k: int, n: int, captions: list[str]) -> bytes:
    """The index part of shard ``k`` (``n`` rows, as a generate actor writes it), as parquet bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from synthmill.sharding.index import index_table

    rows = []
    for j in range(n):
        i = k * n + j
        rows.append({"key": f"{i:010d}", "shard": k, "prompt": captions[i % len(captions)], "negative_prompt": "",
                     "seed": i, "prompt_index": i, "image_index": 0, "source_row": i, "prompt_tokens": 12,
                     "truncated": False, "blank_prompt": False, "nsfw": None})
    sink = pa.BufferOutputStream()
    pq.write_table(index_table(rows), sink)
    return sink.getvalue().to_pybytes()


class _Counting:
    """Count the calls into ``synthmill.sharding.storage``'s request-making functions while active (the outermost
    call only, per thread)."""

    NAMES = ("write_bytes", "put_file", "write_json", "read_bytes", "read_json", "list_sizes")

    def __init__(self) -> None:
        import threading

        from synthmill.sharding import storage

        self.storage, self.calls, self.saved, self.depth = storage, Counter(), {}, threading.local()

    def __enter__(self) -> Counter:
        for name in self.NAMES:
            original = self.saved[name] = getattr(self.storage, name)

            def counted(*args: Any, _name: str = name, _fn: Callable = original, **kwargs: Any) -> Any:
                depth = getattr(self.depth, "n", 0)
                if depth == 0:  # the outermost call is the request (write_json calls write_bytes)
                    self.calls[_name] += 1
                self.depth.n = depth + 1
                try:
                    return _fn(*args, **kwargs)
                finally:
                    self.depth.n = depth

            setattr(self.storage, name, counted)
        return self.calls

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self.saved.items():
            setattr(self.storage, name, fn)


def requests_per_shard(work: str, samples: int, captions: list[str]) -> dict[str, Any]:
    """(1): the storage calls of one shard's commit, the driver's check of it, and its read by the merge."""
    from synthmill.sharding.index import merge_index
    from synthmill.sharding.layout import OutputLayout

    layout = OutputLayout(os.path.join(work, "one"))
    tar = os.urandom(samples * 1024)  # the bytes do not matter here, only the calls
    part = _index_part(0, samples, captions)
    with _Counting() as commit:
        layout.shards.commit(0, tar, {"fingerprint": "bench", "count": samples}, [part])
    with _Counting() as check:
        assert set(layout.shards.done([0], lambda k: {"fingerprint": "bench"})) == {0}
    with _Counting() as merge:
        assert merge_index(layout, [0]) == samples
    return {"commit": dict(commit), "check": dict(check), "merge": dict(merge), "layout": layout}


def copies(layout: Any, n: int, dest: str) -> Any:
    """An output of ``n`` committed shards: the one real commit of ``layout`` copied to ids 0..n-1."""
    from synthmill.sharding.layout import INDEX_PARTS, SHARDS, OutputLayout
    from synthmill.sharding.units import unit_name

    src_shards, src_index = os.path.join(layout.url, SHARDS), os.path.join(layout.url, INDEX_PARTS)
    out = OutputLayout(dest)
    shards, index = os.path.join(dest, SHARDS), os.path.join(dest, INDEX_PARTS)
    os.makedirs(shards)
    os.makedirs(index)
    name0 = unit_name(0)
    tar = open(os.path.join(src_shards, name0 + ".tar"), "rb").read()[:1024]  # the check reads sizes, not bytes
    part = open(os.path.join(src_index, name0 + ".parquet"), "rb").read()[:1024]  # listed, never read, by the check
    marker = json.load(open(os.path.join(src_shards, name0 + ".json"), encoding="utf-8"))
    for k in range(n):
        name = unit_name(k)
        with open(os.path.join(shards, name + ".tar"), "wb") as fh:
            fh.write(tar)
        with open(os.path.join(index, name + ".parquet"), "wb") as fh:
            fh.write(part)
        with open(os.path.join(shards, name + ".json"), "w", encoding="utf-8") as fh:
            json.dump({**marker, "shard": k, "size": len(tar)}, fh)
    return out


def check_cost(layout: Any, n: int) -> dict[str, float]:
    """(2): ``done`` over ``n`` committed shards."""
    done, wall, cpu = _timed(lambda: layout.shards.done(range(n), lambda k: {"fingerprint": "bench"}))
    assert len(done) == n, (len(done), n)
    return {"shards": n, "wall_s": wall, "cpu_s": cpu, "ms_per_shard": 1000 * wall / n}


def merge_cost(work: str, parts: int, samples: int, captions: list[str]) -> dict[str, float]:
    """(3): ``merge_index`` over ``parts`` index parts of ``samples`` rows."""
    from synthmill.sharding.index import merge_index
    from synthmill.sharding.layout import INDEX_PARTS, OutputLayout
    from synthmill.sharding.units import unit_name

    layout = OutputLayout(os.path.join(work, "merge"))
    folder = os.path.join(layout.url, INDEX_PARTS)
    os.makedirs(folder)
    for k in range(parts):
        with open(os.path.join(folder, unit_name(k) + ".parquet"), "wb") as fh:
            fh.write(_index_part(k, samples, captions))
    rows, wall, cpu = _timed(lambda: merge_index(layout, range(parts)))
    assert rows == parts * samples, rows
    size = os.path.getsize(os.path.join(layout.url, "index.parquet"))
    return {"parts": parts, "rows": rows, "wall_s": wall, "cpu_s": cpu, "rows_per_s": rows / wall,
            "ms_per_part": 1000 * wall / parts, "index_mib": size / 2**20}


def s3_merge_cost(work: str, parts: int, samples: int, captions: list[str]) -> dict[str, Any]:
    """(4): ``merge_index`` over ``parts`` parts on a moto server, one at a time and read ahead."""
    from benchmarks.startup import s3_model
    from synthmill.sharding import index
    from synthmill.sharding.layout import INDEX_PARTS, OutputLayout
    from synthmill.sharding.units import unit_name

    folder = os.path.join(work, "s3-merge")
    os.makedirs(os.path.join(folder, INDEX_PARTS))
    for k in range(parts):
        with open(os.path.join(folder, INDEX_PARTS, unit_name(k) + ".parquet"), "wb") as fh:
            fh.write(_index_part(k, samples, captions))
    ahead, seconds = index.READ_AHEAD, {1: [], index.READ_AHEAD: []}
    with s3_model(folder) as (url, options):
        layout = OutputLayout(url, options)
        try:
            for _ in range(2):
                for depth in seconds:
                    index.READ_AHEAD = depth
                    rows, wall, _ = _timed(lambda: index.merge_index(layout, range(parts)))
                    assert rows == parts * samples, rows
                    seconds[depth].append(wall)
        finally:
            index.READ_AHEAD = ahead
    one, many = min(seconds[1]), min(seconds[ahead])
    return {"parts": parts, "one_s": one, "ahead_s": many, "ahead": ahead, "ratio": one / many}


def render(r: dict[str, Any]) -> str:
    req = r["requests"]
    lines = [f"(1) storage calls of one shard of {r['samples_per_shard']} samples:",
             f"    commit (actor): {req['commit']}",
             f"    check (driver, status / resume): {req['check']}",
             f"    index merge (driver): {req['merge']}", "",
             "(2) the driver's check of N committed shards (CommittedUnits.done, size check, 16 threads):", "",
             "| shards | wall s | CPU s | ms per shard |", "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {c['shards']:,} | {c['wall_s']:.2f} | {c['cpu_s']:.2f} | {c['ms_per_shard']:.4f} |"
              for c in r["checks"]]
    small, big = r["checks"]
    lines += ["", f"check growth: {big['shards'] // small['shards']}x the shards took "
                  f"{big['wall_s'] / small['wall_s']:.2f}x the wall time", ""]
    m = r["merge"]
    lines += [f"(3) index merge of {m['parts']:,} parts of {r['samples_per_shard']} rows ({m['rows']:,} rows, "
              f"{m['index_mib']:.1f} MiB index.parquet): {m['wall_s']:.2f} s wall, {m['cpu_s']:.2f} s CPU, "
              f"{m['rows_per_s']:,.0f} rows/s, {m['ms_per_part']:.3f} ms per part"]
    s3 = r["s3_merge"]
    lines += ["", f"(4) index merge of {s3['parts']:,} parts from moto on 127.0.0.1: one part at a time "
                  f"{s3['one_s']:.2f} s ({1000 * s3['one_s'] / s3['parts']:.2f} ms per part), read ahead on "
                  f"{s3['ahead']} threads {s3['ahead_s']:.2f} s "
                  f"({1000 * s3['ahead_s'] / s3['parts']:.2f} ms per part); ratio {s3['ratio']:.2f}x"]
    lines += ["", f"load average at the end (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())}"]
    return "\n".join(lines)


def run(shards: int, parts: int, samples: int, s3_parts: int) -> dict[str, Any]:
    captions = _captions()
    work = tempfile.mkdtemp(prefix="synthmill-bench-scale-")
    try:
        req = requests_per_shard(work, samples, captions)
        checks = []
        for n in (max(1, shards // 10), shards):
            out = copies(req["layout"], n, os.path.join(work, f"status-{n}"))
            checks.append(check_cost(out, n))
            shutil.rmtree(out.url)
        merge = merge_cost(work, parts, samples, captions)
        s3 = s3_merge_cost(work, s3_parts, samples, captions)
        del req["layout"]
        return {"samples_per_shard": samples, "requests": req, "checks": checks, "merge": merge, "s3_merge": s3}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=1_000_000, help="committed shards the driver checks (default 1M)")
    p.add_argument("--parts", type=int, default=10_000, help="index parts merged (default 10,000)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="rows per index part (default 1000)")
    p.add_argument("--s3-parts", type=int, default=500, help="index parts merged from moto (default 500)")
    p.add_argument("--smoke", action="store_true", help=f"small sizes: {SMOKE}")
    args = p.parse_args(argv)
    if args.smoke:
        args.shards, args.parts, args.samples_per_shard = SMOKE["shards"], SMOKE["parts"], SMOKE["samples_per_shard"]
        args.s3_parts = SMOKE["s3_parts"]
    print(render(run(args.shards, args.parts, args.samples_per_shard, args.s3_parts)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
