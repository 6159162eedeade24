"""The benchmarks run: each one's ``--smoke`` mode end to end, in a fresh interpreter."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generate_benchmark_smoke(background_smokes) -> None:
    """``python -m benchmarks.generate --smoke`` (in the background, tests/conftest.py) runs (a), (b), (c) and
    (d), each of (c) and (d) on a local Ray of its own, and prints the ratios."""
    code, stdout, stderr = background_smokes.result("test_generate_benchmark_smoke")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert stdout.startswith("CPU: rerun under synthmill's CPU actor malloc settings: MALLOC_ARENA_MAX=1 "), stdout
    assert re.search(r"^ratios: steady state \(b\)/\(a\) = \d+\.\d+ .*end to end \(c\)/\(a\) = \d+\.\d+$",
                     stdout, re.M), stdout
    assert "identical images (a) vs (b): 4/4" in stdout and "identical images (a) vs (d): 4/4" in stdout, stdout
    assert re.search(r"^\(c\) actor \d+ on cpu: 4 samples in \d+\.\d+ s active, device idle fraction 0\.\d+$",
                     stdout, re.M), stdout
    assert re.search(r"^\(c\) start-up, seconds after run\(\) began: Ray connected at \d+\.\d+, first actor ready at "
                     r"\d+\.\d+ \(its imports \d+\.\d+, model load \d+\.\d+\), first shard committed at \d+\.\d+$",
                     stdout, re.M), stdout
    assert "[synthmill run (c)] " in stderr, stderr  # (c)'s own output, streamed as it came
    # both sides count their process start; the shared settings and the one synthmill was given off its default
    assert re.search(r"^\(a\) end to end: a fresh interpreter's start and imports \d+\.\d+ s \+ load", stdout,
                     re.M), stdout
    assert re.search(r"^shared by \(a\)-\(d\): dtype float32, channels-last False, batch 2, .*synthmill's CPU malloc "
                     r"settings, (\d+) torch threads; differs from synthmill's defaults: cluster\.cpus_per_actor \1 ",
                     stdout, re.M) or "synthmill's defaults otherwise" in stdout, stdout


def test_compare_images_says_by_how_much_images_differ() -> None:
    """The benchmark's identity line counts identical samples and, where some differ, gives the largest and
    mean difference of one 8-bit value and the share of values that differ, over the differing samples."""
    import numpy as np

    from benchmarks.generate import compare_images

    rng = np.random.default_rng(0)
    a = {k: rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for k in ("s0", "s1", "s2")}
    b = {k: v.copy() for k, v in a.items()}
    assert compare_images(a, b, "(a) vs (b)") == "identical images (a) vs (b): 3/3"
    b["s1"][0, 0, 0] = a["s1"][0, 0, 0] ^ 1  # one value off by one
    b["s1"][1, 2, 1] = (int(a["s1"][1, 2, 1]) + 3) % 256 if a["s1"][1, 2, 1] < 253 else a["s1"][1, 2, 1] - 3
    del b["s2"]  # missing: not identical, not compared
    assert compare_images(a, b, "(a) vs (b)") == (
        "identical images (a) vs (b): 1/3; where they differ: max |difference| 3 of 255, "
        "4.17% of values differ, mean |difference| 0.083")


def test_chaos_benchmark_smoke(background_smokes) -> None:
    """``python -m benchmarks.chaos --smoke`` (in the background, on a local Ray of its own whose actors alone it
    kills) runs both jobs and reports no lost or duplicated sample."""
    code, stdout, stderr = background_smokes.result("test_chaos_benchmark_smoke")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    figures = dict(line.split(None, 1) for line in stdout.splitlines() if line and line.split()[0] in {
        "samples_lost", "samples_duplicated", "shards_identical", "shards"})
    assert figures["samples_lost"].strip() == "0" and figures["samples_duplicated"].strip() == "0", stdout
    assert figures["shards_identical"].strip() == figures["shards"].strip(), stdout


def test_study_benchmark_smoke(background_smokes) -> None:
    """``python -m benchmarks study --smoke`` (in the background, each variant on a local Ray of its own): the study
    and the four jobs one after another both run, the ratios and the study's timeline are printed, and the study's
    table holds the four jobs' numbers."""
    code, stdout, stderr = background_smokes.result("test_study_benchmark_smoke")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert re.search(r"^ratio \(a\)/\(b\): +\d+\.\d+ ", stdout, re.M), stdout
    assert re.search(r"^ratio \(a\)/\(generate jobs alone\): +\d+\.\d+ ", stdout, re.M), stdout
    span = r"-?\d+--?\d+"
    assert re.search(rf"^\(a\)'s jobs, seconds from its start: generate m1 {span}; evaluate m1 {span}; "
                     rf"generate m2 {span}; evaluate m2 {span}$", stdout, re.M), stdout
    assert "table numbers equal the sequential jobs' (FID, IS, CLIP of both models): True" in stdout, stdout


