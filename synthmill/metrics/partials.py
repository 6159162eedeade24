"""Per-unit partial results of an evaluate job, committed like generate's shards.

Unit ``k`` of set ``S`` (``generated`` or ``reference``) is committed as ``partials/S/K.npz`` (the
FID features of its samples, or their float64 sums for a unit of 4,096 or more, their IS logits and CLIP
cosines) and then ``partials/S/K.json``, the marker: sample
count, npz size and sha256, the job fingerprint and the identity of the input it was computed from.
A unit is done only if its marker matches all three, so a rerun resumes, and a changed input or
changed settings are computed again rather than mixed in.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from synthmill.sharding import storage
from synthmill.sharding.plan import shard_name


def npz_url(output: str, set_name: str, k: int) -> str:
    return storage.join(output, "partials", set_name, shard_name(k) + ".npz")


def marker_url(output: str, set_name: str, k: int) -> str:
    return storage.join(output, "partials", set_name, shard_name(k) + ".json")


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as the bytes of an (uncompressed) .npz file."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def commit(output: str, set_name: str, k: int, arrays: dict[str, np.ndarray], marker: dict[str, Any],
           storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the npz, then the marker (the commit point); return the marker."""
    data = npz_bytes(arrays)
    marker = dict(marker, set=set_name, unit=k, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    storage.write_bytes(npz_url(output, set_name, k), data, storage_options)
    storage.write_json(marker_url(output, set_name, k), marker, storage_options)
    return marker


def done(output: str, set_name: str, identities: dict[int, str], fingerprint: str,
         storage_options: dict[str, Any] | None = None) -> dict[int, dict[str, Any]]:
    """Markers of the units (unit id -> input identity) whose committed partial is valid."""
    sizes = storage.list_sizes(storage.join(output, "partials", set_name), storage_options)
    candidates = [k for k in identities if shard_name(k) + ".json" in sizes and shard_name(k) + ".npz" in sizes]

    def verify(k: int) -> dict[str, Any] | None:
        m = storage.read_json(marker_url(output, set_name, k), storage_options, damaged_as_missing=True)
        ok = (isinstance(m, dict) and m.get("fingerprint") == fingerprint and m.get("identity") == identities[k]
              and m.get("unit") == k and m.get("size") == sizes[shard_name(k) + ".npz"])
        return m if ok else None

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(verify, candidates))
    return {k: m for k, m in zip(candidates, results) if m is not None}


def load(output: str, set_name: str, k: int, storage_options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    return _parse(storage.read_bytes(npz_url(output, set_name, k), storage_options))


def _parse(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data)) as z:
        return {name: z[name] for name in z.files}


def load_in_order(output: str, set_name: str, units: Iterable[int], storage_options: dict[str, Any] | None = None,
                  depth: int = 4) -> Iterator[dict[str, np.ndarray]]:
    """Each unit's arrays in the order of ``units``, with up to ``depth`` reads in flight: on object
    storage, the next units download while the caller adds this one (``depth=1``: one at a time).

    The threads only read bytes; the npz is parsed in the calling thread. numpy parses each array's header
    with ``ast.literal_eval``, and CPython 3.11 can fail parsing on several threads at once ("AST constructor
    recursion depth mismatch", gh-106905): a helper's run hit it once in about 20 merges.
    """
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="partials") as pool:
        reads = storage.ahead(iter(units), lambda k: storage.read_bytes(npz_url(output, set_name, k), storage_options),
                              pool, depth)
        for data in reads:
            yield _parse(data)
