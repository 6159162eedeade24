"""``index.parquet``: one row per sample, streamed from per-shard parts (one row group each)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
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
        ("prompt_index", pa.int64()),
        ("image_index", pa.int64()),
        ("source_row", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("truncated", pa.bool_()),
        ("blank_prompt", pa.bool_()),
        ("nsfw", pa.bool_()),
    ]
)


def index_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with at least the schema's columns) -> a table with :data:`INDEX_SCHEMA`."""
    return pa.Table.from_pylist([{f: r.get(f) for f in INDEX_SCHEMA.names} for r in rows], schema=INDEX_SCHEMA)


def merge_index(layout: OutputLayout, shard_ids: Iterable[int], schema: pa.Schema = INDEX_SCHEMA) -> int:
    """Write ``OUTPUT/index.parquet`` from the parts of ``shard_ids`` (in order), with the columns of ``schema``
    (a generate job's :data:`INDEX_SCHEMA`, or a filter's); return the row count."""
    n = 0
    fd, tmp = tempfile.mkstemp(suffix=".parquet")
    os.close(fd)
    try:
        try:
            with pq.ParquetWriter(tmp, schema) as writer:
                for k in shard_ids:
                    data = storage.read_bytes(layout.shards.companion_url(0, k), layout.opts)
                    table = pq.read_table(pa.BufferReader(data)).cast(schema)
                    writer.write_table(table)
                    n += table.num_rows
        except OSError as e:  # the temporary's disk (TMPDIR), not the output's
            raise disk_full(e, f"{layout.file(INDEX)} (its temporary {tmp})") or e from None
        storage.put_file(tmp, layout.file(INDEX), layout.opts)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return n