def test_fid_benchmark_smoke(background_smokes) -> None:
    """``benchmarks.fid`` in smoke mode: synthmill's Frechet distance equals pytorch-fid's, both timed;
    ``python -m benchmarks fid --smoke`` (in the background, tests/conftest.py) prints the verdict line."""
    from benchmarks import fid

    result = fid.run(**fid.SMOKE)
    assert result["rel_diff"] <= 1e-6 and result["rel_diff_met"], result
    assert result["cov_check_rel_err"] <= 1e-9, result
    for key in ("pytorch_fid_s", "synthmill_s", "speedup"):
        assert result[key] > 0, result
    assert len(result["pytorch_fid_all_s"]) == len(result["synthmill_all_s"]) == fid.SMOKE["repeats"], result
    merge = fid.merge_run(fid.SMOKE["dim"], **fid.SMOKE_MERGE)  # 50 rows of 64 floats against 64 x 64 doubles
    assert merge["merged_rel_diff"] <= 1e-12 and 2.5 <= merge["bytes_ratio"] <= 2.6, merge
    assert all(f["merge_s"] > 0 and f["commit_s"] > 0 for f in merge["forms"].values()), merge

    code, stdout, stderr = background_smokes.result("test_fid_benchmark_smoke")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert re.search(r"^ratio: pytorch-fid / synthmill = \d+\.\d+ .*relative difference = \S+ \(goal <= 1e-06: met\)$",
                     stdout, re.M), stdout
    assert re.search(r"^ratio sums / rows: bytes 2\.5\d, driver's merge \d+\.\d+, .* differ by \S+ \(relative\)$",
                     stdout, re.M), stdout
    # the driver's merge from s3:// through a throttled link: one read at a time against its 4 in flight
    assert re.search(r"^ratio from s3:// \(50 MB/s, 30 ms a response\): one read at a time / 4 in flight = \d+\.\d+ ",
                     stdout, re.M), stdout


def test_extract_benchmark_smoke(background_smokes) -> None:
    """``python -m benchmarks extract --smoke`` (in the background, tests/conftest.py): runs (a)-(c),
    ratios printed, statistics agree with pytorch-fid."""
    code, stdout, stderr = background_smokes.result("test_extract_benchmark_smoke")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    m = re.search(r"^ratios: \(b\)/\(a\) = \d+\.\d+, \(c\)/\(a\) = \d+\.\d+; "
                  r"statistics \(b\) vs \(a\): max relative difference (\S+)$", stdout, re.M)
    assert m, stdout
    assert float(m.group(1)) <= 1e-4, stdout


def test_distill_benchmark_smoke(background_smokes) -> None:
    """``python -m benchmarks distill --smoke`` (in the background, on a local Ray of its own): the plain loop and
    a 1-worker ``synthmill run`` train, and the table of ratios prints."""
    code, stdout, stderr = background_smokes.result("test_distill_benchmark_smoke")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert re.search(r"^\(a\) plain PyTorch loop, 1 process +\d+\.\d+ +1\.000 *$", stdout, re.M), stdout
    assert stdout.startswith("CPU: rerun under synthmill's CPU actor malloc settings: "), stdout  # the plain loop's too
    assert "\nshared by (a) and synthmill run: " in stdout, stdout
    assert re.search(r"^\(b\) synthmill run, 1 worker +\d+\.\d+ +\d+\.\d+ +\d+\.\d+$", stdout, re.M), stdout


