"""Per-unit partial results of an evaluate job, committed like generate's shards (synthmill.sharding.units).

Unit ``k`` of set ``S`` (``generated`` or ``reference``) is committed as ``partials/S/K.npz`` (the
FID features of its samples, or their float64 sums for a unit of 4,096 or more, their IS logits and CLIP
cosines) and then ``partials/S/K.json``, the marker: sample
count, npz size and sha256, the job fingerprint and the identity of the input it was computed from.
A unit is done only if its marker matches all three, so a rerun resumes, and a changed input or
changed settings are computed again rather than mixed in.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from synthmill.sharding import storage
from synthmill.sharding.layout import OutputLayout
from synthmill.sharding.units import CommittedUnits

#: The partial's array (and marker flag) of its samples' keys, in sample order, kept when a feature of the set is one
#: number per image (``scores.parquet``).
KEYS = "keys"


def set_units(output: str, set_name: str, storage_options: dict[str, Any] | None = None) -> CommittedUnits:
    """The committed units of set ``set_name`` in the evaluate output ``output``."""
    return OutputLayout(output, storage_options).partials(set_name)


def npz_url(output: str, set_name: str, k: int) -> str:
    return set_units(output, set_name).payload_url(k)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as the bytes of an (uncompressed) .npz file."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def commit(output: str, set_name: str, k: int, arrays: dict[str, np.ndarray], marker: dict[str, Any],
           storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the npz, then the marker (the commit point); return the marker."""
    return set_units(output, set_name, storage_options).commit(k, npz_bytes(arrays), {**marker, "set": set_name})


def done(output: str, set_name: str, identities: dict[int, str], fingerprint: str,
         storage_options: dict[str, Any] | None = None, keyed: bool = False) -> dict[int, dict[str, Any]]:
    """Markers of the units (unit id -> input identity) whose committed partial is valid; ``keyed``: which also
    keeps its samples' keys (a partial committed before keys were kept is scored again)."""
    extra = {KEYS: True} if keyed else {}
    return set_units(output, set_name, storage_options).done(
        identities, lambda k: {"fingerprint": fingerprint, "identity": identities[k], **extra})


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
    recursion depth mismatch", gh-106905): a chaos run of the evaluate job hit it once in about 20 merges.
    """
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="partials") as pool:
        reads = storage.ahead(iter(units), lambda k: storage.read_bytes(npz_url(output, set_name, k), storage_options),
                              pool, depth)
        for data in reads:
            yield _parse(data)
