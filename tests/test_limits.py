"""Hostile inputs and bounded waits: huge images, an output inside its own input, an edited plan.json, and
distill workers that cannot be placed. Each ends in one error line naming the field or file, within a bound."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import tarfile
import threading

import pytest

from synthmill.cli import main
from tests.conftest import eval_spec, write_image_folder

pytestmark = pytest.mark.usefixtures("ray_address")


def _big_png(path, size=(4097, 4096)) -> str:
    """A real PNG of one colour, one column over the default limit of 4096 x 4096 pixels (~60 KB on disk)."""
    from PIL import Image

    Image.new("RGB", size, (10, 20, 30)).save(path, compress_level=1)
    return str(path)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("synthmill: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _config_teacher(folder) -> str:
    """A teacher folder of configs only: validation reads no weights, and a worker that is never placed none."""
    from synthmill.testing.tiny import tiny_unet_config

    for name, text in (("unet", json.dumps(tiny_unet_config("sd"))), ("vae", '{"block_out_channels": [16, 32]}')):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(text)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return str(folder)


def _distill_spec(teacher: str, data: str, output: str) -> dict:
    return {"kind": "distill", "teacher": {"path": teacher}, "student": {"arch": "bk-small"},
            "data": {"path": data, "resolution": 32, "loader_workers": 0, "shuffle_buffer": 0},
            "train": {"max_steps": 2, "batch_size": 1}, "cluster": {"num_workers": 1}, "output": {"path": output}}


# ---- 1. images over max_image_pixels: found from the header, before decoding ----

def test_an_image_over_the_pixel_limit_is_exit_2_at_validate(write_spec, tmp_path, capsys):
    """A local folder's headers are all read at validate: the 4097x4096 PNG is named with the key that bounds it,
    for evaluate and for distill (whose first sample it is); raising the key lets it through."""
    gen = write_image_folder(tmp_path / "gen", 3)
    big = _big_png(tmp_path / "gen" / "000001.png")  # 60 KB on disk, 48 MiB decoded
    out = str(tmp_path / "out")
    path = write_spec(eval_spec(gen, out, None, "ViT-B-32", metrics=["clip"]))  # no same-size check
    for command in ("validate", "run"):
        assert main([command, path]) == 2
        line = _error_line(capsys)
        assert line.startswith("synthmill: error: generated.path: ") and big in line, line
        assert "4097x4096 (16,781,312 pixels), more than generated.max_image_pixels allows (16,777,216)" in line
        assert not os.path.exists(out)
    assert main(["validate", path, "generated.max_image_pixels=16781312"]) == 0
    capsys.readouterr()

    data = tmp_path / "data"
    data.mkdir()
    first = _big_png(data / "000000.png")
    (data / "000000.txt").write_text("one colour")
    spec = _distill_spec(_config_teacher(tmp_path / "teacher"), str(data), out)
    assert main(["validate", write_spec(spec)]) == 2
    line = _error_line(capsys)
    assert line.startswith("synthmill: error: data.path ") and first in line and "data.max_image_pixels" in line, line


def test_an_image_over_the_pixel_limit_inside_a_tar_stops_scoring_with_exit_2(clip_model, write_spec, tmp_path,
                                                                              capsys):
    """Validation reads a tar's first image only; the scorer reads each later header before decoding, and the
    image over the limit is exit 2 naming it, with no metrics written."""
    from PIL import Image

    members = {}
    for i in range(3):
        png = io.BytesIO()
        Image.new("RGB", (32, 32), (40 * i, 90, 160)).save(png, "PNG")
        members[f"{i:04d}.png"] = png.getvalue()
        members[f"{i:04d}.txt"] = f"a square of colour {i}".encode()
    members["0002.png"] = open(_big_png(tmp_path / "big.png"), "rb").read()
    with tarfile.open(tmp_path / "set.tar", "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    spec = eval_spec(str(tmp_path / "set.tar"), str(out), None, clip_model, metrics=["clip"])
    spec["cluster"] = {"num_actors": 1, "batch_size": 2}
    path = write_spec(spec)
    assert main(["validate", path]) == 0
    capsys.readouterr()
    assert main(["run", path]) == 2
    line = _error_line(capsys)
    assert "set.tar:0002" in line and "4097x4096" in line and "generated.max_image_pixels" in line, line
    assert not os.path.exists(out / "metrics.json")


def test_the_training_stream_refuses_an_image_over_the_limit_before_decoding(tmp_path):
    """A training sample's header is read before its pixels: bad data naming it and data.max_image_pixels."""
    from synthmill.distill.data import BadData, ShardStream, StreamSpec
    from synthmill.sharding.images import Sample

    image = open(_big_png(tmp_path / "big.png"), "rb").read()
    stream = ShardStream(StreamSpec([], 32, True, False, 0, 1, 0), [], 0, 1)
    with pytest.raises(BadData, match=r"data.path: s.tar:big: image is 4097x4096 .* data.max_image_pixels"):
        stream.decode(Sample("big", "s.tar:big", image, "a caption"), 0)


