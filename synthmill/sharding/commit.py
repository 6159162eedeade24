"""Committing shards and telling which are done (DESIGN.md invariant 3).

A shard is committed in this order, each step atomic: ``shards/K.tar`` (the images),
``index/K.parquet`` (its rows of ``index.parquet``), and last the marker ``shards/K.json`` (count,
size, sha256 of the tar, and the job fingerprint). A shard is done only if its marker exists, names
this job's fingerprint, its tar has the marker's size (and sha256, with ``resume_check: sha256``)
and its index part exists. Resume and ``synthmill status`` both use :func:`done_shards`.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from synthmill.sharding import storage
from synthmill.sharding.plan import shard_name


def tar_url(output: str, k: int) -> str:
    return storage.join(output, "shards", shard_name(k) + ".tar")


def marker_url(output: str, k: int) -> str:
    return storage.join(output, "shards", shard_name(k) + ".json")


def index_part_url(output: str, k: int) -> str:
    return storage.join(output, "index", shard_name(k) + ".parquet")


def commit_shard(
    output: str,
    k: int,
    local_tar: str,
    index: Any,
    marker: dict[str, Any],
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Publish shard ``k``: tar, then its index part (a pyarrow table), then the marker (the commit point)."""
    import pyarrow.parquet as pq

    storage.put_file(local_tar, tar_url(output, k), storage_options)
    buf = io.BytesIO()
    pq.write_table(index, buf)
    storage.write_bytes(index_part_url(output, k), buf.getvalue(), storage_options)
    storage.write_json(marker_url(output, k), marker, storage_options)


def _sha256(url: str, storage_options: dict[str, Any] | None) -> str:
    fs, path = storage.filesystem(url, storage_options)

    def digest() -> str:
        h = hashlib.sha256()
        with fs.open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        return h.hexdigest()

    return storage.retrying(url, "hash", digest)


def done_shards(
    output: str,
    shard_ids: Iterable[int],
    fingerprint: str,
    check: str = "size",
    storage_options: dict[str, Any] | None = None,
    threads: int = 16,
) -> dict[int, dict[str, Any]]:
    """Markers of the shards among ``shard_ids`` that are done (see module doc), by shard id."""
    tars = storage.list_sizes(storage.join(output, "shards"), storage_options)
    parts = storage.list_sizes(storage.join(output, "index"), storage_options)
    candidates = [
        k
        for k in shard_ids
        if shard_name(k) + ".json" in tars and shard_name(k) + ".tar" in tars and shard_name(k) + ".parquet" in parts
    ]

    def verify(k: int) -> dict[str, Any] | None:
        m = storage.read_json(marker_url(output, k), storage_options, damaged_as_missing=True)
        if not isinstance(m, dict) or m.get("fingerprint") != fingerprint or m.get("shard") != k:
            return None
        if m.get("size") != tars[shard_name(k) + ".tar"]:
            return None
        if check == "sha256" and m.get("sha256") != _sha256(tar_url(output, k), storage_options):
            return None
        return m

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = pool.map(verify, candidates)
    return {k: m for k, m in zip(candidates, results) if m is not None}