def test_train_benchmark_smoke(background_smokes) -> None:
    """``python -m benchmarks train --smoke``: for finetune, LCM and LCM-LoRA, the plain loop of the objective's row
    and a 1-worker ``synthmill run`` of the job train, and the table of ratios prints a row for each."""
    code, stdout, stderr = background_smokes.result("test_train_benchmark_smoke")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert stdout.startswith("CPU: rerun under synthmill's CPU actor malloc settings: "), stdout  # the plain loop's too
    assert "\nshared by (a) and synthmill run: " in stdout, stdout
    for method in ("finetune", "lcm", "lcm-lora"):
        assert re.search(rf"^{method} +\(a\) plain loop, 1 process +\d+\.\d+ +1\.000 *$", stdout, re.M), stdout
        assert re.search(rf"^{method} +\(b\) synthmill run, 1 worker +\d+\.\d+ +\d+\.\d+ +\d+\.\d+$", stdout,
                         re.M), stdout


def test_driver_benchmark_smoke(background_smokes) -> None:
    """``python -m benchmarks driver --smoke`` (in the background): the dry runs plan without Ray, a model or an
    output folder, and the pool's dispatch overhead prints next to a plain ``ray.wait`` loop's (on a local Ray)."""
    code, stdout, stderr = background_smokes.result("test_driver_benchmark_smoke")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert re.search(r"^dry-run ratios: 20,000 / 1,000 rows: wall = \d+\.\d+x, CPU = \d+\.\d+x, peak RSS = \d+\.\d+x; "
                     r"20,000 rows / import synthmill\.cli: wall = \d+\.\d+x, CPU = \d+\.\d+x, peak RSS = \d+\.\d+x$",
                     stdout, re.M), stdout
    assert re.search(r"^dry run left behind: output folder created: no; Ray initialized: no .*diffusers imported: no;",
                     stdout, re.M), stdout
    assert re.search(r"^dispatch ratio: ShardPool / plain ray\.wait loop = \d+\.\d+ \(\d+\.\d+ vs \d+\.\d+ ms/shard\)$",
                     stdout, re.M), stdout


def test_scale_benchmark_smoke(capsys) -> None:
    """``python -m benchmarks scale --smoke`` (in this process: no Ray, a few seconds): a shard costs the storage
    three writes (tar, index part, marker: three PUTs on S3), the driver's check of it two listings and one read,
    the merge one read; the check of 2,000 copies of it finds every one; the merges, local and from a moto
    server, write every row."""
    from benchmarks import scale

    assert scale.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "    commit (actor): {'write_bytes': 2, 'write_json': 1}\n" in out, out
    assert "    check (driver, status / resume): {'list_sizes': 2, 'read_json': 1}\n" in out, out
    assert "    index merge (driver): {'read_bytes': 1, 'put_file': 1}\n" in out, out
    assert re.search(r"^\| 2,000 \| \d+\.\d+ \| \d+\.\d+ \| \d+\.\d+ \|$", out, re.M), out
    assert re.search(r"^\(3\) index merge of 50 parts of 100 rows \(5,000 rows, ", out, re.M), out
    assert re.search(r"^\(4\) index merge of 20 parts from moto on 127\.0\.0\.1: .* ratio \d+\.\d+x$", out, re.M), out


def test_startup_benchmark_smoke(background_smokes) -> None:
    """``python -m benchmarks startup --smoke --s3`` (in the background): the start-up breakdown of ``synthmill run``
    (from its summary.json milestones; on a local Ray it starts) next to a plain script's, and the ratio, both
    loading the model from ``s3://`` (a moto server the benchmark starts), each downloading it in every run. The job
    on the local Ray that ``synthmill run`` starts for itself makes the plain diffusers script's images, pixel for
    pixel."""
    code, stdout, stderr = background_smokes.result("test_startup_benchmark_smoke")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert re.search(r"^\| download of the s3:// model .* \| \d+\.\d+ \|  \|$", stdout, re.M), stdout
    assert "the model from s3:// (moto on 127.0.0.1), downloaded in every run" in stdout, stdout
    assert "\nidentical images, plain / synthmill: 2/2 in every run\n" in stdout, stdout
    assert re.search(r"^both: channels-last False, float32; ", stdout, re.M), stdout
    assert re.search(r"^ratio: launch to exit, plain / synthmill, median of 1 interleaved rounds = \d+\.\d+ ", stdout,
                     re.M), stdout


