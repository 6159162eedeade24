"""Generate jobs end to end on a real local Ray with tiny pipelines (CPU, 32x32, 2 steps).

One reference job (11 prompts x 2 images = 22 samples in 5 shards, 2 actors) is run once; its
shards are read back by webdataset and Hugging Face datasets, compared with bare diffusers calls,
and used as the byte-for-byte reference for reruns, resumes and a driver killed mid-job.
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
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from synthmill.cli import main
from tests.conftest import base_spec, files_under, read_wds, run_job, tar_hashes


def test_layout_and_summary(reference):
    spec, out = reference
    assert sorted(os.listdir(out)) == ["index", "index.parquet", "job.yaml", "plan.json", "shards", "summary.json"]
    names = sorted(os.listdir(os.path.join(out, "shards")))
    assert names == [f"{k:06d}.{ext}" for k in range(5) for ext in ("json", "tar")]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert (summary["samples"], summary["shards"], summary["samples_run"]) == (22, 5, 22)
    assert summary["blank_prompts"] == 2 and summary["truncated_prompts"] == 2
    st = summary["startup"]  # start-up milestones, in order, each within the job's time
    assert (0 <= st["ray_connected_s"] < st["first_actor_ready_s"] < st["first_shard_committed_s"]
            <= summary["elapsed_s"])
    assert 0 < st["first_actor_imports_s"] + st["first_actor_model_load_s"] < st["first_actor_ready_s"]
    actors = summary["actors"]  # per actor: what it did, and how long its device sat idle
    assert 1 <= len(actors) <= 2 and sum(a["samples"] for a in actors) == 22 and sum(a["shards"] for a in actors) == 5
    for a in actors:
        assert 0 < a["denoise_s"] <= a["active_s"] <= summary["elapsed_s"]
        assert abs(a["device_idle_fraction"] - (1 - a["denoise_s"] / a["active_s"])) < 0.01  # from unrounded times
    for k in range(5):
        marker = json.load(open(os.path.join(out, "shards", f"{k:06d}.json")))
        data = open(os.path.join(out, "shards", f"{k:06d}.tar"), "rb").read()
        assert marker["size"] == len(data)
        assert marker["sha256"] == hashlib.sha256(data).hexdigest()
        assert marker["count"] == (5 if k < 4 else 2)
    job = open(os.path.join(out, "job.yaml")).read()
    assert "samples_per_shard: 5" in job and "kind: generate" in job


def test_webdataset_reads_every_key_once_with_right_text_and_json(reference, prompts_tsv):
    import csv

    spec, out = reference
    prompts = [r["caption"] for r in csv.DictReader(open(prompts_tsv, encoding="utf-8"), delimiter="\t")]
    samples = read_wds(out)
    assert [s["__key__"] for s in samples] == [f"{i:010d}" for i in range(22)]
    for i, s in enumerate(samples):
        assert set(s) - {"__url__", "__local_path__"} == {"__key__", "png", "txt", "json"}
        meta = json.loads(s["json"])
        p, j = divmod(i, 2)
        text = prompts[p] if prompts[p].strip() else ""
        assert s["txt"].decode() == text
        assert meta["prompt"] == text and meta["blank_prompt"] == (not prompts[p].strip())
        assert (meta["key"], meta["seed"], meta["prompt_index"], meta["image_index"]) == (f"{i:010d}", 1234 + i, p, j)
        for field, value in [("steps", 2), ("guidance_scale", 7.5), ("height", 32), ("width", 32),
                             ("negative_prompt", None), ("model", spec["model"]["path"]),
                             ("scheduler", "PNDMScheduler")]:
            assert meta[field] == value, field
        assert meta["truncated"] == (p == 10) and (meta["prompt_tokens"] > 77) == (p == 10)
        from PIL import Image

        assert Image.open(io.BytesIO(s["png"])).size == (32, 32)


def test_huggingface_datasets_reads_shards(reference):
    from datasets import load_dataset

    _, out = reference
    ds = load_dataset("webdataset", data_files={"train": os.path.join(out, "shards", "*.tar")}, split="train")
    assert ds.num_rows == 22
    assert sorted(ds["__key__"]) == [f"{i:010d}" for i in range(22)]
    assert ds[3]["json"]["seed"] == 1237
    assert ds[3]["png"].size == (32, 32)


def test_ray_data_reads_shards(reference):
    import ray

    _, out = reference
    ds = ray.data.read_webdataset(sorted(glob.glob(os.path.join(out, "shards", "*.tar"))), decoder=None)
    rows = ds.take_all()
    assert sorted(r["__key__"] for r in rows) == [f"{i:010d}" for i in range(22)]
    assert all(set(r) >= {"png", "txt", "json"} for r in rows)


def test_index_parquet(reference):
    _, out = reference
    table = pq.read_table(os.path.join(out, "index.parquet")).to_pylist()
    assert [r["key"] for r in table] == [f"{i:010d}" for i in range(22)]
    assert [r["shard"] for r in table] == [i // 5 for i in range(22)]
    assert [r["seed"] for r in table] == [1234 + i for i in range(22)]
    assert sum(r["truncated"] for r in table) == 2


def test_output_files_follow_the_umask(reference):
    """Shards, index parts, index.parquet and markers get the mode any file the user writes gets (another
    user's training job reads them): temporaries are made private (mkstemp: 0600), and a move kept that."""
    from synthmill.sharding.storage import umask

    _, out = reference
    want = 0o666 & ~umask()
    modes = {os.path.relpath(os.path.join(d, n), out): os.stat(os.path.join(d, n)).st_mode & 0o777
             for d, _, names in os.walk(out) for n in names}
    assert {f: oct(m) for f, m in modes.items() if m != want} == {}, oct(want)
    assert "shards/000000.tar" in modes and "index.parquet" in modes and "index/000000.parquet" in modes


def test_image_equals_bare_diffusers_call(reference):
    """Sample i is what a plain pipeline call with Generator('cpu').manual_seed(seed + i) gives."""
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

    spec, out = reference
    pipe = DiffusionPipeline.from_pretrained(spec["model"]["path"])
    pipe.set_progress_bar_config(disable=True)
    samples = read_wds(out)
    for i in (0, 7, 21):
        meta = json.loads(samples[i]["json"])
        image = pipe(meta["prompt"], num_inference_steps=2, guidance_scale=7.5, height=32, width=32,
                     generator=torch.Generator("cpu").manual_seed(1234 + i), output_type="np").images[0]
        bare = (image * 255).round().astype(np.uint8)
        ours = np.asarray(Image.open(io.BytesIO(samples[i]["png"])).convert("RGB"))
        assert np.abs(bare.astype(int) - ours.astype(int)).max() <= 1, i
    # And a different seed really gives a different image (the comparison above can fail).
    other = pipe(json.loads(samples[0]["json"])["prompt"], num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator("cpu").manual_seed(99), output_type="np").images[0]
    assert np.abs((other * 255).round() - np.asarray(Image.open(io.BytesIO(samples[0]["png"])))).max() > 10


def test_rerun_elsewhere_with_one_actor_is_byte_identical(reference, write_spec, tmp_path, monkeypatch):
    """Shard bytes do not depend on output.path, the number of actors, or timing. The first try dies as
    it writes plan.json, its first file (as if killed there): the same command then runs in that folder.
    The folder is given as a file:// URL, which is the local folder it names: no stray 'file:' folder where
    the driver or the actors run, no temporaries left, and status reads it."""
    import ray

    spec, out = reference
    other = dict(spec, output=dict(spec["output"], path=f"file://{tmp_path / 'again'}"),
                 cluster=dict(spec["cluster"], num_actors=1))
    from synthmill.sharding import storage

    class Killed(BaseException):
        pass

    real_create = storage.create_exclusive  # how the first plan.json is written (the folder's claim)

    def dies_at_the_plan(url, *a, **kw):
        if url.endswith("/plan.json"):
            raise Killed
        return real_create(url, *a, **kw)

    monkeypatch.setattr(storage, "create_exclusive", dies_at_the_plan)
    with pytest.raises(Killed):
        run_job(write_spec, other)
    monkeypatch.setattr(storage, "create_exclusive", real_create)
    run_job(write_spec, other)
    assert tar_hashes(str(tmp_path / "again")) == tar_hashes(out)
    actors_cwd = ray.get(ray.remote(lambda: os.getcwd()).remote())
    assert not [d for d in {os.getcwd(), actors_cwd} if os.path.exists(os.path.join(d, "file:"))]
    assert [f for f in files_under(str(tmp_path / "again")) if ".tmp" in f] == []
    from synthmill.jobs import status

    assert status.collect(other["output"]["path"])["complete"]


def test_resume_redoes_only_damaged_shards(reference, write_spec, tmp_path, monkeypatch):
    spec, out = reference
    copy = str(tmp_path / "copy")
    import shutil

    shutil.copytree(out, copy)
    os.unlink(os.path.join(copy, "shards", "000001.json"))  # marker missing
    with open(os.path.join(copy, "shards", "000003.tar"), "r+b") as fh:  # tar truncated
        fh.truncate(1000)
    with open(os.path.join(copy, "shards", "000004.tar"), "ab") as fh:  # tar grew after its commit
        fh.write(b"junk")
    for name in ("shards/000002.json", "summary.json"):  # damaged in place: counted as never written
        with open(os.path.join(copy, name), "r+b") as fh:
            fh.truncate(10)
    from synthmill.jobs import status

    st = status.collect(copy)  # the old summary.json must not make a damaged output look complete
    # a temporary of an attempt that died before this run goes; one written since (another run's writer into
    # this folder, still at work: its file's time is after this run's start) stays
    dead, live = (os.path.join(copy, "shards", f".00000{k}.x.tar.tmp") for k in (1, 3))
    # so do the temporaries of atomic writes (a kill inside summary.json's or an index part's write);
    # a name that only looks like one stays
    hexid = "0123456789abcdef" * 2
    dead_writes = [os.path.join(copy, f"summary.json.tmp-{hexid}"),
                   os.path.join(copy, "index", f"000002.parquet.tmp-{hexid}")]
    live_write = os.path.join(copy, f"index.parquet.tmp-{hexid}")
    lookalike = os.path.join(copy, "summary.json.tmp-mine")
    for path, when in ((dead, time.time() - 3600), (live, time.time() + 3600),
                       *((d, time.time() - 3600) for d in dead_writes),
                       (live_write, time.time() + 3600), (lookalike, time.time() - 3600)):
        open(path, "wb").close()
        os.utime(path, (when, when))
    before = files_under(copy)
    seen_during_run: list[bool] = []
    from synthmill.cluster.pool import ShardPool

    original_run = ShardPool.run

    def watching_run(self, *a, **kw):  # observes the folder as the pool starts; runs the real pool
        seen_during_run.append(os.path.exists(os.path.join(copy, "summary.json")))
        return original_run(self, *a, **kw)

    monkeypatch.setattr(ShardPool, "run", watching_run)
    # one actor redoes the four shards that two made: the bytes do not depend on the actor count
    summary = run_job(write_spec, dict(spec, output=dict(spec["output"], path=copy),
                                       cluster=dict(spec["cluster"], num_actors=1)))
    assert seen_during_run == [False], "summary.json stayed in place while shards were being redone"
    assert st["shards_done"] == 1 and not st["complete"]
    assert (summary["shards_resumed"], summary["shards_run"]) == (1, 4)
    after = files_under(copy)
    assert after["shards/000000.tar"] == before["shards/000000.tar"], "a done shard was rewritten"
    assert after["shards/000003.tar"] != before["shards/000003.tar"]
    assert tar_hashes(copy) == tar_hashes(out)
    assert not os.path.exists(dead) and os.path.exists(live)
    assert not any(map(os.path.exists, dead_writes)) and os.path.exists(live_write) and os.path.exists(lookalike)


def test_a_folder_holding_only_a_killed_runs_first_temporary_is_taken_as_empty(tmp_path):
    """A run killed while it wrote plan.json (its first file) left only ``plan.json.tmp-<hex>``: the rerun
    takes the folder as empty (and removes the temporary at its end); any other file still makes it foreign."""
    from synthmill.errors import SpecError
    from synthmill.jobs.outputs import check_output_folder

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / ("plan.json.tmp-" + "ab" * 16)).write_bytes(b'{"kind": "gen')
    check_output_folder(str(folder), "fp", None, "generate")  # no error
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(SpecError, match="folder is not empty and holds no synthmill job"):
        check_output_folder(str(folder), "fp", None, "generate")


