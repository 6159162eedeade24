"""``kind: filter``: samples of a generate output chosen by a DuckDB condition over its index and per-sample scores,
copied into new committed shards, read from and written to a moto S3 server (tests/test_s3.py's).

One small generate output (the session's reference job, tiny_sd, 22 samples in 5 shards) is uploaded once and
feeds every filter here, with a ``scores.parquet`` in the shape an evaluate job writes (key, shard, prompt_index,
clip_score, nsfw) made with pyarrow.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthmill.cli import main
from tests.conftest import read_wds, tar_hashes
from tests.test_s3 import s3  # noqa: F401 - the moto server fixture

WHERE = "clip_score > 0.25 AND NOT nsfw AND image_index = 0"
PER_SHARD = 2


def score_of(i: int) -> tuple[float, bool]:
    """(clip_score, nsfw) of sample i: made up, deterministic."""
    return 0.20 + 0.01 * ((i * 7) % 13), i % 5 == 0


def scores_table(keys: list[str], shards: list[int], prompt_index: list[int]) -> pa.Table:
    rows = [score_of(int(k)) for k in keys]
    return pa.table({"key": keys, "shard": shards, "prompt_index": prompt_index,
                     "clip_score": [r[0] for r in rows], "nsfw": [r[1] for r in rows]})


@pytest.fixture(scope="module")
def source(reference, s3):  # noqa: F811
    """The reference output on S3 (s3://synth/gen) and its scores (s3://synth/eval/scores.parquet); the keys the
    condition WHERE chooses, computed here in Python."""
    _, out = reference
    fs = s3["fs"]
    fs.put(out, "synth/gen", recursive=True)
    index = pq.read_table(os.path.join(out, "index.parquet"))
    scores = scores_table(index["key"].to_pylist(), index["shard"].to_pylist(), index["prompt_index"].to_pylist())
    buf = io.BytesIO()
    pq.write_table(scores, buf)
    fs.pipe_file("synth/eval/scores.parquet", buf.getvalue())
    chosen = [(k, s) for k, s, j in zip(index["key"].to_pylist(), index["shard"].to_pylist(),
                                        index["image_index"].to_pylist(), strict=True)
              if score_of(int(k))[0] > 0.25 and not score_of(int(k))[1] and j == 0]
    assert 3 <= len(chosen) < 11, chosen  # some chosen, some not
    return {"local": out, "chosen": chosen, "scores": scores,
            "scores_sha256": hashlib.sha256(buf.getvalue()).hexdigest()}


def filter_spec(s3: dict, output: str, where: str = WHERE, **extra) -> dict:  # noqa: F811
    spec = {"kind": "filter", "source": {"path": "s3://synth/gen"}, "scores": {"path": "s3://synth/eval"},
            "where": where, "output": {"path": output, "samples_per_shard": PER_SHARD},
            "cluster": {"num_actors": 2},
            "storage": {"endpoint_url": s3["endpoint"], **s3["creds"]}}
    spec.update(extra)
    return spec


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def test_filter_on_s3_copies_the_chosen_samples_byte_for_byte(reference, s3, source, write_spec, tmp_path,  # noqa: F811
                                                              capsys):
    fs, chosen = s3["fs"], source["chosen"]
    path = write_spec(filter_spec(s3, "s3://synth/clean"))
    assert main(["run", path, "--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    n_shards = -(-len(chosen) // PER_SHARD)
    assert (dry["selected"], dry["rejected"], dry["source_samples"], dry["shards"], dry["shards_done"]) == \
        (len(chosen), 22 - len(chosen), 22, n_shards, 0)
    assert not fs.exists("synth/clean")  # a dry run writes nothing
    assert main(["run", path]) == 0
    assert capsys.readouterr().out.startswith(f"done: {len(chosen)} of 22 samples selected into {n_shards} shards")
    fs.invalidate_cache()
    # every chosen sample, in source order, under its new key: image and caption bytes as in the source tar
    source_members: dict[str, bytes] = {}
    for k in range(5):
        source_members.update(members(open(os.path.join(source["local"], "shards", f"{k:06d}.tar"), "rb").read()))
    local = tmp_path / "clean"
    fs.get("synth/clean/shards", str(local / "shards"), recursive=True)
    samples = read_wds(str(local))  # webdataset reads the output as it is
    assert [s["__key__"] for s in samples] == [f"{i:010d}" for i in range(len(chosen))]
    for i, (s, (old, old_shard)) in enumerate(zip(samples, chosen, strict=True)):
        assert s["png"] == source_members[f"{old}.png"] and s["txt"] == source_members[f"{old}.txt"], old
        meta, before = json.loads(s["json"]), json.loads(source_members[f"{old}.json"])
        assert meta == {**before, "key": f"{i:010d}", "shard": i // PER_SHARD, "source_key": old,
                        "source_shard": old_shard}
        assert {m for m in s if not m.startswith("__")} == {"png", "txt", "json"}
    # the index: the source rows of the chosen samples, renamed, with where each came from
    index = pq.read_table(io.BytesIO(fs.cat_file("synth/clean/index.parquet")))
    src_index = pq.read_table(os.path.join(source["local"], "index.parquet")).to_pylist()
    by_key = {r["key"]: r for r in src_index}
    for i, row in enumerate(index.to_pylist()):
        old = chosen[i][0]
        assert row == {**by_key[old], "key": f"{i:010d}", "shard": i // PER_SHARD, "source_key": old,
                       "source_shard": chosen[i][1]}
    lineage = json.loads(fs.cat_file("synth/clean/lineage.json"))
    assert lineage["condition"] == WHERE and lineage["scores"]["sha256"] == source["scores_sha256"]
    assert lineage["counts"] == {"source_samples": 22, "without_scores": 0, "selected": len(chosen),
                                 "rejected": 22 - len(chosen), "shards": n_shards}
    assert lineage["source"]["path"] == "s3://synth/gen" and lineage["source"]["samples"] == 22
    # status and dry run see it complete; the same command again keeps it as it is
    assert main(["status", path, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["kind"], st["complete"], st["shards_done"], st["samples_done"]) == \
        ("filter", True, n_shards, len(chosen))
    assert main(["status", path]) == 0
    text = capsys.readouterr().out
    assert f"selected   {len(chosen)} of 22 samples" in text and f"{n_shards} / {n_shards} done" in text
    assert main(["run", path]) == 0
    assert capsys.readouterr().out.startswith("done already:")
    assert s3["creds"]["secret"] not in fs.cat_file("synth/clean/job.yaml").decode()


KILLED = """
import os, sys
from synthmill.cli import main
sys.exit(main(["run", sys.argv[1]]))
"""


def test_a_killed_filter_resumes_into_the_same_tars(reference, ray_address, s3, source, write_spec,  # noqa: F811
                                                    tmp_path, capsys):
    """The driver SIGKILLed once a shard is committed, before the last (its one copier stopped at that moment, then
    killed too): the same command commits the rest, and every tar equals those of the uninterrupted run into S3
    (the previous test's, or made here)."""
    from benchmarks.chaos import actor_pids

    fs, chosen = s3["fs"], source["chosen"]
    n_shards = -(-len(chosen) // PER_SHARD)
    if not fs.exists("synth/clean/summary.json"):
        assert main(["run", write_spec(filter_spec(s3, "s3://synth/clean"))]) == 0
    want = {os.path.basename(p): hashlib.sha256(fs.cat_file(p)).hexdigest()
            for p in sorted(fs.glob("synth/clean/shards/*.tar"))}
    out = str(tmp_path / "killed")
    spec = filter_spec(s3, out)
    spec["cluster"] = {"num_actors": 1, "inflight_per_actor": 1}
    path = write_spec(spec)
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    proc = subprocess.Popen([sys.executable, "-c", KILLED, path], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    shards = os.path.join(out, "shards")
    deadline = time.monotonic() + 240
    copier: list[int] = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            copier = copier or actor_pids("ray::CopierActor")
            if copier and os.path.isdir(shards) and any(n.endswith(".json") for n in os.listdir(shards)):
                # the copiers as they are now: the one first seen may have been an earlier job's, gone since
                copier = []
                for pid in actor_pids("ray::CopierActor"):
                    try:
                        os.kill(pid, signal.SIGSTOP)  # mid-way through its next shard, or between shards
                        copier.append(pid)
                    except ProcessLookupError:
                        pass
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002 if copier else 0.05)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in copier:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    done = sorted(n for n in os.listdir(shards) if n.endswith(".json"))
    assert 1 <= len(done) < n_shards, done
    assert not os.path.exists(os.path.join(out, "summary.json"))
    assert main(["run", path]) == 0
    assert f"({len(done)} shards resumed" in capsys.readouterr().out
    assert tar_hashes(out) == want
    assert [s["__key__"] for s in read_wds(out)] == [f"{i:010d}" for i in range(len(chosen))]
    assert glob.glob(os.path.join(out, "shards", "*.tmp")) == []


def test_bad_conditions_and_scores_exit_2_with_nothing_written(reference, s3, source, write_spec, tmp_path,  # noqa: F811
                                                               capsys):
    _, local = reference
    out = tmp_path / "never"
    cases = [
        ("clip_score >", None, "field 'where': Parser Error: syntax error"),
        ("no_such_column > 1", None, 'field \'where\': Binder Error: Referenced column "no_such_column" not found'),
        ("clip_score", None, "gives DOUBLE, not true or false"),
        ("clip_score > avg(clip_score)", None, "field 'where': Binder Error"),
        ("clip_score > 0.2; DROP TABLE index_t", None, "field 'where': Parser Error"),
        ("key IN (SELECT * FROM read_csv('/etc/passwd'))", None, "file system operations are disabled"),
        ("CAST(prompt AS INTEGER) > 1", None, "field 'where': Conversion Error"),
        # without scores there is no clip_score: the index's columns alone
        ("clip_score > 0.25", {"path": None}, 'Referenced column "clip_score" not found'),
        ("seed > 0", {"path": str(tmp_path / "missing")}, "scores.path: " + str(tmp_path / "missing")),
    ]
    for where, scores, needle in cases:
        spec = filter_spec(s3, str(out), where)
        spec["source"]["path"] = local  # the local copy: these need no S3 round trips
        spec["scores"] = scores or {"path": "s3://synth/eval/scores.parquet"}
        assert main(["run", write_spec(spec)]) == 2, where
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert needle in line, (where, line)
        assert not out.exists(), where
    # scores of another output: a key the source does not have
    other = source["scores"].set_column(0, "key", pa.array([f"{i + 100:010d}" for i in range(22)]))
    pq.write_table(other, tmp_path / "other.parquet")
    spec = filter_spec(s3, str(out), "seed > 0")
    spec["source"]["path"], spec["scores"]["path"] = local, str(tmp_path / "other.parquet")
    assert main(["run", write_spec(spec)]) == 2
    assert "key '0000000100' is not a sample of" in capsys.readouterr().err
    assert not out.exists()
    # nothing chosen: an output of no shards, its empty index and its lineage, and no Ray needed
    empty = filter_spec(s3, str(tmp_path / "empty"), "seed < 0", scores={"path": None})
    empty["source"]["path"] = local
    assert main(["run", write_spec(empty)]) == 0
    assert capsys.readouterr().out.startswith("done: 0 of 22 samples selected into 0 shards")
    assert pq.read_table(tmp_path / "empty" / "index.parquet").num_rows == 0
    assert json.loads((tmp_path / "empty" / "lineage.json").read_text())["counts"]["selected"] == 0
    # the condition on the index alone, locally: a plain read of the output
    spec = filter_spec(s3, str(out), "image_index = 1 AND NOT blank_prompt", scores={"path": None})
    spec["source"]["path"] = local
    assert main(["run", write_spec(spec)]) == 0
    capsys.readouterr()
    want = [s for s in read_wds(local) if json.loads(s["json"])["image_index"] == 1
            and not json.loads(s["json"])["blank_prompt"]]
    got = read_wds(str(out))
    assert len(got) == len(want) == 10
    assert [s["png"] for s in got] == [s["png"] for s in want]
    # a filter of that filter: its source_key is the first filter's key
    again = {"kind": "filter", "source": {"path": str(out)}, "where": "source_key >= '0000000011'",
             "output": {"path": str(tmp_path / "again"), "samples_per_shard": 4}, "cluster": {"num_actors": 1}}
    assert main(["validate", write_spec(again)]) == 0
    assert capsys.readouterr().out.strip().endswith(": 5 of 10 samples selected -> 2 shards")
    assert main(["run", write_spec(again)]) == 0
    twice = read_wds(str(tmp_path / "again"))
    assert [s["png"] for s in twice] == [s["png"] for s in got[5:]]
    assert [json.loads(s["json"])["source_key"] for s in twice] == [f"{i:010d}" for i in range(5, 10)]


def test_filter_benchmark_smoke(background_smokes) -> None:
    """``python -m benchmarks filter --smoke`` (in the background, tests/conftest.py): (a), (b) and (c) run, their
    outputs hold the same samples, and the ratios and the memory line print."""
    import re

    code, stdout, stderr = background_smokes.result("test_filter_benchmark_smoke")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert re.search(r"^same samples as \(a\): \(b\) (\d+)/\1$", stdout, re.M), stdout
    assert re.search(r"^same samples as \(a\): \(c\) (\d+)/\1$", stdout, re.M), stdout
    assert re.search(r"^ratios: samples/s \(b\)/\(a\) = \d+\.\d+ \(goal >= 0\.9: (met|not met)\), "
                     r"\(c\)/\(a\) = \d+\.\d+", stdout, re.M), stdout
    m = re.search(r"^memory: .* peak (\d+) KiB of Python allocations; largest source shard (\d+) KiB", stdout, re.M)
    assert m and int(m.group(1)) < int(m.group(2)), stdout


def test_a_filter_reads_the_scores_an_evaluate_job_wrote(reference, evaluated, write_spec, tmp_path):
    """The scores of a real evaluate output (its scores.parquet, CLIP per sample) select samples: the chosen keys are
    the source keys whose clip_score in that file is above the median, in source order, byte for byte."""
    _, local = reference
    spec, _ = evaluated
    scores = pq.read_table(os.path.join(spec["output"]["path"], "scores.parquet")).to_pylist()
    median = sorted(r["clip_score"] for r in scores)[len(scores) // 2]
    wanted = [r["key"] for r in scores if r["clip_score"] > median]
    assert 0 < len(wanted) < len(scores)
    out = str(tmp_path / "clean")
    job = {"kind": "filter", "source": {"path": local}, "scores": {"path": spec["output"]["path"]},
           "where": f"clip_score > {median!r}", "output": {"path": out, "samples_per_shard": 4},
           "cluster": {"num_actors": 1}}
    assert main(["run", write_spec(job)]) == 0
    got = read_wds(out)
    assert [json.loads(s["json"])["source_key"] for s in got] == sorted(wanted)
    source = {s["__key__"]: s for s in read_wds(local)}
    for s in got:
        assert s["png"] == source[json.loads(s["json"])["source_key"]]["png"]
