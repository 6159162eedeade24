"""Prompt sources and the shard plan: every format gives the same rows, by range, from offsets."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthmill.sharding.plan import ShardPlan, sample_key
from synthmill.sharding.sources import open_source
from tests.conftest import PARTI

PROMPTS = [row["Prompt"] for row in csv.DictReader(open(PARTI, encoding="utf-8"), delimiter="\t")][:97]
PROMPTS[3] = ""  # a blank row
PROMPTS[10] = 'a "quoted", multi\nline prompt'  # quoting and a newline inside a CSV field


def write_all(folder) -> dict[str, str]:
    paths = {}
    p = folder / "p.txt"
    p.write_text("\n".join(x.replace("\n", " ") for x in PROMPTS) + "\n", encoding="utf-8")
    paths["txt"] = str(p)
    p = folder / "p.jsonl"
    p.write_text("".join(json.dumps({"caption": x, "n": i}) + "\n" for i, x in enumerate(PROMPTS)), encoding="utf-8")
    paths["jsonl"] = str(p)
    for ext, delim in (("csv", ","), ("tsv", "\t")):
        p = folder / f"p.{ext}"
        with open(p, "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh, delimiter=delim)
            w.writerow(["n", "caption"])
            w.writerows([i, x] for i, x in enumerate(PROMPTS))
        paths[ext] = str(p)
    p = folder / "p.parquet"
    pq.write_table(pa.table({"n": list(range(len(PROMPTS))), "caption": PROMPTS}), p, row_group_size=10)
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


def test_bad_jsonl_row_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"caption": "ok"}\n{not json}\n', encoding="utf-8")
    src = open_source(str(p), "caption", None)
    src.scan(1)
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2 is not valid JSON"):
        src.read_rows(0, 2)


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
