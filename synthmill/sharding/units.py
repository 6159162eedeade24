"""The committed-unit protocol: how a unit of work becomes done, for generate's shards and evaluate's partials.

A unit ``k`` is committed by writing its payload (``shards/K.tar``, ``partials/SET/K.npz``) and any files
that go with it (``index/K.parquet``), each atomically, and last its marker ``K.json`` beside the payload:
the unit's id, the payload's size and sha256, and what the unit was made from (the job's fingerprint and,
for an input that can change, its identity). The marker is the commit point (docs/design.md, invariant 3).

A unit is done only if its payload, its files and its marker all exist, the marker names the unit, has the
payload's size (and sha256, when asked) and every value it is expected to hold. Anything else (a missing or
damaged marker, a payload cut short, another job's marker) is not done, so it is computed again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from synthmill.sharding import storage
from synthmill.sharding.plan import shard_name as unit_name


@dataclass(frozen=True)
class LocalPayload:
    """A payload already written to a local file, with the size and sha256 its writer took as it wrote."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class CommittedUnits:
    """The units of one kind in one output: ``folder/K{suffix}`` payloads, ``folder/K.json`` markers, and
    ``companions``: (folder, suffix) of the files each unit commits before its marker."""

    folder: str
    suffix: str
    id_key: str  # the marker key that names the unit: "shard", "unit"
    companions: tuple[tuple[str, str], ...] = ()
    storage_options: Mapping[str, Any] | None = None

    def payload_url(self, k: int) -> str:
        return storage.join(self.folder, unit_name(k) + self.suffix)

    def marker_url(self, k: int) -> str:
        return storage.join(self.folder, unit_name(k) + ".json")

    def companion_url(self, i: int, k: int) -> str:
        folder, suffix = self.companions[i]
        return storage.join(folder, unit_name(k) + suffix)

    @property
    def _opts(self) -> dict[str, Any] | None:
        return dict(self.storage_options) if self.storage_options is not None else None

    def commit(self, k: int, payload: bytes | LocalPayload, marker: Mapping[str, Any],
               companions: Iterable[bytes] = ()) -> dict[str, Any]:
        """Publish unit ``k``: the payload, then each companion (in the order of ``self.companions``), then the
        marker with the unit's id, size and sha256 added. Returns the marker as written."""
        if isinstance(payload, LocalPayload):
            size, sha = payload.size, payload.sha256
            storage.put_file(payload.path, self.payload_url(k), self._opts)
        else:
            size, sha = len(payload), hashlib.sha256(payload).hexdigest()
            storage.write_bytes(self.payload_url(k), payload, self._opts)
        for i, data in enumerate(companions):
            storage.write_bytes(self.companion_url(i, k), data, self._opts)
        written = {**marker, self.id_key: k, "size": size, "sha256": sha}
        storage.write_json(self.marker_url(k), written, self._opts)
        return written

    def _sha256(self, k: int) -> str:
        url = self.payload_url(k)
        fs, path = storage.filesystem(url, self._opts)

        def digest() -> str:
            h = hashlib.sha256()
            with fs.open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            return h.hexdigest()

        return storage.retrying(url, "hash", digest)

    def done(self, ids: Iterable[int], expect: Callable[[int], Mapping[str, Any]], check: str = "size",
             threads: int = 16) -> dict[int, dict[str, Any]]:
        """Markers of the units among ``ids`` that are done, by id. ``expect(k)``: the values unit k's marker
        must hold (its fingerprint, its input's identity); ``check="sha256"`` also hashes each payload."""
        listed = storage.list_sizes(self.folder, self._opts)
        beside = [storage.list_sizes(folder, self._opts) if folder != self.folder else listed
                  for folder, _ in self.companions]
        candidates = [
            k for k in ids
            if unit_name(k) + ".json" in listed and unit_name(k) + self.suffix in listed
            and all(unit_name(k) + suffix in names for (_, suffix), names in zip(self.companions, beside, strict=True))
        ]

        def verify(k: int) -> dict[str, Any] | None:
            m = storage.read_json(self.marker_url(k), self._opts, damaged_as_missing=True)
            if (not isinstance(m, dict) or m.get(self.id_key) != k
                    or m.get("size") != listed[unit_name(k) + self.suffix]):
                return None
            if any(m.get(key) != value for key, value in expect(k).items()):
                return None
            if check == "sha256" and m.get("sha256") != self._sha256(k):
                return None
            return m

        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(verify, candidates))
        return {k: m for k, m in zip(candidates, results, strict=True) if m is not None}