def test_gpu_entries_by_number() -> None:
    """``python -m benchmarks gpu 3 0`` picks GPU_RUNS entries in the order given (what gpu_suite.sh passes);
    a number out of range stops before anything runs, naming the valid range."""
    import pytest

    from benchmarks.__main__ import GPU_RUNS, gpu_runs, main

    assert gpu_runs([]) == GPU_RUNS
    assert gpu_runs(["3", "0"]) == (GPU_RUNS[3], GPU_RUNS[0])
    with pytest.raises(SystemExit, match=f"entry numbers 0-{len(GPU_RUNS) - 1} of GPU_RUNS, got 0 x"):
        main(["gpu", "0", "x"])


def test_record_keeps_one_section_per_command_and_machine(tmp_path) -> None:
    """benchmarks/record.py: a rerun replaces its own section, other commands add theirs, the head stays."""
    from benchmarks.record import PART, machine, record

    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\nHand-written reading.\n", encoding="utf-8")
    record("fid", ["--repeats", "1"], "ratio: 13.2\n", path)
    record("driver", [], "dispatch ratio 1.009\n", path)
    record("fid", ["--repeats", "1"], "ratio: 12.9\n", path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Benchmark results\n\nHand-written reading.\n") and text.count(PART) == 1
    assert "ratio: 12.9" in text and "ratio: 13.2" not in text and "dispatch ratio 1.009" in text
    assert text.count(f"### `python -m benchmarks fid --repeats 1` on {machine()}") == 1
    assert text.index("dispatch ratio") < text.index("ratio: 12.9")  # the rerun moves to the end


def test_batch_sweep_in_process(tiny_sd, tmp_path) -> None:
    """``--batch-sweep``'s steady-state loop: (a) and (b) per batch size, and the table that names the fastest."""
    from benchmarks.generate import Settings, render_sweep, sweep

    cfg = Settings(tiny_sd, 4, 1, 32, 1, 4, 7.5, 0, 1, 2)
    rows = sweep(cfg, str(tmp_path), [1, 4])
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        assert r["plain"] > 0 and r["synthmill"] > 0 and 0 <= r["idle"] < 1 and r["peak_gib"] is None
    table = render_sweep(rows)
    assert table.count("\n| ") == 3 and "fastest batch size for synthmill here: " in table


def test_device_wheels_strip_leaves_an_installable_wheel(tmp_path) -> None:
    """benchmarks/device_wheels.py: the dropped members and their RECORD lines go; pip installs the rest."""
    import base64
    import hashlib
    import zipfile

    from benchmarks.device_wheels import strip_wheel

    members = {"ray/__init__.py": b"VERSION = '0'\n", "ray/jars/ray_dist.jar": bytes(range(256)) * 4096,
               "ray-9.9.dist-info/METADATA": b"Metadata-Version: 2.1\nName: ray\nVersion: 9.9\n",
               "ray-9.9.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                          b"Tag: py3-none-any\n"}

    def record(name: str, data: bytes) -> str:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"{name},sha256={digest},{len(data)}"

    wheel = tmp_path / "ray-9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr("ray-9.9.dist-info/RECORD",
                   "\n".join([record(n, d) for n, d in members.items()] + ["ray-9.9.dist-info/RECORD,,"]) + "\n")
    assert strip_wheel(str(wheel)) > 0
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert "ray/jars/ray_dist.jar" not in names and "ray/__init__.py" in names
        assert "ray/jars/" not in z.read("ray-9.9.dist-info/RECORD").decode()
    assert strip_wheel(str(wheel)) == 0  # nothing left to drop
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                           str(target), str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (target / "ray" / "__init__.py").read_bytes() == members["ray/__init__.py"]
    assert not (target / "ray" / "jars").exists()
