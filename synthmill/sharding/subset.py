"""Copying chosen samples of committed shards into a new shard: the filter job's unit of work.

Output shard ``k`` of a filter holds the selected samples ``[k*S, (k+1)*S)`` in source order, with new keys
``f"{i:010d}"`` (``i`` its place in the selection). Each comes from one source shard: the source tar is read
front to back through fsspec (local or ``s3://``) as a seekable file, so the data of a sample that is not
chosen is skipped, not read. A chosen sample's members are written byte for byte into the new tar
(:class:`~synthmill.sharding.writer.ShardTarWriter`, so its bytes depend only on the selection), except its
``json``, which gets its new ``key`` and ``shard`` and the ``source_key`` and ``source_shard`` it came from.
One sample is held at a time; the new shard's index part comes from the source shards' index parts.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from synthmill.sharding import storage
from synthmill.sharding.layout import OutputLayout
from synthmill.sharding.plan import sample_key
from synthmill.sharding.writer import ShardTarWriter

#: Index columns a filter output adds to its source's: where each sample came from.
LINEAGE_COLUMNS = (("source_key", pa.string()), ("source_shard", pa.int64()))


def output_schema(source: pa.Schema) -> pa.Schema:
    """The index schema of a filter output of a source whose index has ``source`` (the lineage columns replaced
    if the source is itself a filter output)."""
    fields = [f for f in source if f.name not in dict(LINEAGE_COLUMNS)]
    return pa.schema(fields + [pa.field(n, t) for n, t in LINEAGE_COLUMNS], metadata=source.metadata)


@dataclass(frozen=True)
class Selection:
    """The chosen samples of a source output, in source order: their keys and source shards."""

    keys: pa.Array  # string
    shards: Any  # numpy int64, one per key

    def __len__(self) -> int:
        return len(self.keys)

    def part(self, k: int, per_shard: int) -> tuple[int, list[str], Sequence[int]]:
        """(first output index, source keys, source shards) of output shard ``k``."""
        lo, hi = k * per_shard, min((k + 1) * per_shard, len(self.keys))
        return lo, self.keys.slice(lo, hi - lo).to_pylist(), self.shards[lo:hi]


def _split(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member name, as webdataset groups members into samples."""
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    return (key, ext) if key is not None and ext else None


def _chosen_samples(url: str, wanted: set[str], opts: dict[str, Any] | None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of the tar at ``url`` whose key is in ``wanted``, in tar order; the
    data of other members is skipped (seeked over), never read."""
    fs, path = storage.filesystem(url, opts)
    with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tf:
        key, members = None, {}
        while (info := tf.next()) is not None:
            tf.members.clear()  # tarfile keeps every header it reads; none is needed again
            split = _split(info.name) if info.isreg() else None
            if split is None or split[0] not in wanted:
                continue
            if split[0] != key:
                if key is not None:
                    yield key, members
                key, members = split[0], {}
            members[split[1]] = tf.extractfile(info).read()
        if key is not None:
            yield key, members


def _new_json(data: bytes | None, key: str, shard: int, source_key: str, source_shard: int) -> bytes:
    meta = json.loads(data) if data is not None else {}
    meta.update(key=key, shard=shard, source_key=source_key, source_shard=source_shard)
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


def copy_shard(source: OutputLayout, k: int, first: int, keys: list[str], shards: Sequence[int], schema: pa.Schema,
               tmp_dir: str | None = None, progress: Any = None) -> tuple[str, int, str, bytes, dict[str, Any]]:
    """Write output shard ``k``: the samples ``keys`` (each from source shard ``shards[j]``; source order) as
    samples ``first, first+1, ...``. Returns (temporary tar path, size, sha256, index part bytes, stats).

    ``progress(n)``, if given, is called after each sample. RuntimeError if a chosen sample is not in its shard.
    """
    by_shard: dict[int, set[str]] = {}
    for key, s in zip(keys, shards, strict=True):
        by_shard.setdefault(int(s), set()).add(key)
    new_of = {key: (first + j, int(s)) for j, (key, s) in enumerate(zip(keys, shards, strict=True))}
    writer = ShardTarWriter(tmp_dir, prefix=f".{k:06d}.")
    rows: list[pa.Table] = []
    written, member_bytes = 0, 0
    try:
        for s, wanted in by_shard.items():  # source shards ascending: keys are in source order
            url = source.shards.payload_url(s)
            found = 0
            for key, members in _chosen_samples(url, wanted, source.opts):  # a failure fails this attempt
                i, _ = new_of[key]
                members["json"] = _new_json(members.get("json"), sample_key(i), k, key, s)
                member_bytes += sum(len(v) for v in members.values())
                writer.write({"__key__": sample_key(i), **members})
                written += 1
                found += 1
                if progress is not None:
                    progress(1)
            if found != len(wanted):
                raise RuntimeError(f"{url}: {len(wanted) - found} of the {len(wanted)} samples chosen from it are not "
                                   "in it; the source output changed since the filter was planned")
            rows.append(_index_rows(source, s, wanted, new_of, k, schema))
        path, size, sha = writer.close()
    except BaseException:
        writer.discard()
        raise
    index = io.BytesIO()
    table = pa.concat_tables(rows) if rows else schema.empty_table()
    pq.write_table(table, index)
    return path, size, sha, index.getvalue(), {"count": written, "member_bytes": member_bytes,
                                               "source_shards": sorted(by_shard)}


def _index_rows(source: OutputLayout, s: int, wanted: set[str], new_of: dict[str, tuple[int, int]], k: int,
                schema: pa.Schema) -> pa.Table:
    """The chosen rows of source shard ``s``'s index part, renamed into the output (its keys, shard, lineage)."""
    import pyarrow.compute as pc

    url = source.shards.companion_url(0, s)
    part = pq.read_table(pa.BufferReader(storage.read_bytes(url, source.opts)))
    part = part.filter(pc.is_in(part["key"], value_set=pa.array(sorted(wanted), pa.string())))
    if part.num_rows != len(wanted):
        raise RuntimeError(f"{url}: holds {part.num_rows} of the {len(wanted)} keys chosen from shard {s}")
    old = part["key"].to_pylist()
    columns = {name: part[name] for name in part.column_names if name not in dict(LINEAGE_COLUMNS)}
    columns["key"] = pa.array([sample_key(new_of[key][0]) for key in old], pa.string())
    columns["shard"] = pa.array([k] * len(old), pa.int64())
    columns["source_key"] = pa.array(old, pa.string())
    columns["source_shard"] = pa.array([s] * len(old), pa.int64())
    table = pa.table({f.name: columns[f.name] for f in schema if f.name in columns})
    return table.cast(schema)
