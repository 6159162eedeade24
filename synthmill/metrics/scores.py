"""Per-sample scores (``scores.parquet``) and per-category means, from the generated set's committed partials.

Every feature of the metrics table that is one number per image (``Feature.per_sample``: CLIP's cosine, a
preference score) gives a column; the rows are the samples in unit order and, within a unit, in the order the
unit was read, by key (each keyed partial keeps its samples' keys). For a synthmill generate output each key is
joined with the shard's own ``index/K.parquet``, which gives ``shard``, ``prompt_index`` and the safety checker's
``nsfw`` flag; other sets (image folders, foreign tars) have no such index, so those columns are null there.
Everything comes from committed files, so a resumed evaluation writes the same bytes.

Categories: each sample's ``prompt_index`` picks a row of a prompts file, whose ``column`` names the category
(PartiPrompts' ``Category`` or ``Challenge``); the table gives each category's count and the mean of every
per-sample column.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synthmill.errors import SpecError
from synthmill.metrics.base import Feature
from synthmill.sharding import storage

#: The columns every scores.parquet starts with; per-sample metric columns follow, then ``nsfw`` when known.
KEY_COLUMNS = (("key", pa.string()), ("shard", pa.int64()), ("prompt_index", pa.int64()))


class SampleScores:
    """The generated set's per-sample numbers, unit by unit, joined with its generate output's index parts."""

    def __init__(self, features: tuple[Feature, ...], index_url: Any = None, opts: dict[str, Any] | None = None):
        """``index_url(k)``: the URL of unit k's index part, for a synthmill generate output (None otherwise)."""
        self.features, self.index_url, self.opts = features, index_url, opts
        self.parts: list[dict[str, Any]] = []

    def add(self, k: int, arrays: Mapping[str, np.ndarray], keys_array: str) -> None:
        keys = [str(x) for x in arrays[keys_array]]
        part: dict[str, Any] = {"key": keys, "shard": [None] * len(keys), "prompt_index": [None] * len(keys)}
        for f in self.features:
            values = np.asarray(arrays[f.per_sample.array], np.float64)
            if len(values) != len(keys):
                raise RuntimeError(f"unit {k:06d}: {len(values)} {f.name} values for {len(keys)} samples")
            part[f.per_sample.column] = values
        if self.index_url is not None:
            url = self.index_url(k)
            index = pq.read_table(pa.BufferReader(storage.read_bytes(url, self.opts)),
                                  columns=["key", "shard", "prompt_index", "nsfw"]).to_pydict()
            rows = {key: i for i, key in enumerate(index["key"])}
            missing = [key for key in keys if key not in rows]
            if missing:
                raise RuntimeError(f"{url}: no row for the scored sample {missing[0]!r}")
            for name in ("shard", "prompt_index", "nsfw"):
                part[name] = [index[name][rows[key]] for key in keys]
        self.parts.append(part)

    @property
    def schema(self) -> pa.Schema:
        fields = [*KEY_COLUMNS, *((f.per_sample.column, pa.float64()) for f in self.features)]
        if self.index_url is not None:
            fields.append(("nsfw", pa.bool_()))
        return pa.schema(fields)

    def table(self) -> pa.Table:
        schema = self.schema
        columns = {}
        numbers = {f.per_sample.column for f in self.features}
        for name in schema.names:
            if name in numbers:  # float64 arrays, joined as they are
                values = np.concatenate([p[name] for p in self.parts]) if self.parts else np.zeros(0)
            else:
                values = [v for p in self.parts for v in p[name]]
            columns[name] = pa.array(values, type=schema.field(name).type)
        return pa.table(columns, schema=schema)


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as the bytes of a parquet file (the same table gives the same bytes)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def load_categories(url: str, column: str, storage_options: dict[str, Any] | None, rows_needed: int,
                    field: str = "categories") -> list[str | None]:
    """Every row's value of ``column`` in the prompts file ``url`` (blank: None), read with the same rules as the
    prompts of a generate job, so row ``i`` is ``prompt_index`` ``i``. SpecError naming ``field`` for a file or
    column that is not there, a file without columns, or fewer rows than ``rows_needed``."""
    from synthmill.sharding.sources import TextSource, open_source

    try:
        source = open_source(url, column, None, storage_options)
        if isinstance(source, TextSource):
            raise SpecError(f"{field}.path {url}: a .txt prompt file has no columns; give the prompts as .csv, "
                            ".tsv, .jsonl or .parquet")
        source.check()
        n = source.scan(max(1, rows_needed))
        rows = source.read_rows(0, n)
    except SpecError as e:
        message = str(e)
        if message.startswith("prompts."):
            message = f"{field}." + message[len("prompts."):]
        raise SpecError(message) from None
    except storage.StorageError as e:
        raise SpecError(f"{field}.path {url}: {e}") from None
    if n < rows_needed:
        raise SpecError(f"{field}.path {url}: {n} rows, but the generated set has {rows_needed} prompts")
    return [None if r.blank else r.text for r in rows]


def category_table(table: pa.Table, categories: list[str | None], columns: tuple[str, ...]) -> dict[str, Any]:
    """Per category (in sorted order): its sample count and the mean of each per-sample ``column``. Samples
    whose prompt has a blank category, or no prompt_index, are counted apart."""
    prompt_index = table.column("prompt_index").to_pylist()
    groups: dict[str, list[int]] = {}
    apart = 0
    for row, p in enumerate(prompt_index):
        c = categories[p] if p is not None else None
        if c is None:
            apart += 1
        else:
            groups.setdefault(c, []).append(row)
    values = {c: table.column(c).to_numpy() for c in columns}
    by = {}
    for c in sorted(groups):
        rows = np.asarray(groups[c])
        by[c] = {"count": len(rows), **{col: float(np.mean(values[col][rows])) for col in columns}}
    return {"by_category": by, "samples_without_category": apart}


def with_categories(table: pa.Table, by_column: Mapping[str, list[str | None]]) -> pa.Table:
    """``table`` with one string column per category column: each sample's category, picked by its prompt_index
    (null for a blank category or a sample without prompt_index)."""
    prompt_index = table.column("prompt_index").to_pylist()
    for name, categories in by_column.items():
        values = [categories[p] if p is not None else None for p in prompt_index]
        table = table.append_column(pa.field(name, pa.string()), pa.array(values, pa.string()))
    return table
