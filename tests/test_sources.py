"""Prompt sources and the shard plan: every format gives the same rows, by range, from offsets."""

from __future__ import annotations

import csv
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthmill.sharding.plan import ShardPlan, sample_key
from synthmill.sharding.sources import open_source
from tests.conftest import PARTI

PROMPTS = [row["Prompt"] for row in csv.DictReader(open(PARTI, encoding="utf-8"), delimiter="\t")][:97]
PROMPTS[3] = ""  # a blank row
PROMPTS[10] = 'a "quoted", multi\nline prompt'  # quoting and a newline inside a CSV field


def write_all(folder, prompts: list[str] = PROMPTS) -> dict[str, str]:
    paths = {}
    p = folder / "p.txt"
    p.write_text("\n".join(x.replace("\n", " ") for x in prompts) + "\n", encoding="utf-8")
    paths["txt"] = str(p)
    p = folder / "p.jsonl"
    p.write_text("".join(json.dumps({"caption": x, "n": i}) + "\n" for i, x in enumerate(prompts)), encoding="utf-8")
    paths["jsonl"] = str(p)
    for ext, delim in (("csv", ","), ("tsv", "\t")):
        p = folder / f"p.{ext}"
        with open(p, "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh, delimiter=delim)
            w.writerow(["n", "caption"])
            w.writerows([i, x] for i, x in enumerate(prompts))
        paths[ext] = str(p)
    p = folder / "p.parquet"
    pq.write_table(pa.table({"n": list(range(len(prompts))), "caption": prompts}), p, row_group_size=10)
    paths["parquet"] = str(p)
    return paths


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("src"))


def expected(fmt: str, i: int) -> str:
    return PROMPTS[i].replace("\n", " ") if fmt == "txt" else PROMPTS[i]


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "tsv", "parquet"])
@pytest.mark.parametrize("stride", [1, 7, 200])
def test_ranges_read_from_offsets(sources, fmt, stride):
    src = open_source(sources[fmt], "caption", None)
    src.check()
    assert src.scan(stride) == len(PROMPTS)
    for start, stop in [(0, 97), (0, 1), (3, 4), (6, 21), (90, 97), (50, 51)]:
        rows = src.read_rows(start, stop)
        assert [r.index for r in rows] == list(range(start, stop))
        assert [r.text for r in rows] == [expected(fmt, i) for i in range(start, stop)]
    blank = src.read_rows(3, 4)[0]
    assert blank.blank and blank.text == ""
    assert not src.read_rows(10, 11)[0].blank


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "tsv", "parquet"])
def test_limit(sources, fmt):
    src = open_source(sources[fmt], "caption", 25)
    assert src.scan(4) == 25
    assert [r.text for r in src.read_rows(20, 25)] == [expected(fmt, i) for i in range(20, 25)]


def test_scan_keeps_offsets_not_prompts(sources):
    src = open_source(sources["tsv"], "caption", None)
    src.scan(10)
    assert len(src.offsets) == 10  # rows 0, 10, ..., 90
    assert all(isinstance(o, int) for o in src.offsets)


@pytest.mark.parametrize("name,content,needle", [
    ("bad.txt", b"ok\nfine\nbad \xff\n", "bad.txt: line 3 is not valid UTF-8"),
    ("bad.jsonl", b'{"caption": "ok"}\n{"caption": "fine"}\n{not json}\n', "bad.jsonl: line 3 is not valid JSON"),
    ("col.jsonl", b'{"caption": "ok"}\n{"caption": "fine"}\n{"text": "x"}\n', "'caption' not found in"),
    ("bad.csv", b"caption\nok\nfine\nbad \xff\n", "bad.csv: line 4 is not valid UTF-8"),
    ("big.tsv", b"caption\nok\nfine\n" + b"y" * 200_000 + b"\n",
     "big.tsv: data row 3 cannot be read as TSV (field larger"),
])
def test_a_bad_row_anywhere_fails_the_scan_naming_file_and_row(tmp_path, name, content, needle):
    """The scan parses every row it counts: a bad third row is a SpecError (exit 2 before anything runs),
    not a shard that fails on an actor; rows past ``prompts.limit`` are not read."""
    from synthmill.errors import SpecError

    p = tmp_path / name
    p.write_bytes(content)
    src = open_source(str(p), "caption", None)
    src.check()  # the first row is fine
    with pytest.raises(SpecError, match=re.escape(needle)):
        src.scan(1)
    assert open_source(str(p), "caption", 2).scan(1) == 2


