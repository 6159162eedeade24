"""Prompt sources: count rows once on the driver, read one shard's rows on an actor.

A source is a file of rows, one prompt per row: ``.txt`` (one a line), ``.jsonl`` (one object a
line, the prompt under ``column``), ``.csv`` / ``.tsv`` (header row, the prompt under ``column``)
and ``.parquet``. The driver calls :meth:`PromptSource.scan` once: it streams the file, counts rows
and keeps the byte offset of every ``stride``-th row (a few integers per shard, never the prompts).
An actor then reads rows ``[start, stop)`` by seeking to the nearest kept offset. Parquet row counts
come from its footer and reads pick the row groups that cover the range.

The scan also parses every row it counts, so a bad row anywhere (invalid UTF-8 or JSON, a missing
column, a field over the CSV size limit) is a SpecError naming the file and line before anything
runs, and it computes :attr:`PromptSource.digest`, the sha256 of the rows' content: the bytes of the
counted rows (and a CSV's header) for the text formats, the prompt column's values for parquet. The
job's fingerprint includes it, so an output is never resumed with other prompts than it was started
with (docs/design.md invariant 2).

Blank prompts (empty or whitespace only, or a null cell) are kept: the sample is generated with
the empty prompt (unconditional), and its metadata says ``blank_prompt: true``. Rows are never
dropped, so ``prompt_index`` is always the row's position in the source.

Columns besides the prompt (``keep``, carried into each sample's metadata, and ``per_row``, settings that
override sampling for a row; :mod:`synthmill.sharding.rows`) are read and checked row by row in the same scan.
For parquet they join the digest; the text formats' digest covers every byte already. The scan can also take
the digest of the first ``m`` rows for given ``marks`` (:attr:`PromptSource.prefix_digests`): a prompt file
that grew is recognised by the digest of its old rows.
"""

from __future__ import annotations

import abc
import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from synthmill.errors import SpecError
from synthmill.sharding.rows import json_value, row_settings
from synthmill.sharding.storage import filesystem, is_transient, retrying


@dataclass
class Row:
    """One prompt: its index in the source (0-based data row) and its text ('' when blank), with the values of
    its kept columns and the per-row settings it gives (synthmill.sharding.rows)."""

    index: int
    text: str
    blank: bool
    values: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


#: a column a row lacks (a .jsonl object without the key, a short .csv row)
ABSENT = object()


BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark: skipped at the start of a text file
NOT_TEXT = (dict, list)  # JSON values that are not a prompt (null, numbers and booleans are read as text)


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
    digest: str = ""  # "sha256:..." of the counted rows' content, set by scan()
    keep: tuple[str, ...] = ()  # columns carried into each sample's metadata
    per_row: dict[str, str] = field(default_factory=dict)  # setting -> the column that may override it per row
    #: row count m -> digests of the first m rows (scan's ``marks``): as they are, and for the text formats
    #: also without the line ending of row m-1 (a file that ended without one, before rows were appended)
    prefix_digests: dict[int, tuple[str, ...]] = field(default_factory=dict)
    keep_types: list[tuple[str, Any]] = field(default_factory=list)  # (column, pyarrow type) of each kept column
    max_row_seed: int = -1  # the largest seed a row gives (per_row.seed), -1 if none; set by scan()

    @property
    def extra_columns(self) -> list[str]:
        """The columns read besides the prompt, each once."""
        return list(dict.fromkeys([*self.keep, *self.per_row.values()]))

    def _field_of(self, column: str) -> str:
        """The spec field that names ``column``, for messages."""
        if column in self.keep:
            return "prompts.keep"
        return "prompts.per_row." + next(k for k, v in self.per_row.items() if v == column)

    def _missing_column(self, column: str, columns: list[str]) -> SpecError:
        return SpecError(f"{self._field_of(column)}: column '{column}' not found in {self.url} "
                         f"(columns: {', '.join(columns)})")

    def _extras(self, index: int, raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(kept values, settings) of row ``index`` from its raw values (``column -> value``, ABSENT where the
        row lacks the column); SpecError naming the row and column for a bad value."""
        where = f"prompts.path {self.url}: data row {index + 1}"
        values = {}
        for c in self.keep:
            v = raw.get(c, ABSENT)
            if v is ABSENT:
                raise SpecError(f"{where} has no '{c}' (prompts.keep)")
            why = json_value(v)
            if why:
                raise SpecError(f"{where}, column '{c}' (prompts.keep): {why}")
            values[c] = self._keep_value(v)
        try:
            settings = row_settings({c: v for c, v in raw.items() if v is not ABSENT}, self.per_row)
        except ValueError as e:
            column, setting, problem = e.args
            raise SpecError(f"{where}, column '{column}' (prompts.per_row.{setting}): {problem}") from None
        if settings.get("seed", -1) > self.max_row_seed:
            self.max_row_seed = settings["seed"]
        return values, settings

    def _row(self, index: int, value: Any, raw: dict[str, Any] | None = None) -> Row:
        """Row ``index`` with prompt ``value`` and the raw values of its other columns."""
        text, blank = _clean(value)
        if raw is None or not self.extra_columns:
            return Row(index, text, blank)
        return Row(index, text, blank, *self._extras(index, raw))

    def open(self, mode: str = "rb"):
        fs, path = filesystem(self.url, self.storage_options)
        return fs.open(path, mode)

    @abc.abstractmethod
    def check(self) -> None:
        """Cheap checks for ``validate``: the file opens, the column exists, there is a row."""

    @abc.abstractmethod
    def scan(self, stride: int, marks: tuple[int, ...] = ()) -> int:
        """Count rows (up to ``limit``), keeping every ``stride``-th row's offset; return the count. For each m in
        ``marks`` below the count, :attr:`prefix_digests` gets the digest of the first m rows."""

    def _keep_value(self, value: Any) -> Any:
        """A kept column's value as the metadata holds it."""
        return value

    def _text_keep_types(self) -> None:
        import pyarrow as pa

        self.keep_types = [(c, pa.string()) for c in self.keep]

    @abc.abstractmethod
    def read_rows(self, start: int, stop: int) -> list[Row]:
        """Rows ``[start, stop)`` in order."""

    def _cap(self, n: int) -> int:
        return n if self.limit is None else min(n, self.limit)

    def _record(self, positions: Iterator[int], stride: int, hashed: _PrefixHash, marks: tuple[int, ...] = ()) -> int:
        """Count rows from their byte positions (up to ``limit``), keeping every ``stride``-th one; the
        digest covers the bytes before the first row past the limit, or the whole file. The digest of the
        first m rows, for each m in ``marks``, covers the bytes before row m."""
        self.stride, self.offsets, self.prefix_digests = stride, [], {}
        n = 0
        end = None
        wanted = set(marks)
        for index, pos in enumerate(positions):
            if self.limit is not None and index >= self.limit:
                end = pos
                break
            if index % stride == 0:
                self.offsets.append(pos)
            if index in wanted:
                self.prefix_digests[index] = hashed.digest_at(pos)
            hashed.settle(pos)
            n = index + 1
        self.num_rows = n
        self.digest = hashed.hexdigest(end)
        return n


class _PrefixHash:
    """sha256 of a file's first bytes, fed as they are read; where they end is known only when the scan
    stops (at the first row past ``prompts.limit``, or at the end of the file)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._pending = bytearray()
        self._base = 0  # file offset of _pending[0]

    def feed(self, data: bytes) -> None:
        self._pending += data

    def settle(self, pos: int, at_least: int = 1 << 20) -> None:
        """The bytes before ``pos`` are final: hash them once a MiB has gathered (all but the last two, which
        :meth:`digest_at` may leave out)."""
        n = pos - 2 - self._base
        if n >= at_least:
            self._hash.update(bytes(self._pending[:n]))
            del self._pending[:n]
            self._base += n

    def digest_at(self, pos: int) -> tuple[str, str]:
        """Digests of the bytes before ``pos``: all of them, and without a last line ending."""
        tail = bytes(self._pending[:pos - self._base])
        full, stripped = self._hash.copy(), self._hash.copy()
        full.update(tail)
        stripped.update(tail[:-2] if tail.endswith(b"\r\n") else tail[:-1] if tail.endswith(b"\n") else tail)
        return "sha256:" + full.hexdigest(), "sha256:" + stripped.hexdigest()

    def hexdigest(self, end: int | None) -> str:
        """The digest of the bytes before ``end`` (every byte fed when None)."""
        return self.digest_at(self._base + len(self._pending) if end is None else end)[0]


class _LineSource(PromptSource):
    """Formats with one record per physical line (.txt, .jsonl)."""

    @abc.abstractmethod
    def _parse(self, line: bytes, lineno: int) -> tuple[str, bool]:
        """(prompt text, blank?) of one line; ``lineno`` is 1-based, for messages."""

    def _raw(self, line: bytes) -> dict[str, Any]:
        """The values of the extra columns in one line (already parsed once, so known to be valid)."""
        raise SpecError(f"prompts.path {self.url}: a {type(self).__name__} has no columns besides the prompt")

    def _check_batch(self, lines: list[bytes], first: int) -> None:
        self._check_lines(lines, first)
        if self.extra_columns:
            for i, line in enumerate(lines):
                self._extras(first + i, self._raw(line))

    def _lines(self, fh, start_index: int, hashed: _PrefixHash | None = None) -> Iterator[tuple[int, int, bytes]]:
        """(row index, byte offset, raw line without newline) from the current position."""
        pos = fh.tell()
        index = start_index
        for raw in fh:
            if hashed is not None:
                hashed.feed(raw)
            line = raw.rstrip(b"\n").rstrip(b"\r")
            yield index, pos, line[len(BOM):] if pos == 0 and line.startswith(BOM) else line
            pos += len(raw)
            index += 1

    def check(self) -> None:
        with self.open() as fh:
            for _, _, line in self._lines(fh, 0):
                self._check_lines([line], 0)
                return
        raise SpecError(f"prompts.path {self.url}: the prompt source is empty (no rows)")

    def _check_lines(self, lines: list[bytes], first: int) -> None:
        """Parse ``lines`` (rows ``first``, ``first`` + 1, ...); SpecError naming the first bad one."""
        for i, line in enumerate(lines):
            try:
                self._parse(line, first + i + 1)
            except SpecError:
                raise
            except ValueError as e:
                raise SpecError(f"prompts.path {e}") from None

    def scan(self, stride: int, marks: tuple[int, ...] = ()) -> int:
        hashed = _PrefixHash()
        batch: list[bytes] = []
        self._text_keep_types()

        def parsed() -> Iterator[int]:
            for index, pos, line in self._lines(fh, 0, hashed):
                if self.limit is None or index < self.limit:
                    batch.append(line)
                    if len(batch) == 4096:
                        self._check_batch(batch, index + 1 - len(batch))
                        batch.clear()
                yield pos

        with self.open() as fh:
            n = self._record(parsed(), stride, hashed, marks)
        self._check_batch(batch, n - len(batch))  # the last rows (all rows were counted by now)
        return n

    def read_rows(self, start: int, stop: int) -> list[Row]:
        block = start // self.stride
        out: list[Row] = []
        with self.open() as fh:
            fh.seek(self.offsets[block])
            for index, _, line in self._lines(fh, block * self.stride):
                if index >= stop:
                    break
                if index >= start:
                    text, blank = self._parse(line, index + 1)
                    row = Row(index, text, blank)
                    if self.extra_columns:
                        row.values, row.settings = self._extras(index, self._raw(line))
                    out.append(row)
        return out


class TextSource(_LineSource):
    def _parse(self, line: bytes, lineno: int) -> tuple[str, bool]:
        try:
            return _clean(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{self.url}: line {lineno} is not valid UTF-8") from None

    def _check_lines(self, lines: list[bytes], first: int) -> None:
        try:  # one decode for the batch; line by line only to name a bad one
            b"\n".join(lines).decode("utf-8")
        except UnicodeDecodeError:
            super()._check_lines(lines, first)


class JsonlSource(_LineSource):
    def _parse(self, line: bytes, lineno: int) -> tuple[str, bool]:
        if not line.strip():
            return "", True
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:  # RecursionError: nesting too deep for the parser
            raise ValueError(f"{self.url}: line {lineno} is not valid JSON: {e}") from None
        if not isinstance(obj, dict) or self.column not in obj:
            keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
            raise SpecError(f"prompts.column '{self.column}' not found in {self.url} line {lineno} (it has: {keys})")
        value = obj[self.column]
        if isinstance(value, (dict, list)):
            raise SpecError(f"prompts.column '{self.column}' in {self.url} line {lineno} is a "
                            f"{'mapping' if isinstance(value, dict) else 'list'}, not text")
        return _clean(value)

    def _raw(self, line: bytes) -> dict[str, Any]:
        if not line.strip():  # a blank line: a blank prompt, and no value in any column
            return dict.fromkeys(self.extra_columns)
        obj = json.loads(line)
        return {c: obj[c] for c in self.extra_columns if c in obj}

    def _keep_value(self, value: Any) -> Any:
        """Text as it is; other JSON values as their JSON text (kept columns of text formats are strings)."""
        return value if value is None or isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    def _check_lines(self, lines: list[bytes], first: int) -> None:
        # One json.loads for the batch (as an array of its non-blank lines) is ~10x faster than one a
        # line; line by line only when that fails or a line is not one object with the column.
        filled = [line for line in lines if line.strip()]
        try:
            objs = json.loads(b"[" + b",".join(filled) + b"]")
            if len(objs) == len(filled) and all(type(o) is dict and self.column in o
                                                and type(o[self.column]) not in NOT_TEXT for o in objs):
                return
        except (ValueError, RecursionError):
            pass
        super()._check_lines(lines, first)


class DelimitedSource(PromptSource):
    """.csv and .tsv with a header row; quoted fields may span lines."""

    delimiter = ","
    kind = "CSV"
    col_index: int = -1  # set by scan()
    extra_index: dict[str, int] = field(default_factory=dict)  # extra column -> its field, set by scan()

    def _lines(self, fh, hashed: _PrefixHash | None, consumed: list[int]) -> Iterator[str]:
        """The file's lines, decoded one by one (a bad byte is named by its line); ``consumed[0]`` counts
        the bytes handed out so far."""
        at_start = fh.tell() == 0  # a byte-order mark there is not text; a U+FEFF that starts a later row is
        for lineno, raw in enumerate(fh, 1):
            consumed[0] += len(raw)
            if hashed is not None:
                hashed.feed(raw)
            try:
                yield raw.decode("utf-8-sig" if lineno == 1 and at_start else "utf-8")
            except UnicodeDecodeError:
                raise SpecError(f"prompts.path {self.url}: line {lineno} is not valid UTF-8") from None

    def _reader(self, fh, hashed: _PrefixHash | None = None) -> tuple[Iterator[tuple[int, list[str]]], list[str]]:
        """(byte offset of each record, its fields) up to ``limit``, and the header; offsets are exact
        across quotes. A record that cannot be read is a SpecError naming it."""
        consumed = [0]

        def read(it: Iterator[list[str]], row: int) -> list[str] | None:
            """The next record; ``row``: its 1-based data row (0: the header), for messages."""
            try:
                return next(it, None)
            except csv.Error as e:
                what = "the header row" if row == 0 else f"data row {row}"
                raise SpecError(f"prompts.path {self.url}: {what} cannot be read as {self.kind} ({e})") from None

        reader = csv.reader(self._lines(fh, hashed, consumed), delimiter=self.delimiter)
        header = read(reader, 0)
        if header is None:
            raise SpecError(f"prompts.path {self.url}: the file is empty (no header row)")

        def records() -> Iterator[tuple[int, list[str]]]:
            start, n = consumed[0], 1
            while (self.limit is None or n <= self.limit) and (rec := read(reader, n)) is not None:
                yield start, rec
                start, n = consumed[0], n + 1

        return records(), header

    def _col(self, header: list[str]) -> int:
        if self.column not in header:
            raise SpecError(f"prompts.column '{self.column}' not found in {self.url} (columns: {', '.join(header)})")
        for c in self.extra_columns:
            if c not in header:
                raise self._missing_column(c, header)
        self.extra_index = {c: header.index(c) for c in self.extra_columns}
        return header.index(self.column)

    def _raw(self, rec: list[str]) -> dict[str, Any]:
        return {c: rec[i] if i < len(rec) else ABSENT for c, i in self.extra_index.items()}

    def check(self) -> None:
        with self.open() as fh:
            records, header = self._reader(fh)
            self._col(header)
            if next(records, None) is None:
                raise SpecError(f"prompts.path {self.url}: the prompt source is empty (a header, no rows)")

    def scan(self, stride: int, marks: tuple[int, ...] = ()) -> int:
        hashed = _PrefixHash()
        self._text_keep_types()
        extras = bool(self.extra_columns)
        with self.open() as fh:
            records, header = self._reader(fh, hashed)
            self.col_index = col = self._col(header)
            last: list[tuple[int, int, list[str]]] = []

            def positions() -> Iterator[int]:
                for row, (pos, rec) in enumerate(records, 1):
                    if len(rec) <= col and any(f.strip() for f in rec):  # an empty or blank line is a blank row
                        fields = f"{len(rec)} field{'s' if len(rec) > 1 else ''}"
                        raise SpecError(f"prompts.path {self.url}: data row {row} has {fields} and no "
                                        f"'{self.column}' (field {col + 1} of the header)")
                    if extras:
                        self._extras(row - 1, self._raw(rec))
                    last[:] = [(row, pos, rec)]
                    yield pos

            n = self._record(positions(), stride, hashed, marks)
            to_the_end = self.limit is None or n < self.limit  # else the scan stopped before the end of the file
            if to_the_end and last and any("\n" in f or "\r" in f for f in last[0][2]):
                self._check_closed(fh, *last[0][:2])
            return n

    def _check_closed(self, fh, row: int, pos: int) -> None:
        """A SpecError when the last record, at byte ``pos`` (a field of it spans lines), opens a quote that the
        file never closes: Python's csv then reads the rest of the file into that field, rows and all. One
        record is read again, in strict mode (its field is at most csv's field size limit)."""
        fh.seek(pos)
        lines = (raw.decode("utf-8", errors="replace") for raw in fh)
        try:
            next(csv.reader(lines, delimiter=self.delimiter, strict=True), None)
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise SpecError(f"prompts.path {self.url}: data row {row} opens a quoted field that is not closed "
                                "before the end of the file") from None

    def read_rows(self, start: int, stop: int) -> list[Row]:
        block = start // self.stride
        out: list[Row] = []
        col = self.col_index
        with self.open() as fh:
            fh.seek(self.offsets[block])
            lines = self._lines(fh, None, [0])
            for index, rec in enumerate(csv.reader(lines, delimiter=self.delimiter), start=block * self.stride):
                if index >= stop:
                    break
                if index >= start:
                    value = rec[col] if col < len(rec) else None
                    out.append(self._row(index, value, self._raw(rec)))
        return out


class TsvSource(DelimitedSource):
    delimiter = "\t"
    kind = "TSV"


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
            for c in self.extra_columns:
                if c not in names:
                    raise self._missing_column(c, names)
            if pf.metadata.num_rows == 0:
                raise SpecError(f"prompts.path {self.url}: the prompt source is empty (no rows)")

    def scan(self, stride: int, marks: tuple[int, ...] = ()) -> int:
        """Row count from the footer; the digest from the prompt column's values (and the extra columns'), read
        in batches."""
        # Three running hashes (null flags, value lengths, value bytes), so the digest depends on the
        # values only, not on how the file splits them into row groups and pages; a fourth, of each row's
        # extra values as JSON, when the job reads extra columns.
        hashes = [hashlib.sha256() for _ in range(4 if self.extra_columns else 3)]
        self.prefix_digests = {}
        with self.open() as fh:
            pf = self._file(fh)
            schema = pf.schema_arrow
            self.keep_types = [(c, schema.field(c).type) for c in self.keep]
            self.num_rows = left = self._cap(pf.metadata.num_rows)
            done = 0
            cuts = sorted(m for m in marks if 0 < m < self.num_rows)
            for batch in self._batches(pf):
                if left <= 0:
                    break
                batch = batch.slice(0, left)
                left -= batch.num_rows
                lo = 0
                for m in [c - done for c in cuts if done < c < done + batch.num_rows] + [batch.num_rows]:
                    self._hash_rows(batch.slice(lo, m - lo), done + lo, hashes)
                    lo = m
                    if m < batch.num_rows or done + m in cuts:
                        self.prefix_digests[done + m] = (self._digest(hashes),)
                done += batch.num_rows
        self.stride = stride
        self.digest = self._digest(hashes)
        return self.num_rows

    @staticmethod
    def _digest(hashes: list[Any]) -> str:
        return "sha256:" + hashlib.sha256(b"".join(h.digest() for h in hashes)).hexdigest()

    def _hash_rows(self, batch: Any, first: int, hashes: list[Any]) -> None:
        """Feed the rows of ``batch`` (row ``first`` onwards) to the running ``hashes``, checking each."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        nulls, lengths, data = hashes[:3]
        if batch.num_rows == 0:
            return
        col = batch.column(0)
        try:
            col = col.cast(pa.large_string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise SpecError(f"prompts.column '{self.column}' in {self.url} holds {col.type}, "
                            "not text") from None
        nulls.update(col.is_null().to_numpy(zero_copy_only=False).tobytes())
        if col.null_count:  # an Arrow null may own bytes in the data buffer: no part of the values
            col = pc.fill_null(col, "")
        offsets = np.frombuffer(col.buffers()[1], dtype=np.int64)[col.offset:col.offset + len(col) + 1]
        lengths.update(np.diff(offsets).astype("<i8").tobytes())
        if col.buffers()[2] is not None:
            data.update(memoryview(col.buffers()[2])[int(offsets[0]):int(offsets[-1])])
        if len(hashes) > 3:
            extras = self.extra_columns
            columns = [batch.column(i + 1).to_pylist() for i in range(len(extras))]
            for j, values in enumerate(zip(*columns, strict=True)):
                raw = dict(zip(extras, values, strict=True))
                self._extras(first + j, raw)
                hashes[3].update(json.dumps(values, default=repr, ensure_ascii=False).encode() + b"\n")

    def _batches(self, pf) -> Iterator[Any]:
        """The prompt column (and the extra ones) in record batches; a page that cannot be decoded is a SpecError
        naming the file."""
        import pyarrow as pa

        batches = pf.iter_batches(batch_size=65536, columns=[self.column, *self.extra_columns])
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise SpecError(f"prompts.path {self.url}: column '{self.column}' cannot be read ({e})") from None
            except OSError as e:  # pyarrow's ArrowIOError is OSError: corrupt pages, but also the network
                if e.errno is not None or type(e) is not OSError or is_transient(e):
                    raise  # the storage's trouble, not the file's
                raise SpecError(f"prompts.path {self.url}: column '{self.column}' cannot be read ({e})") from None
            if batch is None:
                return
            yield batch

    def read_rows(self, start: int, stop: int) -> list[Row]:
        out: list[Row] = []
        with self.open() as fh:
            pf = self._file(fh)
            first = 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if first < stop and first + n > start:
                    extras = self.extra_columns
                    table = pf.read_row_group(g, columns=[self.column, *extras])
                    values = table.column(0).to_pylist()
                    more = {c: table.column(c).to_pylist() for c in extras}
                    lo, hi = max(start, first), min(stop, first + n)
                    out.extend(self._row(i, values[i - first], {c: v[i - first] for c, v in more.items()})
                               for i in range(lo, hi))
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


def rows_digest(rows: list[Row]) -> str:
    """A digest of what rows hold (prompt, kept values, settings): a shard's marker keeps its rows', so a rerun
    can name the first committed shard whose rows were edited since."""
    blob = json.dumps([[r.index, r.text, r.blank, r.values, r.settings] for r in rows], sort_keys=True,
                      ensure_ascii=False, default=repr)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def open_source(url: str, column: str, limit: int | None,
                storage_options: dict[str, Any] | None = None, keep: tuple[str, ...] = (),
                per_row: dict[str, str] | None = None) -> PromptSource:
    """The source for ``url`` by its suffix; SpecError for an unknown suffix or a missing file. ``keep`` and
    ``per_row``: the columns read besides the prompt (synthmill.sharding.rows)."""
    suffix = "." + url.rsplit(".", 1)[-1].lower() if "." in url.rsplit("/", 1)[-1] else ""
    if suffix not in SOURCES:
        raise SpecError(f"prompts.path {url}: unknown prompt file type {suffix or '(none)'!r} "
                        f"(known: {', '.join(SOURCES)})")
    fs, path = filesystem(url, storage_options)
    if not retrying(url, "open", lambda: fs.exists(path)):
        raise SpecError(f"prompts.path {url}: file not found")
    info = retrying(url, "open", lambda: fs.info(path))
    if info.get("type") == "directory":
        raise SpecError(f"prompts.path {url}: is a folder, not a prompt file")
    if info.get("type") not in ("file", None):  # a FIFO or a device would block or never end
        raise SpecError(f"prompts.path {url}: not a regular file ({info.get('type')})")
    return SOURCES[suffix](url=url, column=column, limit=limit, storage_options=storage_options, keep=tuple(keep),
                           per_row=dict(per_row or {}))
