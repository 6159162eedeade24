"""``index.parquet``: one row per sample, streamed from per-shard parts (one row group each).

Its columns are :data:`INDEX_SCHEMA`'s, then the job's kept prompt columns (``prompts.keep``) with their types.
A part written before a column existed (``height``, ``width`` and ``guidance_scale`` came later) gives nulls in
it, so an output started by earlier code still merges."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from synthmill.errors import disk_full
from synthmill.sharding import storage
from synthmill.sharding.layout import INDEX, OutputLayout

#: The columns of ``index.parquet`` (and of each part), in order.
INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.int64()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("guidance_scale", pa.float64()),
        ("prompt_index", pa.int64()),
        ("image_index", pa.int64()),
        ("source_row", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("truncated", pa.bool_()),
        ("blank_prompt", pa.bool_()),
        ("nsfw", pa.bool_()),
    ]
)


def index_schema(keep_types: Iterable[tuple[str, pa.DataType]] = ()) -> pa.Schema:
    """:data:`INDEX_SCHEMA` and the kept columns, (name, type) each."""
    return pa.schema([*INDEX_SCHEMA, *(pa.field(name, t) for name, t in keep_types)])


def index_table(rows: list[dict[str, Any]], keep_types: Iterable[tuple[str, pa.DataType]] = ()) -> pa.Table:
    """Rows (dicts with at least the schema's columns) -> a table with :func:`index_schema`."""
    schema = index_schema(keep_types)
    return pa.Table.from_pylist([{f: r.get(f) for f in schema.names} for r in rows], schema=schema)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in order: nulls for any it lacks (a part of earlier code)."""
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


#: Index parts the merge reads at once (threads; twice as many are queued ahead).
READ_AHEAD = 8


def merge_index(layout: OutputLayout, shard_ids: Iterable[int],
                keep_types: Iterable[tuple[str, pa.DataType]] = (), schema: pa.Schema | None = None) -> int:
    """Write ``OUTPUT/index.parquet`` from the parts of ``shard_ids`` (in order); return the row count. Its columns
    are ``schema``'s when given (a filter's: its source's and the lineage columns), else :func:`index_schema`'s."""
    schema = schema if schema is not None else index_schema(keep_types)
    n = 0
    fd, tmp = tempfile.mkstemp(suffix=".parquet")
    os.close(fd)
    try:
        try:
            with pq.ParquetWriter(tmp, schema) as writer, ThreadPoolExecutor(READ_AHEAD) as pool:
                # the parts are read READ_AHEAD at a time, in order: on S3 each is a request of its own, and
                # one after another they would cost the merge a round trip per shard (docs/scale.md)
                read = lambda k: storage.read_bytes(layout.shards.companion_url(0, k), layout.opts)  # noqa: E731
                for data in storage.ahead(iter(shard_ids), read, pool, 2 * READ_AHEAD):
                    table = _conform(pq.read_table(pa.BufferReader(data)), schema)
                    writer.write_table(table)
                    n += table.num_rows
        except OSError as e:  # the temporary's disk (TMPDIR), not the output's
            raise disk_full(e, f"{layout.file(INDEX)} (its temporary {tmp})") or e from None
        storage.put_file(tmp, layout.file(INDEX), layout.opts)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return n