def test_parquet_column_that_is_not_text(tmp_path):
    from synthmill.errors import SpecError

    p = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"caption": [[1, 2], [3]]}), p)
    with pytest.raises(SpecError, match=r"prompts.column 'caption' in .*lists.parquet holds list<.*>, not text"):
        open_source(str(p), "caption", None).scan(1)


def digest(path, limit=None) -> str:
    src = open_source(str(path), "caption", limit)
    src.scan(3)
    return src.digest


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "tsv", "parquet"])
def test_digest_is_the_rows_content(sources, fmt, tmp_path):
    """The digest the fingerprint takes: the same rows give the same digest at another path; a change in a
    counted row changes it, a change past ``prompts.limit`` does not."""
    import shutil

    here = digest(sources[fmt])
    assert here.startswith("sha256:") and len(here) == 71
    moved = tmp_path / f"moved.{fmt}"
    shutil.copy(sources[fmt], moved)
    assert digest(moved) == here
    assert digest(sources[fmt], 50) not in (here, digest(sources[fmt], 49))
    for row, limit, same in ((20, None, False), (20, 50, False), (60, 50, True)):
        edited = [x + " (edited)" if i == row else x for i, x in enumerate(PROMPTS)]
        folder = tmp_path / f"edit{row}-{limit}"
        folder.mkdir()
        changed = write_all(folder, edited)[fmt]
        assert (digest(changed, limit) == digest(sources[fmt], limit)) is same, (row, limit)


def test_digest_of_a_text_file_is_its_bytes_up_to_the_limit(sources):
    import hashlib

    data = open(sources["txt"], "rb").read()
    assert digest(sources["txt"]) == "sha256:" + hashlib.sha256(data).hexdigest()
    first_ten = b"".join(data.splitlines(keepends=True)[:10])
    assert digest(sources["txt"], 10) == "sha256:" + hashlib.sha256(first_ten).hexdigest()


def test_parquet_digest_ignores_row_groups_compression_and_other_columns(tmp_path):
    values = ["a cat", None, "", "a dog"] * 50
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"caption": values}), a, row_group_size=7)
    pq.write_table(pa.table({"n": list(range(200)), "caption": pa.array(values, pa.large_string())}), b,
                   row_group_size=64, compression="gzip")
    assert digest(a) == digest(b)
    c = tmp_path / "c.parquet"
    pq.write_table(pa.table({"caption": values[:-1] + [None]}), c)  # a value became null
    assert digest(c) != digest(a)


def test_plan_arithmetic():
    plan = ShardPlan(num_prompts=7, images_per_prompt=3, samples_per_shard=5, seed=100)
    assert (plan.num_samples, plan.num_shards) == (21, 5)
    assert list(plan.samples(4)) == [20]
    assert plan.prompts(1) == range(1, 4)  # samples 5..9 -> prompts 1, 2, 3
    assert plan.split(20) == (6, 2)
    assert plan.seed_of(20) == 120
    covered = [i for k in range(plan.num_shards) for i in plan.samples(k)]
    assert covered == list(range(21))
    assert sample_key(20) == "0000000020"
    with pytest.raises(IndexError):
        plan.samples(5)


