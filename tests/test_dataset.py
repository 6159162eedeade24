"""Building a dataset with generate: several sizes in one job, prompt columns carried into every sample, per-row
settings, and a prompt file that grows between runs (docs/dataset.md).

One parquet job (9 rows, three sizes, kept and per-row columns, 3 shards, 2 actors) feeds most assertions; its
rerun with one actor must give the same bytes. A small SDXL job on a .tsv file is grown by appending rows.
"""

from __future__ import annotations

import datetime
import glob
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthmill.cli import main
from tests.conftest import files_under, read_wds, run_job, tar_hashes

SIZES = [[32, 32], [32, 48], [48, 32]]
CAPTIONS = ["a red cube on a table", "a dog running on grass", "a bowl of fruit", "a city street at night",
            "a boat on a lake", "a cat asleep on a sofa", "a mountain under snow", "a cup of coffee", "a green bicycle"]
ROWS = {  # the per-row columns (None: the row takes the job's setting)
    "neg": [None, "blurry", None, None, "blurry, dark", None, None, None, None],
    "seed": [None, None, None, None, 777, None, None, 5, None],
    "cfg": [None, None, 3.0, None, None, None, None, None, 1.0],
    "size": ["32x48", None, None, None, None, "48x32", None, None, None],
}


def expected(i: int) -> dict:
    """What row i's sample must have been made with (seed 1000 + i, cfg 7.5, sizes[i % 3] unless the row says)."""
    size = ROWS["size"][i]
    h, w = (int(x) for x in size.split("x")) if size else SIZES[i % 3]
    return {"height": h, "width": w, "seed": ROWS["seed"][i] if ROWS["seed"][i] is not None else 1000 + i,
            "guidance_scale": ROWS["cfg"][i] if ROWS["cfg"][i] is not None else 7.5, "negative_prompt": ROWS["neg"][i]}


def dataset_spec(model: str, prompts: str, output: str) -> dict:
    return {
        "kind": "generate",
        "model": {"path": model},
        "prompts": {"path": prompts, "column": "caption", "keep": ["id", "category", "score"],
                    "per_row": {"negative_prompt": "neg", "seed": "seed", "guidance_scale": "cfg", "size": "size"}},
        "sampling": {"steps": 2, "guidance_scale": 7.5, "sizes": SIZES, "seed": 1000},
        "output": {"path": output, "samples_per_shard": 4},
        "cluster": {"num_actors": 2, "batch_size": 2},
    }


@pytest.fixture(scope="module")
def dataset(ray_address, tiny_sd, tmp_path_factory):
    """The parquet job run once with 2 actors: (spec, output, prompts path)."""
    import yaml

    from synthmill.jobs import generate
    from synthmill.jobs.spec import load_spec

    folder = tmp_path_factory.mktemp("dataset")
    prompts = str(folder / "prompts.parquet")
    table = pa.table({
        "caption": CAPTIONS, "id": pa.array(range(100, 109), pa.int64()),
        "category": ["object", "animal", "food", "place", "object", "animal", "place", "food", "object"],
        "score": pa.array([i / 8 for i in range(9)], pa.float64()),
        "neg": ROWS["neg"], "seed": pa.array(ROWS["seed"], pa.int64()), "cfg": pa.array(ROWS["cfg"], pa.float64()),
        "size": ROWS["size"],
    })
    pq.write_table(table, prompts, row_group_size=4)
    spec = dataset_spec(tiny_sd, prompts, str(folder / "out"))
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    summary = generate.run(generate.prepare(load_spec(str(folder / "job.yaml"))))
    assert summary["status"] == "complete" and summary["samples"] == 9 and summary["shards"] == 3
    return spec, spec["output"]["path"], prompts


def test_every_sample_has_its_rows_size_and_settings(dataset):
    from PIL import Image

    _, out, _ = dataset
    samples = {s["__key__"]: s for s in read_wds(out)}
    assert sorted(samples) == [f"{i:010d}" for i in range(9)]
    seen = set()
    for i in range(9):
        s, want = samples[f"{i:010d}"], expected(i)
        meta = json.loads(s["json"])
        assert {k: meta[k] for k in want} == want, i
        assert Image.open(io.BytesIO(s["png"])).size == (want["width"], want["height"]), i
        seen.add((want["height"], want["width"]))
    assert seen == {(32, 32), (32, 48), (48, 32)}
    index = pq.read_table(os.path.join(out, "index.parquet"))
    assert index.column("key").to_pylist() == [f"{i:010d}" for i in range(9)]
    assert [(r["height"], r["width"], r["seed"]) for r in index.to_pylist()] == \
        [(expected(i)["height"], expected(i)["width"], expected(i)["seed"]) for i in range(9)]


