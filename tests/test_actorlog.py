"""Failures of the actors on the terminal: one line each, the whole traceback in a file under ``OUTPUT/logs/``.

A model that cannot load used to print its traceback twice over through Ray (``(GeneratorActor pid=...)`` lines,
about 50 of them per actor, some after the job's last line); a shard whose attempts fail named only the error's
last line, with nothing kept of the rest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

from synthmill.cli import main
from tests.conftest import base_spec
from tests.test_s3 import s3  # noqa: F401 - the moto server fixture

#: A failure's line: what failed, where, the error's type and first line, and where its whole text went.
FAILURE_LINE = re.compile(r"(actor failed to start \(raised\)|shard \d{6} attempt \d) .*on (actor )?\S+ pid \d+: "
                          r"\w+: .* \(full traceback: (?P<log>\S+/logs/\S+\.log)\)$")


def test_a_model_that_cannot_load_is_one_line_with_its_traceback_in_logs(tiny_sd, prompts_tsv, write_spec, tmp_path):
    """On a local Ray (this machine the only node, Ray's actor output streamed to the terminal, as a user's first
    run): an actor whose model cannot load is one line naming the error and the log file, and nothing of Ray's
    traceback reaches the terminal (before: ~50 lines of ``(GeneratorActor pid=...)`` traceback); the file holds
    it whole."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"this is not a safetensors file")
    out = tmp_path / "out"
    spec = base_spec(str(broken), prompts_tsv, str(out))
    spec["cluster"]["num_actors"] = 1
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "synthmill.cli", "run", write_spec(spec)], capture_output=True,
                          text=True, timeout=300, env=dict(env, HF_HUB_OFFLINE="1"))
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "GeneratorActor" not in err and 'File "' not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "Unable to load weights" in line]
    assert len(lines) == 2 and lines[-1].startswith("synthmill: job failed: 5 of 5 shards failed"), err[-3000:]
    found = FAILURE_LINE.search(lines[0])
    assert found and "OSError: Unable to load weights" in lines[0], lines[0]
    log = found.group("log")
    assert os.path.dirname(log) == str(out / "logs") and os.listdir(out / "logs") == [os.path.basename(log)]
    text = open(log, encoding="utf-8").read()
    assert "GeneratorActor" in text and 'File "' in text and "load_pipeline" in text, text
    assert "SafetensorError" in text and "Unable to load weights" in text, text  # the chain, not only its last link
    assert sorted(os.listdir(out)) == ["failures.json", "job.yaml", "logs", "plan.json"]


def test_each_failed_attempt_of_a_shard_is_one_line_and_a_log(reference, write_spec, tmp_path, capsys, caplog):
    """A shard that cannot be committed (a folder squats on its tar's path), two attempts: each is one line naming
    the shard, attempt, actor, error and its log file; each log holds the actor's traceback; the other shards are
    untouched, and the logs are no shards (status and a rerun count what they did before)."""
    spec, ref_out = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    for name in ("shards/000001.json", "shards/000001.tar", "index/000001.parquet"):
        os.unlink(out / name)
    os.makedirs(out / "shards" / "000001.tar" / "in-the-way")
    job = dict(spec, output=dict(spec["output"], path=str(out)))
    job["cluster"] = dict(spec["cluster"], num_actors=1, max_attempts=2)
    path = write_spec(job)
    assert main(["run", path]) == 1
    err = capsys.readouterr().err
    assert "1 of 5 shards failed (000001)" in err and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].endswith(f"Full tracebacks: {out}/logs/ (2 files of this run)."), err
    messages = [r.getMessage() for r in caplog.records if "000001" in r.getMessage()]
    assert len(messages) == 2 and all("\n" not in m for m in messages), messages
    logs = []
    for attempt, message in enumerate(messages, 1):
        found = FAILURE_LINE.search(message)
        assert found and message.startswith(f"shard 000001 attempt {attempt} failed on actor "), message
        assert "IsADirectoryError: " in message and ("retrying" if attempt == 1 else "failed for good") in message
        logs.append(found.group("log"))
    assert sorted(os.listdir(out / "logs")) == sorted(os.path.basename(p) for p in logs)
    for log in logs:
        text = open(log, encoding="utf-8").read()
        assert "GeneratorActor.process_shard()" in text and "IsADirectoryError" in text and 'File "' in text, text
    assert main(["status", str(out)]) == 0
    status = capsys.readouterr().out
    assert re.search(r"^shards +4 / 5 ", status, re.M) and re.search(r"^failures +1:", status, re.M), status