def test_resume_with_sha256_check_catches_same_size_corruption(reference, write_spec, tmp_path):
    spec, out = reference
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    path = os.path.join(copy, "shards", "000002.tar")
    data = bytearray(open(path, "rb").read())
    data[2000] ^= 0xFF
    open(path, "wb").write(bytes(data))
    summary = run_job(write_spec, dict(spec, output=dict(spec["output"], path=copy, resume_check="sha256")))
    assert (summary["shards_resumed"], summary["shards_run"]) == (4, 1)
    assert tar_hashes(copy) == tar_hashes(out)


def test_status_command(reference, capsys):
    _, out = reference
    assert main(["status", out, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["complete"] and (st["shards_done"], st["shards"], st["samples_done"]) == (5, 5, 22)
    assert st["failed_shards"] == {}
    assert 1 <= len(st["device_idle"]) <= 2 and all(0 <= f < 1 for f in st["device_idle"])
    assert main(["status", out]) == 0
    text = capsys.readouterr().out
    assert "5 / 5 done" in text and "devices idle" in text


def test_driver_killed_midway_resumes_without_regenerating(reference, ray_address, write_spec, tmp_path):
    """SIGKILL the `synthmill run` process after its first commit; the same command finishes the job.

    The command runs in another directory than the one the cluster was started in (where its actors run),
    with the spec's paths relative to it: they name the same files for the actors as for the driver."""
    spec, out = reference
    target = str(tmp_path / "killed")
    # One actor and one shard in flight: the job commits shard by shard, slowly enough to interrupt.
    killed = dict(spec, output=dict(spec["output"], path="killed"),
                  model=dict(spec["model"], path=os.path.relpath(spec["model"]["path"], tmp_path)),
                  prompts=dict(spec["prompts"], path=os.path.relpath(spec["prompts"]["path"], tmp_path)),
                  cluster=dict(spec["cluster"], num_actors=1, inflight_per_actor=1))
    path = os.path.basename(write_spec(killed))
    assert os.path.realpath(os.getcwd()) != os.path.realpath(tmp_path)  # the cluster's (and its actors') directory
    exe = os.path.join(os.path.dirname(sys.executable), "synthmill")
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    proc = subprocess.Popen([exe, "run", path], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not glob.glob(os.path.join(target, "shards", "*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = sorted(glob.glob(os.path.join(target, "shards", "*.json")))
    assert 1 <= len(committed) < 5, "the driver was not killed mid-job"
    assert not os.path.exists(os.path.join(target, "summary.json"))
    before = files_under(target)
    rerun = subprocess.run([exe, "run", path], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = files_under(target)
    done_before = [os.path.basename(m)[:6] for m in committed]
    for name in done_before:
        assert after[f"shards/{name}.tar"] == before[f"shards/{name}.tar"], f"shard {name} was regenerated"
    summary = json.load(open(os.path.join(target, "summary.json")))
    assert summary["shards_resumed"] >= len(done_before)
    assert tar_hashes(target) == tar_hashes(out)
    written = yaml.safe_load(open(os.path.join(target, "job.yaml")))
    assert (written["model"]["path"], written["output"]["path"]) == (spec["model"]["path"], target)


def test_sdxl_pipeline_with_two_text_encoders(ray_address, tiny_sdxl, prompts_tsv, write_spec, tmp_path):
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

    spec = base_spec(tiny_sdxl, prompts_tsv, str(tmp_path / "xl"))
    spec["prompts"]["limit"] = 3
    spec["sampling"]["images_per_prompt"] = 1
    spec["sampling"]["negative_prompt"] = "ugly, blurry, poor quality"
    spec["model"]["scheduler"] = "euler_a"
    spec["model"]["channels_last"] = True  # on by default only on CUDA; same images up to rounding
    summary = run_job(write_spec, spec)
    assert summary["samples"] == 3
    samples = read_wds(spec["output"]["path"])
    marker = json.load(open(os.path.join(spec["output"]["path"], "shards", "000000.json")))
    assert marker["channels_last"] is True and marker["compiled"] is False
    assert marker["attention"] == ["AttnProcessor2_0"]  # diffusers' SDPA processor
    meta = json.loads(samples[2]["json"])
    assert meta["scheduler"] == "EulerAncestralDiscreteScheduler"
    assert meta["negative_prompt"] == "ugly, blurry, poor quality"
    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl)
    from diffusers import EulerAncestralDiscreteScheduler

    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(meta["prompt"], negative_prompt="ugly, blurry, poor quality", num_inference_steps=2,
                 guidance_scale=7.5, height=32, width=32, generator=torch.Generator("cpu").manual_seed(1234 + 2),
                 output_type="np").images[0]
    ours = np.asarray(Image.open(io.BytesIO(samples[2]["png"])).convert("RGB")).astype(int)
    assert np.abs((image * 255).round().astype(int) - ours).max() <= 1


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_other_formats_encode_the_same_pixels_deterministically(reference, write_spec, tmp_path, fmt):
    """A jpg / webp job's file bytes are exactly the encoder applied to the reference job's (lossless PNG)
    pixels for the same samples: the format is applied, and a rerun can only produce the same bytes."""
    from PIL import Image

    from synthmill.sharding.encoders import ENCODERS

    spec, ref_out = reference
    job = dict(spec, prompts=dict(spec["prompts"], limit=3), cluster=dict(spec["cluster"], num_actors=1),
               output=dict(spec["output"], path=str(tmp_path / fmt), format=fmt))
    run_job(write_spec, job)
    ours, ref = read_wds(str(tmp_path / fmt)), read_wds(ref_out)
    assert len(ours) == 6 and set(ours[0]) >= {fmt, "txt", "json"}
    quality = 95  # output.quality's default
    for i in range(5):  # shard 0: the same batches as the reference's shard 0
        pixels = np.asarray(Image.open(io.BytesIO(ref[i]["png"])).convert("RGB"))
        assert ours[i][fmt] == ENCODERS[fmt](pixels, quality), i
        assert Image.open(io.BytesIO(ours[i][fmt])).format == {"jpg": "JPEG", "webp": "WEBP"}[fmt]


def test_poisoned_shard_fails_alone_and_rerun_retries_only_it(ray_address, tiny_sd, write_spec, tmp_path, capsys):
    """Two shards to redo, one of which cannot be committed (a folder squats on its tar's path): it fails
    alone, after its attempts, the other is committed; once the path is cleared, the same command runs
    only that shard."""
    rows = [json.dumps({"caption": f"a photo of object number {i}"}) for i in range(6)]
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(rows) + "\n")
    spec = base_spec(tiny_sd, str(src), str(tmp_path / "out"))
    spec["sampling"]["images_per_prompt"] = 1
    spec["output"]["samples_per_shard"] = 2
    spec["cluster"]["max_attempts"] = 2
    spec["cluster"]["num_actors"] = 1  # three runs: one actor start each
    path = write_spec(spec)
    out = spec["output"]["path"]
    assert main(["run", path]) == 0
    capsys.readouterr()
    first = tar_hashes(out)
    for k in (0, 1):  # both to be redone; shard 1 cannot be
        for name in (f"shards/{k:06d}.json", f"shards/{k:06d}.tar", f"index/{k:06d}.parquet"):
            os.unlink(os.path.join(out, name))
    squatter = os.path.join(out, "shards", "000001.tar")
    os.makedirs(os.path.join(squatter, "in-the-way"))
    assert main(["run", path]) == 1
    err = capsys.readouterr().err
    assert "1 of 3 shards failed (000001)" in err and "Is a directory" in err, err
    assert sorted(n for n in os.listdir(os.path.join(out, "shards")) if n != "000001.tar") == [
        "000000.json", "000000.tar", "000002.json", "000002.tar"]
    redone = hashlib.sha256(open(os.path.join(out, "shards", "000000.tar"), "rb").read()).hexdigest()
    assert redone == first["000000.tar"]  # the same bytes again
    assert not os.path.exists(os.path.join(out, "summary.json"))
    failures = json.load(open(os.path.join(out, "failures.json")))
    assert "after 2 attempts" in failures["failed_shards"]["000001"]
    assert main(["status", out]) == 0
    assert "failures   1" in capsys.readouterr().out
    # Clear the path and run again: only the failed shard runs.
    import shutil

    shutil.rmtree(squatter)
    before = files_under(out)
    assert main(["run", path]) == 0
    assert "| 2/2 [" in capsys.readouterr().err  # the progress bar ends at the samples run (one shard of 2)
    after = files_under(out)
    assert after["shards/000000.tar"] == before["shards/000000.tar"]
    assert after["shards/000002.tar"] == before["shards/000002.tar"]
    assert not os.path.exists(os.path.join(out, "failures.json"))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert (summary["shards_resumed"], summary["shards_run"]) == (2, 1)
    # A complete job run again does nothing, and keeps the summary of the run that completed it.
    capsys.readouterr()
    assert main(["run", path]) == 0
    assert capsys.readouterr().out.strip() == (f"done already: 6 samples in 3 shards at {out}, complete since "
                                              f"{summary['finished_at']}; nothing to run")
    assert json.load(open(os.path.join(out, "summary.json"))) == summary
    assert files_under(out) == after


def test_other_prompts_in_the_same_file_are_another_job(reference, write_spec, tmp_path, capsys, prompts_tsv):
    """The prompts enter the job's fingerprint as their content: the reference's rows copied to another path
    resume its output (nothing to run); the same file with one row changed is refused with exit 2 naming
    prompts.path and the first committed shard whose rows changed, and the output is left as it was. A row
    appended is a grown job (tests/test_dataset.py): its dry run counts the one new row."""
    import shutil

    spec, out = reference
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    moved = tmp_path / "moved.tsv"
    shutil.copy(prompts_tsv, moved)
    path = write_spec(dict(spec, prompts=dict(spec["prompts"], path=str(moved)),
                           output=dict(spec["output"], path=copy)))
    assert main(["run", path, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["shards_done"], plan["shards"]) == (5, 5)
    before = files_under(copy)
    original = moved.read_text(encoding="utf-8")
    lines = original.splitlines(keepends=True)
    one_changed = "".join(lines[:3] + [lines[3].replace("\t", "\tedited: ", 1)] + lines[4:])
    moved.write_text(one_changed, encoding="utf-8")
    for command in ("validate", "run"):
        assert main([command, path]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f"synthmill: error: prompts.path {moved}: rows 1..3 (those of shard 000000, the first "
                               f"one whose rows changed) differ from those {copy} was generated from"), line
    assert files_under(copy) == before
    with open(moved, "wb") as fh:  # as written (csv's "\r\n" line endings), and one row appended
        fh.write(open(prompts_tsv, "rb").read() + b"99\tone more prompt\r\n")
    assert main(["run", path, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["prompts"], plan["prompts_new"], plan["shards"], plan["shards_done"]) == (12, 1, 6, 5)
    assert files_under(copy) == before


def test_a_bad_row_deep_in_the_prompts_is_exit_2_before_anything_runs(tiny_sd, write_spec, tmp_path, capsys):
    rows = [json.dumps({"caption": f"a photo of object number {i}"}) for i in range(9000)]
    rows[8500] = "{this is not json"
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(rows) + "\n")
    spec = base_spec(tiny_sd, str(src), str(tmp_path / "out"))
    path = write_spec(spec)
    for command in ("validate", "run"):
        assert main([command, path]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line == f"synthmill: error: prompts.path {src}: line 8501 is not valid JSON: Expecting property name " \
                       "enclosed in double quotes: line 1 column 2 (char 1)", line
    assert not os.path.exists(spec["output"]["path"])


def test_model_that_cannot_load_fails_once_with_its_error(ray_address, tiny_sd, prompts_tsv, write_spec, tmp_path,
                                                          capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"this is not a safetensors file")
    spec = base_spec(str(broken), prompts_tsv, str(tmp_path / "out"))
    spec["cluster"]["num_actors"] = 1  # one actor start: its failure fails every shard once
    t0 = time.monotonic()
    assert main(["run", write_spec(spec)]) == 1
    err = capsys.readouterr().err
    assert "5 of 5 shards failed" in err and "actor failed to start" in err
    assert "Unable to load weights" in err and "diffusion_pytorch_model.safetensors" in err
    assert time.monotonic() - t0 < 120
    assert not os.path.exists(os.path.join(spec["output"]["path"], "summary.json"))


def test_a_model_rewritten_in_place_is_not_resumed_into_its_old_output(reference, write_spec, tmp_path, capsys):
    """plan.json records the model folder's files (size and time each); a rerun into the output after the
    folder changed (a distill export into the same pipeline/ folder, a weight swapped) is exit 2 naming the
    file, before anything is written: its shards would mix two models."""
    import shutil

    from synthmill.models.loading import model_files

    spec, out = reference
    plan = json.load(open(os.path.join(out, "plan.json")))
    assert plan["model_files"] == model_files(spec["model"]["path"]) and "unet/config.json" in plan["model_files"]
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    spec_path = write_spec(dict(spec, output=dict(spec["output"], path=copy)))
    assert main(["run", spec_path, "--dry-run"]) == 0  # the model as it was: resumable
    capsys.readouterr()
    plan["model_files"]["unet/diffusion_pytorch_model.safetensors"][1] = "1.5"  # the file as it was then
    with open(os.path.join(copy, "plan.json"), "w") as fh:
        json.dump(plan, fh)
    before = files_under(copy)
    assert main(["run", spec_path]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"synthmill: error: model.path {spec['model']['path']}: its files changed since {copy} was "
                          "started from it (unet/diffusion_pytorch_model.safetensors: "), err
    assert files_under(copy) == before


def test_a_resume_on_other_cpu_threads_is_refused(reference, write_spec, tmp_path, capsys):
    """On a CPU, cluster.cpus_per_actor is the actor's torch thread count, which changes the float32 images:
    plan.json records what made the shards done, and a resume with another count is exit 2 naming the field,
    before anything is written (it connects, and starts no actor)."""
    import shutil

    spec, out = reference
    assert json.load(open(os.path.join(out, "plan.json")))["compute"] == {"device": "cpu", "cpu_threads": 1}
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    os.unlink(os.path.join(copy, "shards", "000002.json"))  # one shard to redo
    spec_path = write_spec(dict(spec, output=dict(spec["output"], path=copy)))
    before = files_under(copy)
    assert main(["run", spec_path, "cluster.cpus_per_actor=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"synthmill: error: cluster.cpus_per_actor: the shards done in {copy} were made by CPU actors "
                   "with 1 torch thread, and this run's would have 2; on a CPU the thread count changes the float32 "
                   "images, so set cluster.cpus_per_actor=1 to resume, or use a new output.path"), err
    assert files_under(copy) == before