def _corrupt_parquet(path) -> None:
    """Snappy-compressed pages whose bytes are overwritten; the footer still reads."""
    pq.write_table(pa.table({"caption": [f"caption number {i} " * 4 for i in range(5000)]}), path, compression="snappy")
    data = bytearray(path.read_bytes())
    data[100:2000] = b"\xab" * 1900
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, content, needle", [
    ("latin1.txt", "café au lait\nok\n".encode("latin-1"), "latin1.txt: line 1 is not valid UTF-8"),
    ("first.jsonl", b'{not json}\n{"caption": "a"}\n', "first.jsonl: line 1 is not valid JSON"),
    ("deep.jsonl", b'{"caption": "a"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n",
     "deep.jsonl: line 2 is not valid JSON"),
    ("dict.jsonl", b'{"caption": "a"}\n{"caption": {"x": 1}}\n', "'caption' in {path} line 2 is a mapping, not text"),
    ("list.jsonl", b'{"caption": [1]}\n', "'caption' in {path} line 1 is a list, not text"),
    ("short.csv", b"id,caption\n1,a\n2\n3,c\n",
     "short.csv: data row 2 has 1 field and no 'caption' (field 2 of the header)"),
    ("pages.parquet", None, "pages.parquet: column 'caption' cannot be read ("),
])
def test_rows_that_could_not_be_prompts_are_named_at_check_or_scan(tmp_path, name, content, needle):
    """A bad first row fails ``check()`` as a SpecError (it raised a bare ValueError), JSON nested past the
    parser's depth is invalid JSON (a RecursionError), a mapping or list is not a prompt (it became its
    repr), a CSV row without the column is named (it became a blank prompt), and a parquet file whose pages
    cannot be decoded names the file (an OSError from pyarrow)."""
    from synthmill.errors import SpecError

    p = tmp_path / name
    _corrupt_parquet(p) if content is None else p.write_bytes(content)
    src = open_source(str(p), "caption", None)
    with pytest.raises(SpecError, match=re.escape(needle.format(path=p))):
        src.check()
        src.scan(1)


@pytest.mark.parametrize("name, content", [
    ("bom.txt", b"a cat\nb dog\n"),
    ("bom.jsonl", b'{"caption": "a cat"}\n{"caption": "b dog"}\n'),
    ("bom.csv", b"caption,id\na cat,1\nb dog,2\n"),
])
def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path, name, content):
    """Windows tools start UTF-8 files with a byte-order mark: it is neither in the first prompt nor in the
    CSV header's first column name (which then was not found)."""
    p = tmp_path / name
    p.write_bytes(b"\xef\xbb\xbf" + content)
    src = open_source(str(p), "caption", None)
    src.check()
    assert src.scan(1) == 2
    assert [r.text for r in src.read_rows(0, 2)] == ["a cat", "b dog"]


def test_a_fifo_is_refused_not_read_forever(tmp_path):
    import os

    from synthmill.errors import SpecError

    p = tmp_path / "prompts.txt"
    os.mkfifo(p)
    with pytest.raises(SpecError, match=r"prompts.txt: not a regular file \(other\)"):
        open_source(str(p), "caption", None)


def test_a_quote_the_file_never_closes(tmp_path):
    """Python's csv reads an unclosed quote to the end of the file, rows and all, into one field: two rows
    became one prompt. A quoted field that spans lines and is closed, and PartiPrompts' row that starts with a
    quote, still read."""
    from synthmill.errors import SpecError

    p = tmp_path / "open.csv"
    p.write_bytes(b'id,caption\n1,a cat\n2,"a dog\n3,a bird\n')
    with pytest.raises(SpecError, match=r"open.csv: data row 2 opens a quoted field that is not closed before"):
        open_source(str(p), "caption", None).scan(1)
    p.write_bytes(b'id,caption\n1,a cat\n2,"a dog\non two lines"\n')
    src = open_source(str(p), "caption", None)
    assert src.scan(1) == 2 and src.read_rows(1, 2)[0].text == "a dog\non two lines"
    assert open_source(str(PARTI), "Prompt", None).scan(100) == 1632


def test_limits_blank_lines_and_a_mark_inside_the_file(tmp_path):
    """The unclosed-quote check only looks past the last counted row when the scan reached the end of the
    file (a limit stops it earlier, and the row past it is not this job's); a row of spaces is a blank
    prompt like an empty line; a U+FEFF that starts a row inside the file is the row's, whatever the stride."""
    p = tmp_path / "p.csv"
    p.write_bytes(b'id,caption\n1,a cat\n2,"a dog\non two lines"\n3,bird\n4,"never closed\n')
    assert open_source(str(p), "caption", 2).scan(1) == 2
    p.write_bytes("id,caption\n1,a cat\n   \n3,\ufeffb\n".encode("utf-8"))
    for stride in (1, 2, 3):
        src = open_source(str(p), "caption", None)
        assert src.scan(stride) == 3
        rows = src.read_rows(0, 3)
        assert [(r.text, r.blank) for r in rows] == [("a cat", False), ("", True), ("\ufeffb", False)], stride
