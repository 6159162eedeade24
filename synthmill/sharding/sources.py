"""Prompt sources: count rows once on the driver, read one shard's rows on an actor.

A source is a file of rows, one prompt per row: ``.txt`` (one a line), ``.jsonl`` (one object a
line, the prompt under ``column``), ``.csv`` / ``.tsv`` (header row, the prompt under ``column``)
and ``.parquet``. The driver calls :meth:`PromptSource.scan` once: it streams the file, counts rows
and keeps the byte offset of every ``stride``-th row (a few integers per shard, never the prompts).
An actor then reads rows ``[start, stop)`` by seeking to the nearest kept offset. Parquet needs no
scan: row counts come from its footer and reads pick the row groups that cover the range.

Blank prompts (empty or whitespace only, or a null cell) are kept: the sample is generated with
the empty prompt (unconditional), and its metadata says ``blank_prompt: true``. Rows are never
dropped, so ``prompt_index`` is always the row's position in the source.
"""

from __future__ import annotations

import abc
import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any, Iterator

from synthmill.errors import SpecError
from synthmill.sharding.storage import filesystem, retrying


@dataclass
class Row:
    """One prompt: its index in the source (0-based data row) and its text ('' when blank)."""

    index: int
    text: str
    blank: bool


def _clean(value: Any) -> tuple[str, bool]:
    if value is None:
        return "", True
    text = str(value)
    return (text, False) if text.strip() else ("", True)


@dataclass
class PromptSource(abc.ABC):
    """Base class: a prompt file at ``url``; subclasses know one format."""

    url: str
    column: str
    limit: int | None = None
    storage_options: dict[str, Any] | None = None
    num_rows: int = -1  # set by scan()
    stride: int = 1
    offsets: list[int] = field(default_factory=list)  # byte offset of rows 0, stride, 2*stride, ...

    def open(self, mode: str = "rb"):
        fs, path = filesystem(self.url, self.storage_options)
        return fs.open(path, mode)

    @abc.abstractmethod
    def check(self) -> None:
        """Cheap checks for ``validate``: the file opens, the column exists, there is a row."""

    @abc.abstractmethod
    def scan(self, stride: int) -> int:
        """Count rows (up to ``limit``), keeping every ``stride``-th row's offset; return the count."""

    @abc.abstractmethod
    def read_rows(self, start: int, stop: int) -> list[Row]:
        """Rows ``[start, stop)`` in order."""

    def _cap(self, n: int) -> int:
        return n if self.limit is None else min(n, self.limit)

    def _record(self, positions: Iterator[int], stride: int) -> int:
        """Count rows from their byte positions (up to ``limit``), keeping every ``stride``-th one."""
        self.stride, self.offsets = stride, []
        n = 0
        for index, pos in enumerate(positions):
            if self.limit is not None and index >= self.limit:
                break
            if index % stride == 0:
                self.offsets.append(pos)
            n = index + 1
        self.num_rows = n
        return n


class _LineSource(PromptSource):
    """Formats with one record per physical line (.txt, .jsonl)."""

    @abc.abstractmethod
    def _parse(self, line: bytes, lineno: int) -> tuple[str, bool]:
        """(prompt text, blank?) of one line; ``lineno`` is 1-based, for messages."""

    def _lines(self, fh, start_index: int) -> Iterator[tuple[int, int, bytes]]:
        """(row index, byte offset, raw line without newline) from the current position."""
        pos = fh.tell()
        index = start_index
        for raw in fh:
            yield index, pos, raw.rstrip(b"\n").rstrip(b"\r")
            pos += len(raw)
            index += 1

    def check(self) -> None:
        with self.open() as fh:
            for _, _, line in self._lines(fh, 0):
                self._parse(line, 1)
                return
        raise SpecError(f"prompts.path {self.url}: the prompt source is empty (no rows)")

    def scan(self, stride: int) -> int:
        with self.open() as fh:
            return self._record((pos for _, pos, _ in self._lines(fh, 0)), stride)

    def read_rows(self, start: int, stop: int) -> list[Row]:
        block = start // self.stride
        out: list[Row] = []
        with self.open() as fh:
            fh.seek(self.offsets[block])
            for index, _, line in self._lines(fh, block * self.stride):
                if index >= stop:
                    break
                if index >= start:
                    out.append(Row(index, *self._parse(line, index + 1)))
        return out


