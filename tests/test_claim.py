"""One job per output folder, however two jobs are timed: the folder's ``plan.json`` is its claim.

Two jobs started into one new folder both pass the output check of ``prepare`` (nothing is written before Ray
is connected, seconds later). Whichever then creates ``plan.json`` first holds the folder; the other is exit 2
naming the folder and the job that holds it. The same job twice at once still runs as one.

The races are real processes: two ``lifecycle.run`` calls released together by a barrier, after both have
checked the folder (the window Ray's start gives), repeated many times locally and on a moto S3 server; and
once end to end, two ``synthmill run`` commands started at the same moment.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
from typing import Any

import pytest

from synthmill.errors import SpecError
from synthmill.jobs import lifecycle
from synthmill.jobs.outputs import check_output_folder
from synthmill.sharding.layout import OutputLayout
from tests.conftest import read_wds, tar_hashes

#: Races between two different jobs, and between the same job twice, on local disk and on S3.
ROUNDS, SAME_ROUNDS = 50, 10
S3_ROUNDS, S3_SAME_ROUNDS = 25, 5  # each S3 round is a dozen requests to one server


class _PlanOnly(lifecycle.Job):
    """A job of the lifecycle with no work: it claims the folder, writes job.yaml and its summary."""

    def __init__(self, spec: Any, layout: OutputLayout, fingerprint: str):
        self.spec, self.layout, self.fingerprint = spec, layout, fingerprint

    def plan(self) -> dict[str, Any]:
        return {"kind": "generate", "fingerprint": self.fingerprint, "shards": 1, "samples": 1}

    def finish(self) -> dict[str, Any]:
        return {"status": "complete", "fingerprint": self.fingerprint}


def _racer(name: str, spec_path: str, rounds: list[tuple[str, str]], opts: dict | None, barrier: Any,
           results: Any) -> None:
    """For each (folder, fingerprint): check the folder as ``prepare`` does, wait until the other racer has
    checked it too, then run the lifecycle into it. Puts (name, [outcome per round])."""
    try:
        results.put((name, _rounds(spec_path, rounds, opts, barrier)))
    except BaseException:  # the parent fails naming it
        import traceback

        barrier.abort()
        results.put((name, traceback.format_exc()))


def _rounds(spec_path: str, rounds: list[tuple[str, str]], opts: dict | None, barrier: Any) -> list[str]:
    from synthmill.jobs.spec import load_spec

    spec = load_spec(spec_path)
    outcomes = []
    for url, fingerprint in rounds:
        barrier.wait()
        try:
            check_output_folder(url, fingerprint, opts, "generate")
            checked = None
        except SpecError as e:
            checked = str(e)
        barrier.wait()  # both have checked; neither has written
        if checked is not None:
            outcomes.append("check: " + checked)
            continue
        try:
            lifecycle.run(_PlanOnly(spec, OutputLayout(url, opts), fingerprint))
            outcomes.append("ok")
        except SpecError as e:
            outcomes.append(str(e))
    return outcomes


def _race(spec_path: str, folders: list[str], opts: dict | None, rounds: int, same: int) -> dict[str, list[str]]:
    """Rounds of two racers: ``rounds`` of two jobs (fingerprints a... and b...), then ``same`` of one job twice."""
    ctx = multiprocessing.get_context("spawn")  # this process may hold Ray's threads: no fork
    barrier, results = ctx.Barrier(2, timeout=120), ctx.Queue()
    fps = {"A": ["a" * 16] * rounds + ["c" * 16] * same, "B": ["b" * 16] * rounds + ["c" * 16] * same}
    procs = [ctx.Process(target=_racer, args=(n, spec_path, list(zip(folders, fps[n], strict=True)), opts, barrier,
                                              results)) for n in ("A", "B")]
    for p in procs:
        p.start()
    try:
        out = dict(results.get(timeout=240) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    for name, got in out.items():
        assert isinstance(got, list), f"racer {name} failed: {got}"
    return out


def _check_race(outcomes: dict[str, list[str]], folders: list[str], rounds: int, read_json) -> None:
    wins = {"A": 0, "B": 0}
    for i, folder in enumerate(folders[:rounds]):
        a, b = outcomes["A"][i], outcomes["B"][i]
        assert not a.startswith("check:") and not b.startswith("check:"), (i, a, b)  # both passed the check
        assert sorted([a == "ok", b == "ok"]) == [False, True], f"round {i}: A {a!r}, B {b!r}"
        winner = "A" if a == "ok" else "B"
        wins[winner] += 1
        theirs, mine = ("a" if winner == "A" else "b") * 16, ("b" if winner == "A" else "a") * 16
        refused = b if winner == "A" else a
        assert refused == (f"output.path {folder}: another generate job (fingerprint {theirs}, its spec "
                           f"{folder}/job.yaml) took this folder while this generate job (fingerprint {mine}) "
                           "started; one folder holds one job: use a new output.path or the same spec"), refused
        assert read_json(f"{folder}/plan.json")["fingerprint"] == theirs
        assert read_json(f"{folder}/summary.json")["fingerprint"] == theirs
    for i, folder in enumerate(folders[rounds:], rounds):  # the same job twice: both run, one plan
        assert (outcomes["A"][i], outcomes["B"][i]) == ("ok", "ok"), i
        assert read_json(f"{folder}/plan.json")["fingerprint"] == "c" * 16
    print(f"{rounds} races of two jobs: A won {wins['A']}, B won {wins['B']}; {len(folders) - rounds} of one job twice")


@pytest.fixture
def plain_spec(write_spec, tmp_path) -> str:
    """A generate spec for the racers' job.yaml (nothing reads its model or prompts)."""
    return write_spec({"kind": "generate", "model": {"path": str(tmp_path / "model")},
                       "prompts": {"path": str(tmp_path / "prompts.txt")},
                       "output": {"path": str(tmp_path / "unused")}})


