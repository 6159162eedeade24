"""``kind: study``: two tiny models generated and scored into one table, equal to their own generate + evaluate
runs; a model's evaluation scores its shards as they are committed, with the numbers of its finished images; a
rerun does nothing; an added model runs alone; a changed model is refused by name; a study whose driver is
SIGKILLed while the second model generates resumes to the same table; bad input is one line before anything is
written."""

from __future__ import annotations

import copy
import glob
import html
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO, files_under, tar_hashes, write_image_folder

SYNTHMILL = [sys.executable, "-m", "synthmill.cli"]
SLOW_STEPS = 8
NUMBERS = ("fid", "is_mean", "is_std", "clip_score")


@pytest.fixture(scope="module")
def tiny_sd_b(tmp_path_factory) -> str:
    """A second tiny SD pipeline: the same layout as tiny_sd, other weights."""
    from synthmill.testing.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_b") / "sd", "sd", seed=1)


def study_spec(a: str, b: str, prompts: str, reference: str, weights: str, clip: str, output: str) -> dict:
    return {
        "kind": "study",
        "prompts": {"path": prompts, "column": "caption", "limit": 4},
        "sampling": {"steps": 2, "guidance_scale": 7.5, "height": 32, "width": 32, "seed": 7},
        "models": [{"name": "a", "path": a},
                   {"name": "b", "path": b, "sampling": {"scheduler": "lcm", "steps": 1, "guidance_scale": 1.0}}],
        "evaluate": {"reference": {"path": reference}, "metrics": ["fid", "is", "clip"],
                     "fid": {"weights": weights}, "clip": {"model": clip, "pretrained": None},
                     "inception_score": {"splits": 2}, "cluster": {"num_actors": 1, "batch_size": 4}},
        "published": {"a": {"fid": 13.05, "is": 36.76, "clip_score": 0.2958}},
        "output": {"path": output, "samples_per_shard": 1},
        "cluster": {"num_actors": 1, "batch_size": 2},
    }


def _run(path: str, *overrides: str) -> dict:
    from synthmill.jobs import study
    from synthmill.jobs.spec import load_spec

    return study.run(study.prepare(load_spec(path, overrides)))


@pytest.fixture(scope="module")
def studied(ray_address, tiny_sd, tiny_sd_b, prompts_tsv, inception_file, clip_model, tmp_path_factory):
    """The two-model study, run once: (its spec dict, its spec file, its output folder, its summary)."""
    folder = tmp_path_factory.mktemp("study")
    reference = write_image_folder(folder / "reference", 4)  # one unit of real images
    spec = study_spec(tiny_sd, tiny_sd_b, prompts_tsv, reference, inception_file, clip_model,
                      str(folder / "out"))
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    summary = _run(str(path))
    return spec, str(path), spec["output"]["path"], summary


def _table(out: str) -> dict:
    with open(os.path.join(out, "table.json"), encoding="utf-8") as fh:
        return json.load(fh)


def test_the_table_holds_every_model_its_numbers_and_the_published_ones(studied):
    spec, _, out, summary = studied
    assert summary["status"] == "complete" and summary["models_run"] == ["a", "b"]
    table = _table(out)
    assert table["kind"] == "study" and table["metrics"] == list(NUMBERS) and table["seed"] == 7
    assert [r["model"] for r in table["rows"]] == ["a", "b"]
    assert table["columns"][:5] == ["model", "path", "fid", "fid_published", "fid_difference"]
    assert all(sorted(r) == sorted(table["columns"]) for r in table["rows"])
    # model a: the study's own evaluate output, and the published numbers beside it
    with open(os.path.join(out, "scores", "a", "metrics.json"), encoding="utf-8") as fh:
        ma = json.load(fh)["metrics"]
    a, b = table["rows"]
    assert a["fid"] == ma["fid"] and a["clip_score"] == ma["clip_score"]
    assert (a["fid_published"], a["is_mean_published"], a["clip_score_published"]) == (13.05, 36.76, 0.2958)
    assert a["fid_difference"] == a["fid"] - 13.05 and a["is_std_published"] is None
    assert b["fid_published"] is None and b["fid_difference"] is None
    assert a["samples"] == b["samples"] == 4 and a["images_per_s"] > 0
    assert a["unet_parameters"] == b["unet_parameters"] > 0 and a["pipeline_parameters"] > a["unet_parameters"]
    with open(os.path.join(out, "table.csv"), encoding="utf-8") as fh:
        assert fh.readline().strip().split(",") == table["columns"]
    with open(os.path.join(out, "plan.json"), encoding="utf-8") as fh:
        assert json.load(fh)["kind"] == "study"
    # the study's page is the one `synthmill report OUT` gives (tests/test_report.py opens such a page in Chromium)
    assert summary["report"] == "report.html"
    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    for row in table["rows"]:
        assert f'data-value="{html.escape(json.dumps(row["fid"]))}"' in page