# ---- 2. an output folder inside an input folder ----

def test_an_output_inside_an_input_folder_is_exit_2_at_validate(write_spec, tmp_path, capsys):
    """Refused when the spec loads, naming both fields, before anything is read or written: a generate output
    inside its model folder (whose file list a rerun compares), an evaluate output inside the image folder it
    scores, a distill output that is its data folder."""
    model = tmp_path / "sd"
    model.mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    images = write_image_folder(tmp_path / "images", 2)
    cases = [
        ({"kind": "generate", "model": {"path": str(model)}, "prompts": {"path": str(prompts)},
          "output": {"path": str(model / "out")}}, "model.path", "is inside it"),
        (eval_spec(images, os.path.join(images, "scores"), "w.pth", "ViT-B-32", metrics=["fid_stats"]),
         "generated.path", "is inside it"),
        (_distill_spec("org/teacher", images + "/", images), "data.path", "is that same folder"),
    ]
    for spec, field, where in cases:
        assert main(["validate", write_spec(spec)]) == 2
        line = _error_line(capsys)
        assert line.startswith("synthmill: error: field 'output.path': ") and f"the input folder of '{field}'" in line
        assert where in line, line
    assert sorted(os.listdir(model)) == [] and not os.path.exists(os.path.join(images, "scores"))
    # a sibling folder, whose name only starts like the model's, is fine
    from synthmill.jobs.spec import load_spec

    sibling = str(tmp_path / "sd-out")
    assert load_spec(write_spec(dict(cases[0][0], output={"path": sibling}))).output.path == sibling


# ---- 3. an edited plan.json ----

@contextlib.contextmanager
def _within(seconds: int):
    """Fail the test, instead of waiting for ever, when the block takes longer than ``seconds``."""
    def late(*_):
        raise TimeoutError(f"still running after {seconds}s")

    before = signal.signal(signal.SIGALRM, late)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def test_an_edited_plan_json_is_exit_2_naming_it(reference, write_spec, tmp_path, capsys):
    """`synthmill status` of the output, and validate of an evaluate job over it, read the plan's counts against
    each other and a bound, instead of going over a trillion shards or printing '0 / -1 done'."""
    import shutil

    copy = tmp_path / "gen"
    shutil.copytree(reference[1], copy)
    plan = json.loads((copy / "plan.json").read_text())
    spec = write_spec(eval_spec(str(copy), str(tmp_path / "out"), None, "ViT-B-32", metrics=["clip"]))
    for shards, needle in ((10**12, '"shards" is 1,000,000,000,000, more than a job holds (10,000,000)'),
                           (-1, '"shards" is -1, not a positive whole number'),
                           (7, '"shards" is 7, but 22 samples at 5 a shard are 5 shards')):
        (copy / "plan.json").write_text(json.dumps(dict(plan, shards=shards)))
        with _within(30):
            assert main(["status", str(copy)]) == 2
        assert _error_line(capsys) == f"synthmill: error: {copy}/plan.json: damaged, {needle}"
        if shards == 10**12:
            with _within(30):
                assert main(["validate", spec]) == 2
            assert _error_line(capsys).startswith(f"synthmill: error: generated.path: {copy}/plan.json: {needle}")
    for key, value, needle in (("samples", 0, '"samples" is 0, not a positive whole number'),
                               ("fingerprint", 5, "its 'fingerprint' is missing or not text")):
        (copy / "plan.json").write_text(json.dumps(dict(plan, **{key: value})))
        assert main(["status", str(copy)]) == 2
        assert _error_line(capsys) == f"synthmill: error: {copy}/plan.json: damaged, {needle}"
    (copy / "plan.json").write_text(json.dumps(plan))
    assert main(["status", str(copy)]) == 0 and "shards     5 / 5 done" in capsys.readouterr().out


