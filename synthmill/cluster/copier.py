"""The copier: a filter job's actor, turning output shard ids into committed shards of chosen source samples.

:class:`ShardCopier` is plain Python (the benchmark drives it without Ray); :class:`CopierActor` is its Ray actor,
driven by :class:`~synthmill.cluster.pool.ShardPool` like the generator and the scorer. ``process_shard(k)``
copies output shard k's samples out of the source tars (:func:`synthmill.sharding.subset.copy_shard`) into a
temporary tar and commits it with its index part and marker through the output's
:class:`~synthmill.sharding.units.CommittedUnits`, as a generate job commits its shards. It returns the marker.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray

from synthmill.sharding.layout import SHARDS, OutputLayout
from synthmill.sharding.nodes import NodePath, check_node_sees
from synthmill.sharding.plan import sample_key
from synthmill.sharding.subset import Selection, copy_shard
from synthmill.sharding.units import LocalPayload


@dataclass(frozen=True)
class CopyWork:
    """What every copier needs, put once in Ray's object store: where to read and write, and the selection."""

    source: str
    output: str
    storage: dict[str, Any]
    fingerprint: str
    samples_per_shard: int
    selection: Selection
    schema: pa.Schema  # the output's index schema
    node_paths: tuple[NodePath, ...] = ()


class ShardCopier:
    """Copies and commits output shards; :meth:`process_shard` may be called from several threads at once."""

    def __init__(self, work: CopyWork):
        import webdataset  # noqa: F401 - the tar writer's and the member naming's; it imports torch (seconds): here,
        # at the actor's start, not in its first shard

        self.work = work
        self.source = OutputLayout(work.source, work.storage)
        self.layout = OutputLayout(work.output, work.storage)
        self.samples_done = 0

    def info(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": "cpu"}

    def _count(self, n: int) -> None:
        self.samples_done += n

    def process_shard(self, k: int, attempt: int = 1) -> dict[str, Any]:
        """Copy and commit output shard ``k``; return its marker."""
        t0 = time.perf_counter()
        w = self.work
        first, keys, shards = w.selection.part(k, w.samples_per_shard)
        tmp_dir = self.layout.local_path(SHARDS) if self.layout.is_local else None
        if tmp_dir:
            os.makedirs(tmp_dir, exist_ok=True)
        path, size, sha, index, stats = copy_shard(self.source, k, first, keys, shards, w.schema, tmp_dir, self._count)
        marker = {
            "shard": k, "count": stats["count"], "fingerprint": w.fingerprint,
            "first_key": sample_key(first), "last_key": sample_key(first + len(keys) - 1),
            "first_source_key": keys[0], "last_source_key": keys[-1], "source_shards": stats["source_shards"],
            "member_bytes": stats["member_bytes"], "attempt": attempt,
            "elapsed_s": round(time.perf_counter() - t0, 3), **self.info(),
        }
        try:
            return self.layout.shards.commit(k, LocalPayload(path, size, sha), marker, [index])
        finally:
            if os.path.exists(path):  # remote outputs upload a copy; the local temporary goes
                os.unlink(path)


@ray.remote(max_restarts=0)
class CopierActor:
    """Ray actor around :class:`ShardCopier` (CPU only: copying bytes needs no accelerator)."""

    def __init__(self, work: CopyWork):
        self.start_error: Exception | None = None
        try:
            check_node_sees(list(work.node_paths))  # the source and output the driver checked
            self.copier = ShardCopier(work)
        except Exception as e:  # raised by ready(), as the other actors do (synthmill.cluster.pool)
            self.start_error = e

    def ready(self) -> dict[str, Any]:
        if self.start_error is not None:
            raise self.start_error
        return self.copier.info()

    def process_shard(self, k: int, attempt: int = 1) -> dict[str, Any]:
        return self.copier.process_shard(k, attempt)

    def progress(self) -> int:
        return self.copier.samples_done