def test_a_row_equals_the_models_own_generate_and_evaluate_runs(studied, write_spec, tmp_path):
    from synthmill.jobs import evaluate, generate
    from synthmill.jobs.spec import load_spec

    spec, _, out, _ = studied
    table = _table(out)
    # model b (its own scheduler, steps and guidance) as its own two jobs, with the same settings
    own = {"kind": "generate", "model": {"path": spec["models"][1]["path"], "scheduler": "lcm"},
           "prompts": spec["prompts"], "sampling": {**spec["sampling"], "steps": 1, "guidance_scale": 1.0},
           "output": {"path": str(tmp_path / "gen"), "samples_per_shard": 1}, "cluster": {"num_actors": 1,
                                                                                         "batch_size": 2}}
    generate.run(generate.prepare(load_spec(write_spec(own))))
    assert tar_hashes(str(tmp_path / "gen")) == tar_hashes(os.path.join(out, "models", "b"))
    ev = {"kind": "evaluate", **copy.deepcopy(spec["evaluate"]), "generated": {"path": str(tmp_path / "gen")},
          "output": {"path": str(tmp_path / "eval")}}
    m = evaluate.run(evaluate.prepare(load_spec(write_spec(ev))))["metrics"]
    b = table["rows"][1]
    assert (b["fid"], b["is_mean"], b["is_std"], b["clip_score"]) == (
        m["fid"], m["inception_score"]["mean"], m["inception_score"]["std"], m["clip_score"])


def test_an_evaluation_scores_shards_as_they_are_committed_and_gives_the_finished_images_numbers(studied, tmp_path):
    """evaluate.run_while_generated (what a study runs for each model) on a generate output whose shards are
    committed one by one: units are scored before the last shard is committed, and the result is the model's
    evaluation of the finished images, bit for bit."""
    import threading

    import numpy as np
    import pyarrow.parquet as pq

    from synthmill.jobs import evaluate
    from synthmill.jobs.spec import load_spec

    spec, _, out, _ = studied
    images = str(tmp_path / "images")
    shutil.copytree(os.path.join(out, "models", "a"), images)
    shards = os.path.join(images, "shards")
    held = tmp_path / "held"  # the markers of the shards not committed yet: a marker is a shard's commit point
    held.mkdir()
    for k in range(4):
        os.rename(os.path.join(shards, f"{k:06d}.json"), held / f"{k:06d}.json")
    ev = {"kind": "evaluate", **copy.deepcopy(spec["evaluate"]), "generated": {"path": images},
          "output": {"path": str(tmp_path / "eval")}}
    ev_path = tmp_path / "eval.yaml"
    ev_path.write_text(yaml.safe_dump(ev))
    with open(os.path.join(images, "plan.json"), encoding="utf-8") as fh:
        plan = json.load(fh)
    ended, result, errors = threading.Event(), [], []
    loaded = load_spec(str(ev_path))

    def score() -> None:
        try:
            result.append(evaluate.run_while_generated(loaded, ended.is_set, plan["fingerprint"], plan["shards"]))
        except BaseException as e:  # noqa: BLE001 - raised below
            errors.append(e)

    thread = threading.Thread(target=score, daemon=True)
    thread.start()
    partials = tmp_path / "eval" / "partials" / "generated"
    scored: list[str] = []
    deadline = time.time() + 600
    for k in range(3):  # commit shards 0 to 2 (its first look finds none); shard 3 waits until a unit is scored
        time.sleep(2.0)
        os.rename(held / f"{k:06d}.json", os.path.join(shards, f"{k:06d}.json"))
    while time.time() < deadline and not scored and thread.is_alive():
        scored = sorted(n for n in os.listdir(partials) if n.endswith(".json")) if partials.is_dir() else []
        time.sleep(0.1)
    assert scored and not errors, errors  # scored while shard 3 is not committed
    assert not (tmp_path / "eval" / "metrics.json").exists()
    os.rename(held / "000003.json", os.path.join(shards, "000003.json"))
    ended.set()
    thread.join(timeout=600)
    assert not errors and result and result[0]["status"] == "complete", errors
    streamed, own = result[0], json.load(open(os.path.join(out, "scores", "a", "metrics.json"), encoding="utf-8"))
    where = lambda m: {k: v for k, v in m.items() if k != "fid_reference"}  # noqa: E731 - it names its output
    assert where(streamed["metrics"]) == where(own["metrics"]) and "fid" in streamed["metrics"]
    assert streamed["samples"] == own["samples"] == {"generated": 4, "reference": 4}
    assert streamed["units"] == own["units"] and streamed["units_run"] == own["units_run"] == 5  # none twice
    assert pq.read_table(tmp_path / "eval" / "scores.parquet").equals(
        pq.read_table(os.path.join(out, "scores", "a", "scores.parquet")))
    with np.load(tmp_path / "eval" / "fid_stats.npz") as a, np.load(os.path.join(out, "scores", "a",
                                                                                  "fid_stats.npz")) as b:
        assert a.files == b.files and all(np.array_equal(a[f], b[f]) for f in a.files)