def test_a_plan_json_that_does_not_match_its_job_yaml_is_exit_2_naming_both(reference, write_spec, tmp_path, capsys):
    """plan.json's counts and fingerprint are read against the settings in job.yaml (the fingerprint recomputed
    from them), by `synthmill status`, by a job reading the output and by a rerun into it: an edit that leaves
    the plan consistent in itself is exit 2 naming both files; a setting job.yaml holds redacted is not compared,
    and a folder without job.yaml (a run killed after its plan, an output of the first versions) still reads."""
    import shutil

    import yaml

    copy = tmp_path / "gen"
    shutil.copytree(reference[1], copy)
    plan_text, job_text = (copy / "plan.json").read_text(), (copy / "job.yaml").read_text()
    plan, job = json.loads(plan_text), yaml.safe_load(job_text)
    assert (plan["prompts"], plan["samples"], plan["shards"]) == (11, 22, 5)  # 2 images a prompt, 5 a shard
    evaluate = write_spec(eval_spec(str(copy), str(tmp_path / "out"), None, "ViT-B-32", metrics=["clip"]))
    rerun = write_spec(dict(reference[0], output=dict(reference[0]["output"], path=str(copy))))
    mismatch = f"synthmill: error: {copy}/plan.json: does not match {copy}/job.yaml ("
    edits = [  # (plan.json, job.yaml, what the message says)
        (dict(plan, samples=33, shards=7), job,  # 3 images a prompt, 5 a shard: the plan alone is fine
         'its "samples" is 33, and 11 prompts at sampling.images_per_prompt 2 are 22'),
        (dict(plan, fingerprint="0123456789abcdef"), job, "its \"fingerprint\" is '0123456789abcdef', and these"),
        (plan, dict(job, output=dict(job["output"], samples_per_shard=4)),
         'its "samples_per_shard" is 5, and output.samples_per_shard 4'),
        (plan, dict(job, sampling=dict(job["sampling"], steps=job["sampling"]["steps"] + 1)),
         f"its \"fingerprint\" is '{plan['fingerprint']}', and these settings with its prompts_digest give"),
    ]
    for i, (p, j, needle) in enumerate(edits):
        (copy / "plan.json").write_text(json.dumps(p))
        (copy / "job.yaml").write_text(yaml.safe_dump(j))
        assert main(["status", str(copy)]) == 2
        assert _error_line(capsys).startswith(mismatch + needle)
        if i == 0:  # a job reading the output, and a rerun into it, check the same
            assert main(["validate", evaluate]) == 2
            assert _error_line(capsys).startswith(f"synthmill: error: generated.path: {mismatch[18:]}{needle}")
            assert main(["validate", rerun]) == 2
            assert _error_line(capsys).startswith(mismatch + needle)
    # a model path whose password job.yaml holds redacted: its fingerprint cannot be recomputed, so is not compared
    (copy / "plan.json").write_text(plan_text)
    (copy / "job.yaml").write_text(yaml.safe_dump(dict(job, model=dict(job["model"], path="https://u:<redacted>@h/m"))))
    assert main(["status", str(copy)]) == 0 and "shards     5 / 5 done" in capsys.readouterr().out
    (copy / "job.yaml").unlink()
    assert main(["status", str(copy)]) == 0 and "shards     5 / 5 done" in capsys.readouterr().out
    (copy / "job.yaml").write_text(job_text)
    assert main(["status", str(copy)]) == 0 and "shards     5 / 5 done" in capsys.readouterr().out
    assert main(["validate", evaluate]) == 0 and main(["validate", rerun]) == 0

# ---- 4. distill workers that cannot be placed ----

def test_distill_workers_that_cannot_be_placed_fail_after_start_timeout(write_spec, tmp_path, capsys, caplog):
    """On a joined cluster (whose autoscaler might add a node) a worker that no node holds is warned about, and
    the job waits cluster.start_timeout_s, as generate and evaluate do, then exits 1 naming what it could not
    place; a node lost mid-training that is not replaced meets the same bound when the workers restart."""
    data = write_image_folder(tmp_path / "data", 2)
    spec = _distill_spec(_config_teacher(tmp_path / "teacher"), data, str(tmp_path / "out"))
    spec["cluster"].update(resources={"nowhere": 1}, start_timeout_s=2)
    path = write_spec(spec)
    codes = []
    # a thread, to bound the wait: a signal does not interrupt Ray Train's wait for its controller
    run = threading.Thread(target=lambda: codes.append(main(["run", path])), daemon=True)
    run.start()
    run.join(120)
    assert codes == [1], "still waiting after 120 s" if run.is_alive() else codes
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("synthmill:")]
    assert len(lines) == 1 and lines[0].startswith(
        "synthmill: job failed: 1 training worker (CPU 1, nowhere 1 each, all at once) could not be placed within "
        "cluster.start_timeout_s=2s"), err[-3000:]
    assert any("waits up to cluster.start_timeout_s=2s" in r.getMessage() for r in caplog.records)
    assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" not in os.environ