def test_batches_never_mix_sizes(dataset):
    """Each marker lists its batches (height, width, samples) in the order the tar holds their samples: every
    sample of a batch has that size, and the settings one pipeline call shares."""
    _, out, _ = dataset
    for k in range(3):
        marker = json.load(open(os.path.join(out, "shards", f"{k:06d}.json")))
        tar = os.path.join(out, "shards", f"{k:06d}.tar")
        import webdataset as wds

        metas = [json.loads(s["json"]) for s in wds.WebDataset(tar, shardshuffle=False, empty_check=False)]
        assert sum(n for _, _, n in marker["batches"]) == marker["count"] == len(metas)
        at = 0
        for h, w, n in marker["batches"]:
            assert 1 <= n <= 2
            batch = metas[at:at + n]
            at += n
            assert {(m["height"], m["width"]) for m in batch} == {(h, w)}, (k, batch)
            assert len({(m["guidance_scale"], m["negative_prompt"] is None) for m in batch}) == 1
        assert len(marker["batches"]) > -(-marker["count"] // 2) or k == 2  # grouping by size made more batches


def test_rerun_with_one_actor_is_byte_identical(dataset, write_spec, tmp_path):
    spec, out, _ = dataset
    copy = str(tmp_path / "copy")
    summary = run_job(write_spec, dict(spec, output=dict(spec["output"], path=copy),
                                       cluster=dict(spec["cluster"], num_actors=1)))
    assert summary["samples_run"] == 9
    assert tar_hashes(copy) == tar_hashes(out) and len(tar_hashes(out)) == 3
    index = [open(os.path.join(folder, "index.parquet"), "rb").read() for folder in (copy, out)]
    assert index[0] == index[1]


def test_kept_columns_read_back_with_their_types(dataset):
    import ray
    from datasets import load_dataset

    _, out, _ = dataset
    want = {f"{i:010d}": {"id": 100 + i, "score": i / 8} for i in range(9)}
    for s in read_wds(out):  # webdataset
        meta = json.loads(s["json"])
        assert {k: meta[k] for k in ("id", "score")} == want[s["__key__"]]
        assert type(meta["id"]) is int and type(meta["score"]) is float and type(meta["category"]) is str
    ds = load_dataset("webdataset", data_files={"train": os.path.join(out, "shards", "*.tar")}, split="train")
    assert {r["__key__"]: {"id": r["json"]["id"], "score": r["json"]["score"]} for r in ds} == want
    rows = ray.data.read_webdataset(sorted(glob.glob(os.path.join(out, "shards", "*.tar"))), decoder=None).take_all()
    got = {r["__key__"]: json.loads(r["json"]) for r in rows}
    assert {k: {"id": m["id"], "score": m["score"]} for k, m in got.items()} == want
    assert got["0000000001"]["category"] == "animal"
    index = pq.read_table(os.path.join(out, "index.parquet"))
    assert (index.schema.field("id").type, index.schema.field("category").type, index.schema.field("score").type) == \
        (pa.int64(), pa.string(), pa.float64())
    assert index.schema.field("height").type == pa.int64()
    assert index.column("id").to_pylist() == list(range(100, 109))
    assert index.column("category").to_pylist()[:2] == ["object", "animal"]


def test_per_row_negative_prompt_and_seed_equal_a_bare_call(dataset):
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

    spec, out, _ = dataset
    pipe = DiffusionPipeline.from_pretrained(spec["model"]["path"])
    pipe.set_progress_bar_config(disable=True)
    samples = {s["__key__"]: s for s in read_wds(out)}
    for i in (4, 2, 0):  # negative prompt and seed; guidance scale; size
        want = expected(i)
        image = pipe(CAPTIONS[i], negative_prompt=want["negative_prompt"], num_inference_steps=2,
                     guidance_scale=want["guidance_scale"], height=want["height"], width=want["width"],
                     generator=torch.Generator("cpu").manual_seed(want["seed"]), output_type="np").images[0]
        ours = np.asarray(Image.open(io.BytesIO(samples[f"{i:010d}"]["png"])).convert("RGB")).astype(int)
        assert np.abs((image * 255).round().astype(int) - ours).max() <= 1, i
    # the comparison can fail: the job's own negative prompt (none) and seed give another image
    other = pipe(CAPTIONS[4], num_inference_steps=2, guidance_scale=7.5, height=expected(4)["height"],
                 width=expected(4)["width"], generator=torch.Generator("cpu").manual_seed(1004),
                 output_type="np").images[0]
    ours = np.asarray(Image.open(io.BytesIO(samples["0000000004"]["png"])).convert("RGB")).astype(int)
    assert np.abs((other * 255).round().astype(int) - ours).max() > 10


@pytest.mark.parametrize("change, needle", [
    ({"size": ["32x48", None, "31x32", None, None, None, None, None, None]},
     "data row 3, column 'size' (prompts.per_row.size): 31x32: each side must be a multiple of 8"),
    ({"seed": pa.array([None, None, None, None, None, None, -4, None, None], pa.int64())},
     "data row 7, column 'seed' (prompts.per_row.seed): -4 is outside 0..2**63-1"),
    ({"cfg": ["1", "2", "x", None, None, None, None, None, None]},
     "data row 3, column 'cfg' (prompts.per_row.guidance_scale): 'x' is not a number"),
    ({"score": pa.array([datetime.date(2024, 1, 1)] * 9)},
     "data row 1, column 'score' (prompts.keep): date datetime.date(2024, 1, 1) cannot be written as JSON"),
    ({"category": None}, "prompts.keep: column 'category' not found in"),
])
def test_bad_row_values_are_exit_2_naming_row_and_column(dataset, write_spec, tmp_path, capsys, change, needle):
    spec, _, prompts = dataset
    table = pq.read_table(prompts)
    for name, values in change.items():
        i = table.column_names.index(name)
        table = table.remove_column(i) if values is None else table.set_column(i, name, pa.array(values))
    bad = str(tmp_path / "bad.parquet")
    pq.write_table(table, bad)
    out = str(tmp_path / "out")
    assert main(["validate", write_spec(dict(spec, prompts=dict(spec["prompts"], path=bad),
                                             output=dict(spec["output"], path=out)))]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(out)


# ---- a growing prompt file (SDXL, .tsv) ----

def _tsv(rows: list[tuple[int, str]], trailing_newline: bool) -> str:
    return "id\tcaption\n" + "\n".join(f"{i}\t{c}" for i, c in rows) + ("\n" if trailing_newline else "")


def test_appended_rows_make_only_new_shards(ray_address, tiny_sdxl, write_spec, tmp_path, capsys):
    """4 rows (2 shards: 3 + 1 samples), then 10 appended: only their 10 samples run, as 4 new shards after the old
    short one; the old files keep their inode and mtime. An edited or removed old row is exit 2 naming it."""
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

    prompts = tmp_path / "prompts.tsv"
    first = [(i, f"a photo of object {i}") for i in range(4)]
    more = [(i, f"a painting of scene {i}") for i in range(4, 14)]
    prompts.write_text(_tsv(first, trailing_newline=False))  # appending then adds a line ending to the last row
    out = str(tmp_path / "out")
    spec = {"kind": "generate", "model": {"path": tiny_sdxl},
            "prompts": {"path": str(prompts), "column": "caption", "keep": ["id"]},
            "sampling": {"steps": 2, "sizes": [[32, 48], [48, 32]], "seed": 7},
            "output": {"path": out, "samples_per_shard": 3}, "cluster": {"num_actors": 1, "batch_size": 2}}
    path = write_spec(spec)
    assert run_job(write_spec, spec)["samples_run"] == 4
    before = files_under(out)
    old = {f: v for f, v in before.items() if f.startswith(("shards/", "index/"))}
    assert sorted(old) == ["index/000000.parquet", "index/000001.parquet", "shards/000000.json",
                           "shards/000000.tar", "shards/000001.json", "shards/000001.tar"]

    with open(prompts, "a", encoding="utf-8") as fh:
        fh.write("\n" + "\n".join(f"{i}\t{c}" for i, c in more) + "\n")
    assert main(["run", path, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["prompts"], plan["prompts_new"], plan["shards"], plan["shards_done"]) == (14, 10, 6, 2)
    summary = run_job(write_spec, spec)
    assert (summary["shards_resumed"], summary["shards_run"], summary["samples_run"]) == (2, 4, 10)
    after = files_under(out)
    assert {f: after[f] for f in old} == old  # never rewritten
    counts = [json.load(open(os.path.join(out, "shards", f"{k:06d}.json")))["count"] for k in range(6)]
    assert counts == [3, 1, 3, 3, 3, 1]
    index = pq.read_table(os.path.join(out, "index.parquet")).to_pylist()
    assert [r["key"] for r in index] == [f"{i:010d}" for i in range(14)]
    assert [r["id"] for r in index] == [str(i) for i in range(14)]  # a .tsv column is text
    assert [r["seed"] for r in index] == [7 + i for i in range(14)]
    assert [(r["height"], r["width"]) for r in index] == [(32, 48) if i % 2 == 0 else (48, 32) for i in range(14)]
    plan = json.load(open(os.path.join(out, "plan.json")))
    assert [(p["prompts"], p["shards"]) for p in plan["grown_from"]] == [(4, 2)]
    assert main(["status", out]) == 0
    assert "14: 4 in the first run, then 10 appended" in capsys.readouterr().out
    assert run_job(write_spec, spec).get("complete_already")

    # SDXL's size conditioning is the sample's own size: sample 5 (48x32) equals a bare call at that size
    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl)
    pipe.set_progress_bar_config(disable=True)
    sample = {s["__key__"]: s for s in read_wds(out)}["0000000005"]
    ours = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")).astype(int)
    assert ours.shape == (48, 32, 3)
    image = pipe(more[1][1], num_inference_steps=2, guidance_scale=7.5, height=48, width=32,
                 original_size=(48, 32), target_size=(48, 32),
                 generator=torch.Generator("cpu").manual_seed(12), output_type="np").images[0]
    assert np.abs((image * 255).round().astype(int) - ours).max() <= 1

    # an edited old row, and removed rows: exit 2 before anything is written
    edited = first[:1] + [(1, "a photo of something else")] + first[2:] + more
    prompts.write_text(_tsv(edited, trailing_newline=True))
    assert main(["run", path]) == 2
    err = capsys.readouterr().err
    assert "rows 1..3 (those of shard 000000, the first one whose rows changed) differ" in err, err
    prompts.write_text(_tsv(first + more[:5], trailing_newline=True))
    assert main(["run", path]) == 2
    err = capsys.readouterr().err
    assert "it has 9 rows" in err and "rows 10..14 were removed" in err, err
    assert files_under(out) == after


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_the_scan_knows_the_old_rows_of_a_grown_file(tmp_path, fmt):
    """The digest of a file's first rows, taken while scanning it grown, is the digest the old file had: for parquet
    whatever its row groups, for text formats byte for byte (a last row without a line ending may gain one)."""
    from synthmill.sharding.sources import open_source

    rows = [{"caption": f"prompt {i}\nover two lines" if i == 2 else f"prompt {i}", "id": i, "seed": 10 * i or None}
            for i in range(12)]  # row 0 has no seed: it takes the job's

    def write(name: str, n: int, ending: bool = True) -> str:
        path = str(tmp_path / f"{name}.{fmt}")
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(rows[:n]), path, row_group_size=5 if n > 6 else 2)
        elif fmt == "csv":
            import csv

            with open(path, "w", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, ["caption", "id", "seed"], lineterminator="\n")
                w.writeheader()
                w.writerows(rows[:n])
            if not ending:
                data = open(path, "rb").read()
                open(path, "wb").write(data[:-1])
        else:
            open(path, "w", encoding="utf-8").write(
                "\n".join(json.dumps(r) for r in rows[:n]) + ("\n" if ending else ""))
        return path

    def scanned(path: str, marks=()):
        source = open_source(path, "caption", None, None, ("id",), {"seed": "seed"})
        source.check()
        source.scan(3, marks)
        return source

    old = scanned(write("old", 7, ending=fmt == "parquet"))
    grown = scanned(write("grown", 12), (7,))
    assert old.digest in grown.prefix_digests[7] and grown.digest != old.digest
    edited = rows[3]["id"]
    rows[3]["id"] = 99
    assert old.digest not in scanned(write("edited", 12), (7,)).prefix_digests[7]
    rows[3]["id"] = edited
    got = grown.read_rows(0, 12)
    assert [r.values["id"] for r in got] == (list(range(12)) if fmt == "parquet" else [str(i) for i in range(12)])
    assert [r.settings["seed"] for r in got[1:]] == [10 * i for i in range(1, 12)] and got[0].settings == {}
    assert got[2].text == "prompt 2\nover two lines"