def test_rerun_does_nothing_an_added_model_runs_alone_a_changed_one_is_refused(studied, tiny_sd, tmp_path):
    from synthmill.errors import SpecError
    from synthmill.jobs import status

    spec, path, out, _ = studied
    before = files_under(out)
    again = _run(path)
    assert again["complete_already"] and files_under(out) == before
    st = status.collect(out)
    assert st["kind"] == "study" and st["complete"] and set(st["models"]) == {"a", "b"}
    assert st["models"]["b"]["generate"]["shards_done"] == 4 and st["models"]["b"]["evaluate"]["complete"]
    assert "model      b: generate 4 / 4 shards" in status.render(st)

    changed = copy.deepcopy(spec)
    changed["models"][1]["sampling"]["steps"] = 2
    changed_path = tmp_path / "changed.yaml"
    changed_path.write_text(yaml.safe_dump(changed))
    with pytest.raises(SpecError, match=r"^model b: output.path .*/models/b: holds a different job"):
        _run(str(changed_path))

    rows_before = _table(out)["rows"]
    more = copy.deepcopy(spec)
    more["models"].append({"name": "c", "path": tiny_sd, "sampling": {"steps": 1}})
    more_path = tmp_path / "more.yaml"
    more_path.write_text(yaml.safe_dump(more))
    summary = _run(str(more_path))
    assert summary["models_run"] == ["c"]
    after = files_under(out)
    kept = [f for f in before if f.startswith(("models/", "scores/"))]
    assert kept and all(after[f] == before[f] for f in kept)  # a's and b's outputs untouched
    table = _table(out)
    assert [r["model"] for r in table["rows"]] == ["a", "b", "c"]
    assert table["rows"][:2] == rows_before


def test_a_study_killed_while_the_second_model_generates_resumes_to_the_same_table(studied, ray_address, tmp_path):
    spec, _, out, _ = studied
    first = _table(out)["rows"][:2]
    killed = copy.deepcopy(spec)
    killed["output"]["path"] = str(tmp_path / "out")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(killed))
    env = dict(os.environ, RAY_ADDRESS=ray_address, PYTHONPATH=str(REPO))
    err = open(tmp_path / "stderr.txt", "wb")
    proc = subprocess.Popen([*SYNTHMILL, "run", str(path)], stdout=subprocess.DEVNULL, stderr=err, env=env,
                            cwd=str(REPO))
    markers = str(tmp_path / "out" / "models" / "b" / "shards" / "*.json")
    deadline = time.time() + 600
    seen: list[str] = []
    try:  # the second model's shards take a few tens of ms each here: look often, kill at the first one seen
        while time.time() < deadline and proc.poll() is None and not seen:
            seen = glob.glob(markers)
            time.sleep(0.005)
        alive = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        err.close()
    assert alive, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert 1 <= len(seen) < 4, seen  # killed mid-generation of the second model
    assert not os.path.exists(tmp_path / "out" / "table.json")
    summary = _run(str(path))
    assert "b" in summary["models_run"]
    rows = _table(str(tmp_path / "out"))["rows"]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("path", "images_per_s")}  # noqa: E731
    assert [strip(r) for r in rows] == [strip(r) for r in first]
    assert tar_hashes(str(tmp_path / "out" / "models" / "b")) == tar_hashes(os.path.join(out, "models", "b"))