def test_a_scorer_unit_that_fails_is_one_line_and_a_log(evaluated, write_spec, tmp_path, capsys, caplog):
    """An evaluate unit whose partial cannot be committed (a folder squats on its npz's path), two attempts: one
    line each naming the unit, attempt, actor and log file; the job's last line says where the logs are; the
    other units are kept and the same command completes once the path is free."""
    spec, _ = evaluated
    out = tmp_path / "out"
    shutil.copytree(spec["output"]["path"], out)
    for name in ("generated/000001.json", "generated/000001.npz"):
        os.unlink(out / "partials" / name)
    os.makedirs(out / "partials" / "generated" / "000001.npz" / "in-the-way")
    job = dict(spec, output=dict(spec["output"], path=str(out)), cluster=dict(spec["cluster"], max_attempts=2))
    path = write_spec(job)
    assert main(["run", path]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("synthmill: job failed: 1 units failed (generated/000001); first error: ") and last.endswith(
        f"Full tracebacks: {out}/logs/ (2 files of this run)."), err
    assert "Traceback" not in err and not os.path.exists(out / "metrics.json"), err
    messages = [r.getMessage() for r in caplog.records if "generated/000001 attempt" in r.getMessage()]
    assert len(messages) == 2 and all("\n" not in m for m in messages), messages
    for attempt, message in enumerate(messages, 1):
        found = re.search(r"\(full traceback: (?P<log>\S+/logs/\S+\.log)\)$", message)
        assert found and message.startswith(f"unit generated/000001 attempt {attempt} failed on actor "), message
        assert "IsADirectoryError" in open(found.group("log"), encoding="utf-8").read()
    shutil.rmtree(out / "partials" / "generated" / "000001.npz")
    assert main(["run", path]) == 0
    with open(out / "metrics.json", encoding="utf-8") as fh:
        scores = json.load(fh)["metrics"]
    scores.pop("fid_reference")  # it names the output that holds the reference statistics
    assert scores == {k: v for k, v in evaluated[1]["metrics"].items() if k != "fid_reference"}


def test_failure_logs_are_written_whole_on_s3(s3):  # noqa: F811
    """An S3 output gets the same files (no appending there: a file per failure, one put each), and a secret in
    the error's text is not written into the log."""
    from synthmill.cluster.pool import FailureLog
    from synthmill.sharding.layout import OutputLayout
    from synthmill.sharding.storage import remember_secrets

    options = {"endpoint_url": s3["endpoint"], **s3["creds"]}
    remember_secrets(options)

    def commit_shard():
        raise OSError(f"could not commit with {s3['creds']['secret']}\nsecond line")

    logs = FailureLog(OutputLayout("s3://synth/runs/failure-logs", options))
    try:
        commit_shard()
    except OSError as e:
        said = logs.write("shard 000003 attempt 1", "node-7 pid 42", e)
    logs.close()
    name = f"{logs.stamp}-shard-000003-attempt-1.log"
    assert said == f" (full traceback: s3://synth/runs/failure-logs/logs/{name})"
    fs = s3["fs"]
    fs.invalidate_cache()
    text = fs.cat_file(f"synth/runs/failure-logs/logs/{name}").decode()
    assert text.startswith("shard 000003 attempt 1: failed on actor node-7 pid 42 (seen by the driver at "), text
    assert "Traceback" in text and "in commit_shard" in text and "second line" in text, text
    assert s3["creds"]["secret"] not in text and "<redacted>" in text, text