class TextSource(_LineSource):
    def _parse(self, line: bytes, lineno: int) -> tuple[str, bool]:
        try:
            return _clean(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{self.url}: line {lineno} is not valid UTF-8") from None


class JsonlSource(_LineSource):
    def _parse(self, line: bytes, lineno: int) -> tuple[str, bool]:
        if not line.strip():
            return "", True
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{self.url}: line {lineno} is not valid JSON: {e}") from None
        if not isinstance(obj, dict) or self.column not in obj:
            keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
            raise SpecError(f"prompts.column '{self.column}' not found in {self.url} line {lineno} (it has: {keys})")
        return _clean(obj[self.column])


class DelimitedSource(PromptSource):
    """.csv and .tsv with a header row; quoted fields may span lines."""

    delimiter = ","
    col_index: int = -1  # set by scan()

    def _reader(self, fh) -> tuple[Iterator[tuple[int, list[str]]], list[str]]:
        """(byte offset of each record, its fields) and the header; offsets are exact across quotes."""
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
        consumed = [0]

        def lines() -> Iterator[str]:
            for line in text:
                consumed[0] += len(line.encode("utf-8"))
                yield line

        reader = csv.reader(lines(), delimiter=self.delimiter)
        header = next(reader, None)
        if header is None:
            raise SpecError(f"prompts.path {self.url}: the file is empty (no header row)")

        def records() -> Iterator[tuple[int, list[str]]]:
            start = consumed[0]
            for rec in reader:
                yield start, rec
                start = consumed[0]

        return records(), header

    def _col(self, header: list[str]) -> int:
        if self.column not in header:
            raise SpecError(f"prompts.column '{self.column}' not found in {self.url} (columns: {', '.join(header)})")
        return header.index(self.column)

    def check(self) -> None:
        with self.open() as fh:
            records, header = self._reader(fh)
            self._col(header)
            if next(records, None) is None:
                raise SpecError(f"prompts.path {self.url}: the prompt source is empty (a header, no rows)")

    def scan(self, stride: int) -> int:
        with self.open() as fh:
            records, header = self._reader(fh)
            self.col_index = self._col(header)
            return self._record((pos for pos, _ in records), stride)

    def read_rows(self, start: int, stop: int) -> list[Row]:
        block = start // self.stride
        out: list[Row] = []
        col = self.col_index
        with self.open() as fh:
            fh.seek(self.offsets[block])
            text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
            for index, rec in enumerate(csv.reader(text, delimiter=self.delimiter), start=block * self.stride):
                if index >= stop:
                    break
                if index >= start:
                    value = rec[col] if col < len(rec) else None
                    out.append(Row(index, *_clean(value)))
        return out


class TsvSource(DelimitedSource):
    delimiter = "\t"


class ParquetSource(PromptSource):
    def _file(self, fh):
        import pyarrow.parquet as pq

        return pq.ParquetFile(fh)

    def check(self) -> None:
        with self.open() as fh:
            try:
                pf = self._file(fh)
            except Exception as e:  # pyarrow raises ArrowInvalid for non-parquet bytes
                raise SpecError(f"prompts.path {self.url}: not a parquet file ({e})") from None
            names = pf.schema_arrow.names
            if self.column not in names:
                raise SpecError(f"prompts.column '{self.column}' not found in {self.url} (columns: {', '.join(names)})")
            if pf.metadata.num_rows == 0:
                raise SpecError(f"prompts.path {self.url}: the prompt source is empty (no rows)")

    def scan(self, stride: int) -> int:
        with self.open() as fh:
            self.num_rows = self._cap(self._file(fh).metadata.num_rows)
        self.stride = stride
        return self.num_rows

    def read_rows(self, start: int, stop: int) -> list[Row]:
        out: list[Row] = []
        with self.open() as fh:
            pf = self._file(fh)
            first = 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if first < stop and first + n > start:
                    values = pf.read_row_group(g, columns=[self.column]).column(0).to_pylist()
                    lo, hi = max(start, first), min(stop, first + n)
                    out.extend(Row(i, *_clean(values[i - first])) for i in range(lo, hi))
                first += n
                if first >= stop:
                    break
        return out


#: file suffix -> source class.
SOURCES: dict[str, type[PromptSource]] = {
    ".txt": TextSource,
    ".jsonl": JsonlSource,
    ".csv": DelimitedSource,
    ".tsv": TsvSource,
    ".parquet": ParquetSource,
}


def open_source(url: str, column: str, limit: int | None, storage_options: dict[str, Any] | None = None) -> PromptSource:
    """The source for ``url`` by its suffix; SpecError for an unknown suffix or a missing file."""
    suffix = "." + url.rsplit(".", 1)[-1].lower() if "." in url.rsplit("/", 1)[-1] else ""
    if suffix not in SOURCES:
        raise SpecError(f"prompts.path {url}: unknown prompt file type {suffix or '(none)'!r} (known: {', '.join(SOURCES)})")
    fs, path = filesystem(url, storage_options)
    if not retrying(url, "open", lambda: fs.exists(path)):
        raise SpecError(f"prompts.path {url}: file not found")
    if retrying(url, "open", lambda: fs.isdir(path)):
        raise SpecError(f"prompts.path {url}: is a folder, not a prompt file")
    return SOURCES[suffix](url=url, column=column, limit=limit, storage_options=storage_options)