def test_two_jobs_racing_into_one_local_folder_one_holds_it(plain_spec, tmp_path):
    folders = [str(tmp_path / "race" / f"r{i}") for i in range(ROUNDS + SAME_ROUNDS)]
    outcomes = _race(plain_spec, folders, None, ROUNDS, SAME_ROUNDS)

    def read_json(path: str) -> dict:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)

    _check_race(outcomes, folders, ROUNDS, read_json)
    leftovers = [n for f in folders for n in os.listdir(f) if "tmp" in n]
    assert leftovers == []


@pytest.fixture(scope="module")
def moto_s3():
    """A moto S3 server on 127.0.0.1 (no auth) with bucket 'claims'.

    moto tests ``If-None-Match: *`` and then stores the object, and its server runs each request on a thread,
    so two conditional puts at once could both pass its test; S3 itself decides them atomically. PutObject is
    serialised here so that the server keeps S3's promise."""
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import logging

    import s3fs
    from moto.s3.responses import S3Response
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    lock, put_object = threading.Lock(), S3Response.put_object

    def atomic_put_object(self):
        with lock:
            return put_object(self)

    S3Response.put_object = atomic_put_object
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"endpoint_url": f"http://{host}:{port}", "key": "claims", "secret": "claims"}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    fs.mkdir("claims")
    yield opts, fs
    server.stop()
    S3Response.put_object = put_object


def test_two_jobs_racing_into_one_s3_prefix_one_holds_it(plain_spec, moto_s3):
    opts, fs = moto_s3
    folders = [f"s3://claims/race/r{i}" for i in range(S3_ROUNDS + S3_SAME_ROUNDS)]
    outcomes = _race(plain_spec, folders, opts, S3_ROUNDS, S3_SAME_ROUNDS)
    _check_race(outcomes, folders, S3_ROUNDS, lambda url: json.loads(fs.cat_file(url)))