def _start(spec: dict, folder, ray_address: str) -> tuple[subprocess.Popen, str, object]:
    """``synthmill run`` of ``spec`` (its output under ``folder``) as a process of its own on the session's Ray."""
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = dict(os.environ, RAY_ADDRESS=ray_address, PYTHONPATH=str(REPO))
    err = open(folder / "stderr.txt", "wb")
    proc = subprocess.Popen([*SYNTHMILL, "run", str(path)], stdout=subprocess.DEVNULL, stderr=err, env=env,
                            cwd=str(REPO))
    return proc, str(path), err


def _wait_for(proc: subprocess.Popen, *paths: str, timeout: float = 600) -> bool:
    """Look every 5 ms until every one of ``paths`` exists (glob patterns), while ``proc`` runs."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if all(glob.glob(p) for p in paths):
            return True
        time.sleep(0.005)
    return False


def _ended(proc: subprocess.Popen, err, timeout: float) -> tuple[int | None, float]:
    """The exit code of ``proc`` (None if it ran past ``timeout`` seconds: then it is killed) and its seconds."""
    t0 = time.time()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        err.close()
    return code, time.time() - t0


def test_a_failed_generation_fails_the_study_by_name_and_the_rerun_completes_it(studied, ray_address, tmp_path):
    """Model a's generate job fails part-way (a folder squats on its last shard's tar, as in test_generate.py): its
    scoring stops, model b still runs, and the study exits 1 at once, naming a, with the generate job's own
    failures.json and no table or report; once the path is cleared, the same command runs a's missing shard and its
    evaluation alone, to the table of an undisturbed run."""
    spec, _, clean, _ = studied
    failing = copy.deepcopy(spec)
    out = tmp_path / "out"
    failing["output"]["path"] = str(out)
    proc, path, err = _start(failing, tmp_path, ray_address)
    squatter = out / "models" / "a" / "shards" / "000003.tar"
    claimed = _wait_for(proc, str(out / "models" / "a" / "plan.json"))  # before its generator has loaded the model
    if claimed:
        os.makedirs(squatter / "in-the-way")
    code, seconds = _ended(proc, err, 600)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert claimed and code == 1, stderr[-3000:]
    failed = [line for line in stderr.splitlines() if line.startswith("synthmill: job failed: ")]
    assert len(failed) == 1, stderr[-3000:]
    last = failed[0]
    assert "1 models failed (a); first error: 1 of 4 shards failed (000003)" in last, last
    assert "Is a directory" in last and "Run the same command again" in last, last
    with open(out / "failures.json", encoding="utf-8") as fh:
        assert list(json.load(fh)["failed_models"]) == ["a"]
    with open(out / "models" / "a" / "failures.json", encoding="utf-8") as fh:  # the generate job's own record
        gen_failures = json.load(fh)
    assert list(gen_failures["failed_shards"]) == ["000003"] and gen_failures["shards_done"] == 3
    for name in ("table.json", "table.csv", "table.md", "report.html", "summary.json", "models/a/summary.json",
                 "scores/a/metrics.json", "scores/a/failures.json"):
        assert not os.path.exists(out / name), name  # nothing merged, nothing half-written
    assert os.path.exists(out / "models" / "b" / "summary.json") and os.path.exists(out / "scores" / "b" /
                                                                                    "metrics.json")
    shutil.rmtree(squatter)
    summary = _run(path)
    assert summary["models_run"] == ["a"]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("path", "images_per_s")}  # noqa: E731
    # the clean study's first two rows: a test before this one may have added a model to it
    assert [strip(r) for r in _table(str(out))["rows"]] == [strip(r) for r in _table(clean)["rows"][:2]]
    assert tar_hashes(str(out / "models" / "a")) == tar_hashes(os.path.join(clean, "models", "a"))
    assert not os.path.exists(out / "failures.json")
    print(f"failed study exited {seconds:.1f}s after the squat")


def test_a_generator_killed_while_its_scorer_holds_the_cluster_is_replaced(ray_address, tiny_sd, prompts_tsv,
                                                                          inception_file, clip_model, tmp_path):
    """The cluster (2 CPUs) has room for model a's generator (2 CPUs) or its scorer (1 CPU), not both: the scorer
    waits for a place from a's first shard. The generator is SIGKILLed: its place may go to the scorer, which then
    gives it back (idle, its generator starting again) so the replacement starts, and the study completes, each
    shard once, within minutes, not after the generator's start_timeout_s (which would fail the model)."""
    from benchmarks.chaos import actor_pids

    out = tmp_path / "out"
    reference = write_image_folder(tmp_path / "reference", 4)
    spec = study_spec(tiny_sd, tiny_sd, prompts_tsv, reference, inception_file, clip_model, str(out))
    spec["models"] = [dict(spec["models"][0], cluster={"cpus_per_actor": 2, "start_timeout_s": 600})]
    spec["published"] = {}
    spec["prompts"]["limit"] = 11
    spec["sampling"].update(steps=SLOW_STEPS)  # 11 shards of one image: seconds of generating
    proc, _, err = _start(spec, tmp_path, ray_address)
    scoring = _wait_for(proc, str(out / "scores" / "a" / "plan.json"))  # its scorer is asking for a place
    done = len(glob.glob(str(out / "models" / "a" / "shards" / "*.json")))
    pids = actor_pids()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    code, seconds = _ended(proc, err, 540)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert scoring and pids and done < 11 and code == 0, (done, pids, stderr[-3000:])
    with open(out / "models" / "a" / "summary.json", encoding="utf-8") as fh:
        gen = json.load(fh)
    assert gen["actors_lost"] >= 1 and gen["shards_run"] == 11 and gen["samples"] == 11
    with open(out / "scores" / "a" / "metrics.json", encoding="utf-8") as fh:
        scores = json.load(fh)
    assert scores["samples"]["generated"] == 11 and scores["units"]["generated"] == 11
    assert [r["model"] for r in _table(str(out))["rows"]] == ["a"]
    gave_way = "an idle actor stopped" in stderr
    print(f"generator killed after {done} shards; the study ended {seconds:.1f}s later; scorer gave way: {gave_way}")


BAD = [
    (lambda s: s["models"].append({"name": "a", "path": "x"}), r"field 'models\[2\].name': 'a' is also the name"),
    (lambda s: s["models"][0].update(name="a/b"), r"field 'models\[0\].name': 'a/b' is not a folder-safe word"),
    (lambda s: s["published"].update(z={"fid": 1.0}), r"field 'published.z': no model of that name"),
    (lambda s: s["published"]["a"].update(fdi=1.0), r"field 'published.a.fdi': not a column"),
    (lambda s: s["models"][1]["sampling"].update(stepz=3), r"models\[1\] \(b\): unknown key 'sampling.stepz'"),
    (lambda s: s["models"][0].update(model={"dtyp": "float32"}), r"models\[0\] \(a\): unknown key 'model.dtyp'"),
    (lambda s: s["models"][0].update(cluster={"batch": 2}), r"models\[0\] \(a\): unknown key 'cluster.batch'"),
    (lambda s: s["models"][0].update(colour=1), r"^models\[0\]: unknown key 'colour'"),
    (lambda s: s["models"][1]["sampling"].update(steps=0), r"models\[1\] \(b\): field 'sampling.steps'"),
    (lambda s: s["evaluate"].update(output={"path": "x"}), r"field 'evaluate.output': is set by the study"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_is_one_line_before_anything_is_written(case, tiny_sd, tiny_sd_b, prompts_tsv, tmp_path):

    spec = study_spec(tiny_sd, tiny_sd_b, prompts_tsv, "ref.npz", "w.pth", "ViT-B-32", str(tmp_path / "out"))
    BAD[case][0](spec)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    from synthmill.errors import SpecError
    from synthmill.jobs import study
    from synthmill.jobs.spec import load_spec

    with pytest.raises(SpecError, match=BAD[case][1]):
        study.model_specs(load_spec(str(path)))
    if case == 0:  # the command: exit 2, one line
        proc = subprocess.run([*SYNTHMILL, "validate", str(path)], capture_output=True, text=True, cwd=str(REPO),
                              env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("name", ["bk_sdm_coco.yaml", "seed_fid_table.yaml"])
def test_shipped_studies_load(name, tmp_path):
    """The shipped studies pass the spec checks, with the files a user supplies (the 30K captions, the
    reference statistics, a distilled pipeline) named by overrides."""
    from synthmill.jobs.spec import load_spec

    captions = tmp_path / "captions.tsv"
    captions.write_text("caption\na cat\n")
    overrides = [f"output.path={tmp_path / 'out'}"]
    if name == "bk_sdm_coco.yaml":
        overrides.append(f"prompts.path={captions}")
    spec = load_spec(str(REPO / "configs" / "studies" / name), overrides)
    assert spec.kind == "study" and len(spec.models) >= 3 and spec.published
    from synthmill.jobs import study

    for name, gen, ev in study.model_specs(spec):
        assert gen.output.path.endswith(f"/models/{name}") and ev.output.path.endswith(f"/scores/{name}")
        assert ev.generated.path == gen.output.path and gen.sampling.steps in (4, 25)