def test_a_killed_runs_plan_is_its_claim(plain_spec, tmp_path, capsys):
    """A run killed after it claimed the folder (plan.json, nothing else) leaves it to the same job, which
    resumes into it; another job is refused by validate and by run, and neither writes anything."""
    from synthmill.jobs.spec import load_spec

    spec = load_spec(plain_spec)
    folder = str(tmp_path / "killed")
    layout = OutputLayout(folder)
    layout.write_json("plan.json", _PlanOnly(spec, layout, "a" * 16).plan())  # what the killed run left
    check_output_folder(folder, "a" * 16, None, "generate")
    before = open(os.path.join(folder, "plan.json"), "rb").read()
    with pytest.raises(SpecError, match=f"output.path {folder}: holds a different job \\(fingerprint a{{16}}, "
                                        "this one's b{16}: "):
        check_output_folder(folder, "b" * 16, None, "generate")
    with pytest.raises(SpecError, match=f"output.path {folder}: another generate job \\(fingerprint a{{16}}, "):
        lifecycle.run(_PlanOnly(spec, layout, "b" * 16))
    assert os.listdir(folder) == ["plan.json"] and open(os.path.join(folder, "plan.json"), "rb").read() == before
    assert lifecycle.run(_PlanOnly(spec, layout, "a" * 16))["fingerprint"] == "a" * 16
    assert sorted(os.listdir(folder)) == ["job.yaml", "plan.json", "summary.json"]


def test_two_commands_at_once_into_one_folder_one_runs(reference, ray_address, write_spec, tmp_path):
    """`synthmill run` twice at the same moment into one new folder: the reference job and one with another
    seed (both pass the output check before either has connected to Ray). One exits 0, the other 2 naming the
    folder and the job that holds it; the folder holds that one job: every key once, every marker its
    fingerprint, status complete, and the reference job's tars byte-identical to the reference run's."""
    spec, ref_out = reference
    out = str(tmp_path / "out")
    ref = dict(spec, output=dict(spec["output"], path=out), cluster=dict(spec["cluster"], num_actors=1))
    other = dict(ref, sampling=dict(ref["sampling"], seed=99))
    paths = {"ref": write_spec(ref), "other": write_spec(other)}
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    procs = {n: subprocess.Popen([sys.executable, "-m", "synthmill.cli", "run", p], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for n, p in paths.items()}
    done = {n: (p.wait(300), p.communicate()) for n, p in procs.items()}
    codes = {n: c for n, (c, _) in done.items()}
    errors = {n: "\n".join(ln for ln in err.splitlines() if ln.startswith("synthmill:")) or err[-2000:]
              for n, (_, (_, err)) in done.items()}
    assert sorted(codes.values()) == [0, 2], errors
    winner, loser = ("ref", "other") if codes["ref"] == 0 else ("other", "ref")
    with open(os.path.join(out, "plan.json"), encoding="utf-8") as fh:
        plan = json.load(fh)
    refused = errors[loser]
    assert refused.startswith(f"synthmill: error: output.path {out}: ") and plan["fingerprint"] in refused, refused
    assert len(refused.splitlines()) == 1, refused
    markers = [json.load(open(os.path.join(out, "shards", n), encoding="utf-8"))
               for n in sorted(os.listdir(os.path.join(out, "shards"))) if n.endswith(".json")]
    assert len(markers) == 5 and {m["fingerprint"] for m in markers} == {plan["fingerprint"]}
    samples = read_wds(out)
    assert [s["__key__"] for s in samples] == [f"{i:010d}" for i in range(22)]
    assert {json.loads(s["json"])["seed"] - int(s["__key__"]) for s in samples} == {1234 if winner == "ref" else 99}
    from synthmill.jobs import status

    assert status.collect(out)["complete"]
    if winner == "ref":
        assert tar_hashes(out) == tar_hashes(ref_out)
