"""Bad input: exit code 2, one line naming the field or file, nothing written under output.path.

These go through the real CLI entry (``synthmill.cli.main``) in-process; one test runs the installed
console script to check the exit code a shell sees. No model is loaded and Ray is never started.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from synthmill.cli import main
from tests.conftest import REPO, base_spec, point_hub_at


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, (err[-1] if err else "")


@pytest.fixture
def good(tiny_sd, prompts_tsv, tmp_path) -> dict:
    return base_spec(tiny_sd, prompts_tsv, str(tmp_path / "out"))


def expect_error(capsys, spec_path: str, *needles: str, overrides: tuple[str, ...] = (),
                 output: str | None = None) -> str:
    for command in ("validate", "run"):
        code, line = run_cli(capsys, command, spec_path, *overrides)
        assert code == 2, (command, line)
        assert line.startswith("synthmill: error: "), line
        for needle in needles:
            assert needle in line, (needle, line)
        if output is not None:
            assert not os.path.exists(output), f"{command} wrote {output}"
    return line


def test_good_spec_validates_and_dry_run_writes_nothing(capsys, write_spec, good):
    path = write_spec(good)
    code, _ = run_cli(capsys, "validate", path)
    assert code == 0
    assert main(["run", path, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["prompts"], plan["samples"], plan["shards"], plan["shards_done"]) == (11, 22, 5, 0)
    assert not os.path.exists(good["output"]["path"])


def test_malformed_yaml(capsys, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("kind: generate\nmodel: {path: x\n  steps: [\n", encoding="utf-8")
    expect_error(capsys, str(p), str(p), "malformed YAML", "line")


def test_missing_spec_file(capsys, tmp_path):
    expect_error(capsys, str(tmp_path / "nope.yaml"), "nope.yaml", "not found")


def test_unknown_kind(capsys, write_spec, good):
    good["kind"] = "generat"
    expect_error(capsys, write_spec(good), "'kind'", "generate")


def test_unknown_key_suggests_closest(capsys, write_spec, good):
    good["sampling"]["stesp"] = 3
    expect_error(capsys, write_spec(good), "unknown key 'sampling.stesp'", "did you mean 'sampling.steps'")
    good["sampling"].pop("stesp")
    good["outptu"] = {}
    expect_error(capsys, write_spec(good), "unknown key 'outptu'", "did you mean 'output'")


def test_unknown_key_in_override(capsys, write_spec, good):
    expect_error(capsys, write_spec(good), "cluster.batchsize", "cluster.batch_size",
                 overrides=("cluster.batchsize=4",))


def test_override_not_key_value(capsys, write_spec, good):
    expect_error(capsys, write_spec(good), "'steps'", "key=value", overrides=("steps",))


def test_wrong_type(capsys, write_spec, good):
    expect_error(capsys, write_spec(good), "sampling.steps", "abc", overrides=("sampling.steps=abc",))


def test_missing_required_field(capsys, write_spec, good):
    del good["model"]
    expect_error(capsys, write_spec(good), "model.path", "required")


@pytest.mark.parametrize(
    "override,field",
    [
        ("sampling.steps=0", "sampling.steps"),
        ("sampling.guidance_scale=-1", "sampling.guidance_scale"),
        ("output.samples_per_shard=0", "output.samples_per_shard"),
        ("cluster.batch_size=0", "cluster.batch_size"),
        ("cluster.num_actors=0", "cluster.num_actors"),
        ("cluster.num_actors=many", "cluster.num_actors"),
        ("sampling.images_per_prompt=0", "sampling.images_per_prompt"),
        ("prompts.limit=0", "prompts.limit"),
    ],
)
def test_out_of_range(capsys, write_spec, good, override, field):
    expect_error(capsys, write_spec(good), f"'{field}'", overrides=(override,), output=good["output"]["path"])


@pytest.mark.parametrize("field", ["height", "width"])
def test_size_not_multiple_of_8(capsys, write_spec, good, field):
    expect_error(capsys, write_spec(good), f"sampling.{field}", "multiple of 8", overrides=(f"sampling.{field}=100",))


def test_unknown_format_and_scheduler(capsys, write_spec, good):
    expect_error(capsys, write_spec(good), "output.format", "gif", "png", overrides=("output.format=gif",))
    expect_error(capsys, write_spec(good), "model.scheduler", "did you mean 'euler'",
                 overrides=("model.scheduler=eulr",))


def test_speed_settings(capsys, write_spec, good):
    """compile_mode is checked; channels_last is a bool; the new keys at their defaults keep old fingerprints."""
    from synthmill.jobs.spec import load_spec

    expect_error(capsys, write_spec(good), "model.compile_mode", "reduce-overhead",
                 overrides=("model.compile_mode=fast",))
    expect_error(capsys, write_spec(good), "model.channels_last", overrides=("model.channels_last=sometimes",))
    path = write_spec(good)
    base = load_spec(path).fingerprint("sha256:rows")
    assert load_spec(path, ["model.channels_last=null", "model.compile=false"]).fingerprint("sha256:rows") == base
    # compiled kernels may change fp16 bits
    assert load_spec(path, ["model.compile=true"]).fingerprint("sha256:rows") != base
    assert load_spec(path, ["model.channels_last=true"]).fingerprint("sha256:rows") != base


def test_custom_pipeline_needs_trust(capsys, write_spec, good):
    expect_error(capsys, write_spec(good), "model.custom_pipeline", "trust_remote_code",
                 overrides=("model.custom_pipeline=lpw_stable_diffusion",))


def test_missing_prompt_file(capsys, write_spec, good, tmp_path):
    good["prompts"]["path"] = str(tmp_path / "missing.tsv")
    expect_error(capsys, write_spec(good), "prompts.path", "missing.tsv", "not found", output=good["output"]["path"])


def test_unknown_prompt_file_type(capsys, write_spec, good, tmp_path):
    p = tmp_path / "prompts.xlsx"
    p.write_text("x")
    good["prompts"]["path"] = str(p)
    expect_error(capsys, write_spec(good), "prompts.xlsx", ".xlsx", ".parquet")


def test_missing_column(capsys, write_spec, good):
    good["prompts"]["column"] = "captions"
    expect_error(capsys, write_spec(good), "prompts.column 'captions'", "columns: id, caption")


@pytest.mark.parametrize(
    "name,content",
    [("empty.txt", ""), ("header_only.tsv", "id\tcaption\n"), ("empty.jsonl", ""), ("empty.csv", "")],
)
def test_empty_prompt_source(capsys, write_spec, good, tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    good["prompts"]["path"] = str(p)
    expect_error(capsys, write_spec(good), name, "empty", output=good["output"]["path"])


def test_model_folder_missing(capsys, write_spec, good, tmp_path):
    good["model"]["path"] = str(tmp_path / "no" / "such" / "model")
    expect_error(capsys, write_spec(good), "model.path", "folder not found")


def test_model_folder_not_a_pipeline(capsys, write_spec, good, tmp_path):
    (tmp_path / "notapipe").mkdir()
    good["model"]["path"] = str(tmp_path / "notapipe")
    expect_error(capsys, write_spec(good), "model.path", "model_index.json")


def test_pickled_weights_need_opt_in(capsys, write_spec, good, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(good["model"]["path"], folder)
    for st in folder.rglob("*.safetensors"):
        st.rename(st.with_suffix(".bin"))
    good["model"]["path"] = str(folder)
    expect_error(capsys, write_spec(good), "model.allow_pickle", ".bin")


def test_output_is_a_file(capsys, write_spec, good, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    good["output"]["path"] = str(f)
    expect_error(capsys, write_spec(good), "output.path", "is a file")


def test_output_under_a_file(capsys, write_spec, good, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    good["output"]["path"] = str(f / "out")
    expect_error(capsys, write_spec(good), "output.path", "cannot be written")


def test_output_folder_of_another_job(capsys, write_spec, good):
    out = good["output"]["path"]
    os.makedirs(out)
    with open(os.path.join(out, "plan.json"), "w") as fh:
        json.dump({"fingerprint": "0123456789abcdef", "shards": 1, "samples": 1}, fh)
    expect_error(capsys, write_spec(good), "output.path", "different job")
    assert sorted(os.listdir(out)) == ["plan.json"]
    # another kind's output says so; and other prompts with other settings are not blamed on the prompts
    with open(os.path.join(out, "plan.json"), "w") as fh:
        json.dump({"kind": "evaluate", "fingerprint": "0123456789abcdef"}, fh)
    expect_error(capsys, write_spec(good), f"output.path {out}: holds the output of an evaluate job, and this is "
                 "a generate job; use a new output.path")
    with open(os.path.join(out, "plan.json"), "w") as fh:
        json.dump({"kind": "generate", "fingerprint": "0123456789abcdef", "prompts_digest": "other rows"}, fh)
    line = expect_error(capsys, write_spec(good), f"output.path {out}: holds a different job")
    assert "prompts.path" not in line, line


def test_output_folder_not_empty(capsys, write_spec, good):
    out = good["output"]["path"]
    os.makedirs(out)
    open(os.path.join(out, "stranger.txt"), "w").close()
    expect_error(capsys, write_spec(good), "output.path", "not empty")


def test_malformed_override_value(capsys, write_spec, good):
    """An override's value is read as YAML: a malformed one is one line naming the override, not a traceback."""
    out = good["output"]["path"]
    expect_error(capsys, write_spec(good), "override 'a.b=[1'", "not valid YAML", overrides=("a.b=[1",), output=out)
    expect_error(capsys, write_spec(good), "override 'sampling.steps={3'",
                 overrides=("sampling.seed=1", "sampling.steps={3"), output=out)


def test_section_given_a_scalar(capsys, write_spec, good):
    """A value where a section of keys belongs names the field (OmegaConf's own message names only a class)."""
    out = good["output"]["path"]
    line = expect_error(capsys, write_spec(dict(good, model="segmind/tiny-sd")), "job", "field 'model'",
                        "section of keys (model.path", "a string 'segmind/tiny-sd'", output=out)
    assert "Merge error" not in line, line
    expect_error(capsys, write_spec(dict(good, prompts=["a.tsv"])), "field 'prompts'", "a list ['a.tsv']", output=out)
    expect_error(capsys, write_spec(good), "override 'sampling=abc'", "field 'sampling'", "section of keys (sampling.",
                 "a string 'abc'", overrides=("sampling=abc",), output=out)
    expect_error(capsys, write_spec(good), "override 'cluster=3'", "field 'cluster'", "a number 3",
                 overrides=("cluster.batch_size=2", "cluster=3"), output=out)


def test_options_anywhere_among_overrides(capsys, write_spec, good, tmp_path):
    """``--dry-run``, ``-v`` and ``--json`` may come before, between or after the positionals; overrides keep
    their order (the last wins)."""
    path, other = write_spec(good), str(tmp_path / "other")
    assert main(["run", path, "--dry-run", f"output.path={other}"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == other
    assert main(["run", path, f"output.path={tmp_path / 'first'}", "-v", "--dry-run", f"output.path={other}"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == other
    assert main(["run", "--dry-run", path, "-v"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == good["output"]["path"]
    code, line = run_cli(capsys, "validate", path, "-v", "cluster.batch_size=0")  # the override after -v is applied
    assert code == 2 and "cluster.batch_size" in line, line
    assert run_cli(capsys, "validate", "-v", path, "sampling.steps=3")[0] == 0
    for argv in (["status", "--json", str(tmp_path)], ["status", str(tmp_path), "--json"]):
        code, line = run_cli(capsys, *argv)
        assert code == 2 and "not a synthmill output" in line, (argv, line)
    code, line = run_cli(capsys, "status", str(tmp_path / "typo.yaml"), "output.path=x")
    assert code == 2 and line.endswith(f"{tmp_path / 'typo.yaml'}: spec file not found"), line
    code, line = run_cli(capsys, "status", str(tmp_path), "extra=1")
    assert code == 2 and line.endswith(
        f"{tmp_path}: key=value overrides need a job spec YAML, not an output folder"), line
    for argv in (["run", path, "--dry-run", "--bogus"], ["status", str(tmp_path), "--bogus"], ["validate", "-v"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2, argv
    assert "the following arguments are required: spec\n" in capsys.readouterr().err  # overrides stay optional
    assert not os.path.exists(good["output"]["path"]) and not os.path.exists(other)


def test_console_script_exit_codes(write_spec, good):
    """The installed `synthmill` command gives the shell 0 for a good spec and 2 for a bad one."""
    exe = os.path.join(os.path.dirname(sys.executable), "synthmill")
    path = write_spec(good)
    ok = subprocess.run([exe, "validate", path], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "11 prompts -> 22 samples in 5 shards" in ok.stdout
    bad = subprocess.run([exe, "validate", path, "sampling.height=33"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("synthmill: error: field 'sampling.height'")


@pytest.mark.parametrize("name",
                         sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.yaml"))))
def test_shipped_configs_load(name):
    """Every config in configs/ is a valid spec of its kind (inputs are checked when it runs)."""
    from synthmill.jobs.spec import load_spec

    spec = load_spec(os.path.join(REPO, "configs", name))
    assert spec.kind in ("generate", "evaluate", "distill", "finetune")


@pytest.mark.parametrize("path, revision, needles", [
    ("org/no-such-pipe", None, ("model.path org/no-such-pipe: no such folder here and no such model on http://127.0.0.1:",
                                "HF_TOKEN")),
    ("org/pipe", "v9", ("model.revision v9: no such revision of org/pipe on http://127.0.0.1:",)),
    ("org/text-model", None, ("model.path org/text-model: not a diffusers pipeline (no model_index.json on ",)),
    ("org/gated", None, ("model.path org/gated: a gated model on http://127.0.0.1:", "accept its terms")),
])
def test_hub_id_the_hub_does_not_have_is_exit_2(capsys, write_spec, good, hub, path, revision, needles):
    """A mistyped hub id (or revision, or a hub repo that is no diffusers pipeline) is refused at validate, from
    one HEAD request for its model_index.json; before, it passed and failed on the actors at load."""
    good["model"] = {"path": path, "revision": revision}
    expect_error(capsys, write_spec(good), *needles, output=good["output"]["path"])
    asked = hub.model_requests()
    assert asked and set(asked) == {f"/{path}/resolve/{revision or 'main'}/model_index.json"}, hub.requests


def test_hub_check_passes_a_pipeline_and_steps_aside_without_an_answer(capsys, write_spec, good, hub, monkeypatch,
                                                                        caplog):
    """A hub pipeline passes; so does any hub id when the hub gives no clear answer (the load then decides, maybe
    from the nodes' caches), with a log line saying it was not checked; HF_HUB_OFFLINE asks nothing. (On a cluster:
    a local Ray would load from this machine's cache alone, tests/test_signals.py.)"""
    import logging
    import socket

    from huggingface_hub import constants

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # validate connects nothing

    good["model"] = {"path": "org/pipe", "revision": "refs/pr/1"}  # a revision with "/" in it goes quoted
    assert run_cli(capsys, "validate", write_spec(good))[0] == 0
    assert hub.model_requests() == ["/org/pipe/resolve/refs/pr/1/model_index.json"]
    good["model"] = {"path": "org/broken"}  # the hub answers 500: a warning, and the load decides
    with caplog.at_level(logging.INFO, logger="synthmill"):
        assert run_cli(capsys, "validate", write_spec(good))[0] == 0
    assert f"model.path org/broken: not checked, {hub.url} answered HTTP 500 (" in caplog.text
    good["model"] = {"path": "org/no-such-pipe"}
    path = write_spec(good)
    with socket.socket() as s:  # a port with no server behind it
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    point_hub_at(monkeypatch, closed)
    with caplog.at_level(logging.INFO, logger="synthmill"):
        assert run_cli(capsys, "validate", path)[0] == 0
    assert f"model.path org/no-such-pipe: not checked, {closed} did not answer (" in caplog.text
    point_hub_at(monkeypatch, hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert run_cli(capsys, "validate", path)[0] == 0
    assert len(hub.model_requests()) == 2


def test_hub_checks_reach_distill_teachers_and_honour_hf_endpoint(write_spec, hub, tmp_path):
    """The installed command, with HF_ENDPOINT in its environment as for a mirror: a distill teacher that the
    hub does not have is exit 2 naming teacher.path."""
    spec = {"kind": "distill", "teacher": {"path": "org/no-such-teacher"}, "student": {"arch": "bk-small"},
            "data": {"path": str(tmp_path / "data")}, "train": {"max_steps": 2},
            "output": {"path": str(tmp_path / "out")}}
    exe = os.path.join(os.path.dirname(sys.executable), "synthmill")
    env = dict(os.environ, HF_ENDPOINT=hub.url)
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([exe, "validate", write_spec(spec)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"synthmill: error: teacher.path org/no-such-teacher: no such folder here and no such model on {hub.url}"
    ), proc.stderr
    assert hub.model_requests() == ["/org/no-such-teacher/resolve/main/model_index.json"]
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("edit, overrides, needles", [
    (lambda s: s.update(kind=["generate"]), (), ["field 'kind' is ['generate']", "known kinds"]),
    (lambda s: s.update(storage=["a", "b"]), (), ["field 'storage': must be a section of keys", "a list"]),
    (None, ("cluster.resources=[a100]",), ["override 'cluster.resources=[a100]'", "field 'cluster.resources'"]),
    (lambda s: s["output"].update({None: "x"}), (), ["key None in section 'output' is not a name"]),
    (lambda s: s["output"].update({3: "x"}), (), ["key 3 in section 'output' is not a name"]),
    (None, (".output.path=x",), ["override '.output.path=x' is not of the form key=value"]),
    (None, ("output.=1",), ["override 'output.=1' is not of the form key=value"]),
    (None, ("a..b=1",), ["override 'a..b=1' is not of the form key=value"]),
    (lambda s: s["output"].update(path="/tmp/a\0b"), (), ["field 'output.path': contains a NUL character"]),
    (None, ("cluster.resources.CPU=2",),
     ["field 'cluster.resources.CPU': is set by synthmill (cluster.cpus_per_actor"]),
    (None, (f"sampling.seed={2**63}",), ["field 'sampling.seed': must be in 0..2**63-1"]),
    # 11 prompts x 2 images from 2**63 - 21: the last sample's seed would be 2**63
    (None, (f"sampling.seed={2**63 - 21}",), ["'sampling.seed'", "22 samples passes the largest seed"]),
    (None, ("output.path=foo://bucket/out",), ["output.path: foo://bucket/out: no storage for 'foo://' URLs"]),
    (None, ("prompts.path=foo://bucket/p.tsv",), ["prompts.path: foo://bucket/p.tsv: no storage for 'foo://'"]),
    (None, ("output.path=memory://out",), ["output.path memory://out: memory:// lives inside one process"]),
    (None, ("output.path=simplecache::memory://out",), ["memory:// lives inside one process"]),
    (lambda s: s["output"].update(path="/tmp/x\udcff/out"), (),
     ["field 'output.path': holds '/tmp/x\\udcff/out', not UTF-8"]),
    (None, (f"output.path=/tmp/{'x' * 256}/out",), ["a folder name of 256 bytes is longer than a file system allows"]),
])
def test_shapes_keys_and_values_the_schema_alone_would_not_name(capsys, write_spec, good, edit, overrides, needles):
    """Each of these gave a traceback (exit 1) or a line that named no field before: a list for the kind, a
    list or scalar where a mapping goes, a key that is not a name, an override key with an empty part, a NUL
    in a path, a resource Ray takes only as a count, a seed past 64 bits, a URL no filesystem serves."""
    if edit:
        edit(good)
    if None in good["output"] or 3 in good["output"]:  # keys yaml.safe_dump writes as they are
        import yaml

        path = os.path.join(os.path.dirname(good["output"]["path"]), "spec.yaml")
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(good, fh)
    else:
        path = write_spec(good)
    expect_error(capsys, path, *needles, overrides=overrides, output=good["output"]["path"])


def test_a_spec_file_that_is_not_utf8(capsys, tmp_path):
    p = tmp_path / "utf16.yaml"
    p.write_bytes("kind: generate\n".encode("utf-16"))
    expect_error(capsys, str(p), str(p), "a spec file must be UTF-8 text")


def test_list_given_a_mapping_and_an_infinite_loss_weight(tmp_path):
    from synthmill.errors import SpecError
    from synthmill.jobs.spec import load_spec

    p = tmp_path / "eval.yaml"
    p.write_text("kind: evaluate\ngenerated: {path: x}\nmetrics: {fid: 1}\noutput: {path: y}\n", encoding="utf-8")
    with pytest.raises(SpecError, match=r"field 'metrics': must be a list, got a mapping \{'fid': 1\}"):
        load_spec(str(p))
    # a single name for a list (metrics=fid on the command line), not OmegaConf's "AnyNode is not a ListConfig"
    p.write_text("kind: evaluate\ngenerated: {path: x}\nmetrics: [fid]\noutput: {path: y}\n", encoding="utf-8")
    with pytest.raises(SpecError, match=r"^override 'metrics=fid': field 'metrics': must be a list, got a string "
                                        r"'fid' \(write \[fid\]\)$"):
        load_spec(str(p), ["metrics=fid"])
    p = tmp_path / "distill.yaml"
    p.write_text("kind: distill\nteacher: {path: t}\nstudent: {arch: bk-small}\ndata: {path: d}\nloss: {task: .inf}\n"
                 "train: {max_steps: 2}\noutput: {path: y}\n", encoding="utf-8")
    with pytest.raises(SpecError, match=r"field 'loss.task': must be >= 0 and finite, got inf"):
        load_spec(str(p))


def test_a_safety_checker_the_job_does_not_load_may_be_missing(capsys, write_spec, good, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(good["model"]["path"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]  # named, folder deleted
    (folder / "model_index.json").write_text(json.dumps(index))
    good["model"]["path"] = str(folder)
    expect_error(capsys, write_spec(good), "names a safety_checker (StableDiffusionSafetyChecker) but there is no "
                 "safety_checker/ folder")
    good["model"]["safety_checker"] = False
    assert run_cli(capsys, "validate", write_spec(good))[0] == 0


@pytest.mark.parametrize("damage, needles", [
    (lambda d: (d / "model_index.json").write_text("{bad", encoding="utf-8"), ["model_index.json cannot be read"]),
    (lambda d: (d / "model_index.json").write_text("[1]", encoding="utf-8"), ["model_index.json is not a JSON object"]),
    (lambda d: __import__("shutil").rmtree(d / "unet"),
     ["names a unet (UNet2DConditionModel) but there is no unet/ folder"]),
    (None, ["model.variant fp16: no weight file of that variant"]),
])
def test_model_folder_whose_index_or_components_are_broken(capsys, write_spec, good, tmp_path, damage, needles):
    """A local pipeline folder is read before any actor loads it: a damaged model_index.json, a component it
    names without its folder, or a variant with no weight files is exit 2, not the same load error on
    every actor."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(good["model"]["path"], folder)
    if damage:
        damage(folder)
    else:
        good["model"]["variant"] = "fp16"
    good["model"]["path"] = str(folder)
    expect_error(capsys, write_spec(good), *needles, output=good["output"]["path"])


def test_output_given_as_a_file_url(capsys, write_spec, good, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    good["output"]["path"] = f"file://{f}"
    expect_error(capsys, write_spec(good), "output.path file://", "is a file, not a folder")


@pytest.mark.parametrize("plan, needle", [
    ("{not json", "plan.json: damaged, not a JSON document"),
    ("[1, 2]", "plan.json: damaged, not a JSON object"),
])
def test_damaged_plan_in_the_output_is_exit_2_for_run_and_status(capsys, write_spec, good, plan, needle):
    out = good["output"]["path"]
    os.makedirs(out)
    with open(os.path.join(out, "plan.json"), "w", encoding="utf-8") as fh:
        fh.write(plan)
    before = sorted(os.listdir(out))
    expect_error(capsys, write_spec(good), needle)
    code, line = run_cli(capsys, "status", out)
    assert code == 2 and needle in line, line
    assert sorted(os.listdir(out)) == before


@pytest.mark.parametrize("plan, needle", [
    ({"kind": "generate", "samples": 4, "fingerprint": "x"}, "its 'shards' is missing or not a number"),
    ({"kind": "evaluate", "sets": [], "fingerprint": "x"}, "its 'sets' is missing or not an object"),
    ({"kind": "train"}, "unknown job kind 'train'"),
    ({"kind": []}, "unknown job kind []"),
    ({"kind": "evaluate", "sets": {"generated": 1}, "fingerprint": "x"}, "a set in its 'sets' has no count of units"),
])
def test_status_of_a_plan_without_what_it_reads(capsys, tmp_path, plan, needle):
    (tmp_path / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    code, line = run_cli(capsys, "status", str(tmp_path))
    assert code == 2 and needle in line and str(tmp_path / "plan.json") in line, line


def test_status_of_a_file_or_an_unknown_protocol(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    code, line = run_cli(capsys, "status", str(f))
    assert code == 2 and line.endswith("afile: not a synthmill output (no plan.json)"), line
    code, line = run_cli(capsys, "status", "foo://bucket/out")
    assert code == 2 and "no storage for 'foo://' URLs" in line, line


LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else ', '.join('x' * 10)}]\n" for i in range(7))


@pytest.mark.parametrize("text, needles", [
    ("output: {path: a}\noutput: {path: b}\n",
     ["key 'output' is given twice in one mapping (lines ", "YAML would keep the last silently"]),
    ("extra: {steps: 2, steps: 3}\n", ["key 'steps' is given twice"]),
    (LAUGHS, ["expands to more than 100000 values (YAML aliases"]),
    ("extra: " + "[" * 5000 + "]" * 5000 + "\n", ["values nested too deeply (at most 64 levels)"]),
    ("extra: " + "{a: " * 100 + "1" + "}" * 100 + "\n", ["values nested too deeply"]),
])
def test_yaml_that_hides_what_it_says_or_would_not_end(capsys, write_spec, good, tmp_path, text, needles):
    """A key given twice (PyYAML keeps the last without a word), aliases that expand to a billion values
    (validate ran for minutes), nesting past Python's recursion limit (a RecursionError traceback)."""
    import yaml

    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(good) + text, encoding="utf-8")
    expect_error(capsys, str(p), str(p), *needles, output=good["output"]["path"])


def test_spec_read_from_a_pipe_and_specs_that_are_not_one(capsys, write_spec, good, tmp_path):
    """A spec may come through a pipe (`synthmill run <(envsubst < job.yaml)`); a device that never ends
    (/dev/zero was read until the kernel killed it) stops at 1 MiB; a folder is named as one."""
    import threading

    import yaml

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(yaml.safe_dump(good), encoding="utf-8"))
    writer.start()
    code, _ = run_cli(capsys, "validate", str(fifo))
    writer.join(timeout=10)
    assert code == 0
    expect_error(capsys, "/dev/zero", "/dev/zero: over 1048576 bytes; a spec file is at most that")
    expect_error(capsys, str(tmp_path), "a folder, not a spec file")


def test_yaml_merge_keys_are_not_duplicates(write_spec, good, tmp_path):
    """A mapping that overrides a key it merges (`<<: *base`) is not a key given twice, also when the
    merged mapping is itself merged elsewhere (PyYAML rewrites merged mappings in place)."""
    import yaml

    from synthmill.jobs.spec import load_spec

    text = yaml.safe_dump(good) + (
        "storage:\n"
        "  config_kwargs: &west {<<: &base {region_name: us-east-1, connect_timeout: 5}, region_name: us-west-2}\n"
        "  client_kwargs: {<<: *west}\n")
    p = tmp_path / "merge.yaml"
    p.write_text(text, encoding="utf-8")
    spec = load_spec(str(p))
    assert spec.storage["client_kwargs"] == {"region_name": "us-west-2", "connect_timeout": 5}
    assert spec.storage["config_kwargs"] == spec.storage["client_kwargs"]


def test_override_bytes_that_are_not_utf8(capsys, write_spec, good):
    """What a shell passes for $'\\xff' reaches Python as a surrogate; YAML's parser raised on it."""
    bad = os.fsdecode(b"model.path=/tmp/\xff\xfe")
    expect_error(capsys, write_spec(good), "override 'model.path=/tmp/\\udcff\\udcfe': not UTF-8 text",
                 overrides=(bad,))


def test_a_newline_in_a_path_stays_on_the_error_line(capsys, write_spec, good):
    good["model"]["path"] = "/tmp/no\nsuch"
    path = write_spec(good)
    code = main(["validate", path])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["synthmill: error: model.path /tmp/no\\nsuch: folder not found (and not a hub id "
                                 "of the form org/name)"], err


def test_output_through_a_loop_of_links(capsys, write_spec, good, tmp_path):
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    for out in (tmp_path / "a", tmp_path / "a" / "out"):
        good["output"]["path"] = str(out)
        expect_error(capsys, write_spec(good), f"output.path {out}: symbolic links on the way form a loop")
    code, line = run_cli(capsys, "status", str(tmp_path / "a"))
    assert code == 2 and line.endswith("a: cannot be read (Too many levels of symbolic links)"), line


def test_more_shards_than_a_job_holds(capsys, write_spec, good, monkeypatch):
    """22 samples one a shard is 22 shards: over a limit of 10, exit 2 before the plan is walked shard by
    shard (2 * 10**10 shards kept validate busy for minutes)."""
    from synthmill.jobs import generate

    monkeypatch.setattr(generate, "MAX_SHARDS", 10)
    expect_error(capsys, write_spec(good), "field 'output.samples_per_shard': 22 samples at 1 a shard are 22 shards, "
                 "more than a job holds (10", overrides=("output.samples_per_shard=1",), output=good["output"]["path"])


# ---- relative paths: what the driver reads is what the actors read ----

def test_relative_paths_are_made_absolute_for_the_actors(monkeypatch, tmp_path):
    """Actors run in the directory their cluster was started in, not the driver's: every relative local path a
    spec names is made absolute against the driver's directory when the spec loads. Hub ids, names, URLs and
    absolute paths stay as written; a name that is also a folder here is that folder (what diffusers would
    load), except a student layout's name."""
    from synthmill.jobs.spec import load_spec

    for folder in ("models/sd", "org", "bk-small", "clip", "openai", "elsewhere/sub", "home"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "lnk").symlink_to(tmp_path / "elsewhere" / "sub")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    specs = {
        "generate": "kind: generate\n"
                    "model: {path: models/sd, custom_pipeline: lpw_stable_diffusion, trust_remote_code: true}\n"
                    "prompts: {path: ./p.tsv}\noutput: {path: out/run1}\n",
        "evaluate": "kind: evaluate\ngenerated: {path: 'out/run1/shards/*.tar'}\nreference: {path: stats.npz}\n"
                    "fid: {weights: 'https://example.com/w.pth'}\nclip: {model: 'local-dir:clip', pretrained: openai}\n"
                    "output: {path: s3://bucket/eval}\n",
        "distill": "kind: distill\nteacher: {path: org/teacher}\nstudent: {arch: bk-small}\ndata: {path: out/run1}\n"
                   "train: {max_steps: 10}\noutput: {path: /abs/distilled}\n",
    }
    loaded = {}
    for kind, text in specs.items():
        (tmp_path / f"{kind}.yaml").write_text(text, encoding="utf-8")
        loaded[kind] = load_spec(f"{kind}.yaml")
    g, e, d = loaded["generate"], loaded["evaluate"], loaded["distill"]
    here = str(tmp_path)
    assert (g.model.path, g.model.custom_pipeline, g.prompts.path, g.output.path) == (
        f"{here}/models/sd", "lpw_stable_diffusion", f"{here}/p.tsv", f"{here}/out/run1")
    assert (e.generated.path, e.reference.path, e.fid.weights, e.clip.model, e.clip.pretrained, e.output.path) == (
        f"{here}/out/run1/shards/*.tar", f"{here}/stats.npz", "https://example.com/w.pth", f"local-dir:{here}/clip",
        "openai", "s3://bucket/eval")  # a tag, though a folder ./openai is here: the reader takes a file or a tag
    assert (d.teacher.path, d.student.arch, d.data.path, d.output.path) == (
        "org/teacher", "bk-small", f"{here}/out/run1", "/abs/distilled")
    assert load_spec("distill.yaml", ["teacher.path=org", "student.arch=org"]).student.arch == f"{here}/org"
    # one folder spelt two ways is one model (the fingerprint holds its path)
    assert load_spec("generate.yaml", [f"model.path={here}/models/./sd/"]).model.path == f"{here}/models/sd"
    assert load_spec("generate.yaml", ["output.path=file://out"]).output.path == f"file://{here}/out"
    assert load_spec("generate.yaml", ["prompts.path=~/p.tsv"]).prompts.path == f"{here}/home/p.tsv"
    # lnk/.. is where the link leads (elsewhere/), not this folder: a .. stays as written
    assert load_spec("generate.yaml", ["prompts.path=lnk/../p.tsv"]).prompts.path == f"{here}/lnk/../p.tsv"
    assert load_spec("generate.yaml", ["prompts.path=models/sd/../../p.tsv"]).prompts.path == f"{here}/p.tsv"
    assert load_spec("generate.yaml", ["prompts.path=lnk/x/../../p.tsv"]).prompts.path == f"{here}/lnk/../p.tsv"


def test_relative_output_of_a_ray_job_with_a_working_dir_is_exit_2(capsys, monkeypatch, write_spec, good, tmp_path):
    """Under ``ray job submit --working-dir`` the job runs in the node's copy of that folder, as each of its actors
    does in its own node's: relative inputs stay relative (each finds its copy), a relative output.path is refused
    (each node would write into its own copy, which Ray may delete once the job ends). An absolute one runs."""
    import shutil

    from synthmill.jobs.spec import load_spec

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"}, "metadata": {}}))
    shutil.copy(good["prompts"]["path"], tmp_path / "prompts.tsv")
    monkeypatch.chdir(tmp_path)
    good.update(prompts=dict(good["prompts"], path="prompts.tsv"), output=dict(good["output"], path="out"))
    expect_error(capsys, write_spec(good), "field 'output.path': 'out' is relative, and this job runs in Ray's copy of "
                 f"its working_dir ({tmp_path})", "give an absolute path on storage every node shares, or an s3:// URL",
                 output=str(tmp_path / "out"))
    spec = load_spec(write_spec(good), [f"output.path={tmp_path}/out"])
    assert (spec.prompts.path, spec.output.path) == ("prompts.tsv", f"{tmp_path}/out")
    assert run_cli(capsys, "validate", write_spec(good), f"output.path={tmp_path}/out")[0] == 0


def test_an_actor_that_does_not_see_the_drivers_files_says_so(tmp_path, prompts_tsv, tiny_sd):
    """A local path must name one file for every node: an actor whose node does not see an input the driver
    checked, or the plan.json the driver wrote in a local output.path before starting it, stops before it loads
    anything, naming the field, the path and what to do. Hub ids, names and URLs are not local files, and only
    the paths the actor reads count (not here: a reference .npz, which the driver reads)."""
    import shutil

    from synthmill.jobs.spec import load_spec, node_paths
    from synthmill.sharding.nodes import check_node_sees

    GENERATOR, SCORER = ("model.path", "prompts.path", "output.path"), ("generated.path", "output.path")
    model, prompts = shutil.copytree(tiny_sd, tmp_path / "model"), shutil.copy(prompts_tsv, tmp_path / "p.tsv")
    out = tmp_path / "out"
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(f"kind: generate\nmodel: {{path: {model}}}\nprompts: {{path: {prompts}}}\n"
                         f"output: {{path: {out}}}\n", encoding="utf-8")
    spec = load_spec(str(spec_path))
    with pytest.raises(RuntimeError, match=f"^output.path {out}: this node .* does not see the plan.json the driver "
                                           "wrote there; a local path must be on storage every node of the cluster "
                                           "shares .*, else use s3://$"):
        check_node_sees(node_paths(spec, GENERATOR))
    out.mkdir()
    (out / "plan.json").write_text("{}", encoding="utf-8")
    check_node_sees(node_paths(spec, GENERATOR))
    os.rename(prompts, tmp_path / "elsewhere.tsv")
    with pytest.raises(RuntimeError, match=f"^prompts.path {prompts}: this node .* does not see it; "):
        check_node_sees(node_paths(spec, GENERATOR))
    spec.prompts.path, spec.output.path = "s3://bucket/p.tsv", "s3://bucket/out"
    spec.model.path = str(tmp_path / "gone")
    with pytest.raises(RuntimeError, match=f"^model.path {tmp_path}/gone: this node"):
        check_node_sees(node_paths(spec, GENERATOR))
    spec.model.path = "org/model"
    check_node_sees(node_paths(spec, GENERATOR))
    ev = tmp_path / "eval.yaml"
    ev.write_text(f"kind: evaluate\nmetrics: [clip]\nreference: {{path: {tmp_path}/unused.npz}}\n"
                  f"generated: {{path: '{out}/shards/*.tar'}}\nclip: {{model: 'local-dir:{tmp_path}'}}\n"
                  f"output: {{path: {out}}}\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match=r"^generated.path .*/out/shards/\*.tar: this node .* does not see it"):
        check_node_sees(node_paths(load_spec(str(ev)), SCORER))
    (out / "shards").mkdir()
    (out / "shards" / "000000.tar").write_bytes(b"")
    check_node_sees(node_paths(load_spec(str(ev)), SCORER))


def test_job_yaml_keeps_no_secret_of_the_storage_options_or_urls(capsys, tmp_path, monkeypatch):
    """job.yaml records the resolved spec without its secrets: a storage option naming one is replaced whole
    (a header, Azure's connection string, a token in a list), and a URL keeps its user but not its password.
    Options that are not secrets stay, so the record still says where the data was."""
    import yaml

    from synthmill.jobs.outputs import write_job_yaml
    from synthmill.jobs.spec import load_spec
    from synthmill.sharding.layout import OutputLayout

    secrets = ["Bearer H3ADER", "AccountKey=C0NN", "T0KEN", "PASSW0RD", "S3CRET", "PHR4SE"]
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump({
        "kind": "generate", "model": {"path": "org/model"},
        "prompts": {"path": f"https://reader:{secrets[3]}@data.example.com/prompts.txt"},
        "output": {"path": str(tmp_path / "out")},
        "storage": {"endpoint_url": "http://minio.internal:9000", "secret": secrets[4],
                    "client_kwargs": {"headers": {"Authorization": secrets[0], "User-Agent": "synthmill-test"}},
                    "connection_string": secrets[1], "extra": [{"token": secrets[2]}], "passphrase": secrets[5],
                    "config_kwargs": {"signature_version": "s3v4"}},
    }), encoding="utf-8")
    spec = load_spec(str(spec_path))
    write_job_yaml(spec, OutputLayout(spec.output.path, spec.storage))
    text = (tmp_path / "out" / "job.yaml").read_text(encoding="utf-8")
    assert not [s for s in secrets if s in text], text
    written = yaml.safe_load(text)
    assert written["prompts"]["path"] == "https://reader:<redacted>@data.example.com/prompts.txt"
    assert written["storage"]["client_kwargs"]["headers"] == {"Authorization": "<redacted>",
                                                              "User-Agent": "synthmill-test"}
    assert written["storage"]["endpoint_url"] == "http://minio.internal:9000"
    assert written["storage"]["config_kwargs"] == {"signature_version": "s3v4"}
    # nor does an error line that names the URL (here: fsspec's HTTP client has no use for these options)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # on a cluster the hub id is left to the nodes' caches
    code, line = run_cli(capsys, "validate", str(spec_path))
    assert code == 2 and "prompts.path: open https://reader:<redacted>@data.example.com/prompts.txt: " in line, line
    assert not [s for s in secrets if s in line], line
    code, line = run_cli(capsys, "validate", str(spec_path), f"prompts.path=https://:{secrets[3]}@127.0.0.1:9/p.txt",
                         "storage={}")
    assert code == 2 and "https://:<redacted>@127.0.0.1:9/p.txt" in line and secrets[3] not in line, line
    # a presigned URL's signature, credential and session token, and an Azure SAS signature, go; the rest stays
    presigned = ("https://127.0.0.1:9/p.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDSECRET%2F20261201"
                 "&X-Amz-Expires=3600&X-Amz-Signature=SIGN4TURE&X-Amz-Security-Token=SESS10N&sv=2022&sig=SAS51G")
    code, line = run_cli(capsys, "validate", str(spec_path), f"prompts.path={presigned}", "storage={}")
    assert code == 2 and not [s for s in ("AKIDSECRET", "SIGN4TURE", "SESS10N", "SAS51G") if s in line], line
    assert ("https://127.0.0.1:9/p.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=<redacted>&X-Amz-Expires=3600"
            "&X-Amz-Signature=<redacted>&X-Amz-Security-Token=<redacted>&sv=2022&sig=<redacted>") in line, line


def test_a_missing_local_folder_spelt_like_a_hub_id_is_exit_2_without_the_hub(capsys, monkeypatch, write_spec, good,
                                                                                tmp_path):
    """``models/sd-typo`` beside a ``models/`` folder, with no hub to ask (HF_HUB_OFFLINE here; no network is
    the same) and not in this machine's hub cache, is a local folder that is not there: exit 2, not the same
    load error on every actor. A hub id whose first part is no folder here, or that the hub cache holds, is
    left to the load as before (on a cluster, whose nodes may hold it)."""
    from huggingface_hub import constants

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # validate connects nothing
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "models" / "sd").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    good["model"]["path"] = "models/sd-typo"
    expect_error(capsys, write_spec(good), "model.path models/sd-typo: folder not found (models/ is here, without "
                 "sd-typo); as a hub id it was not checked (HF_HUB_OFFLINE is set) and this machine's hub cache "
                 "does not hold it")
    good["model"]["path"] = "org/pipe"
    assert run_cli(capsys, "validate", write_spec(good))[0] == 0
    snapshot = tmp_path / "hub" / "models--models--sd-typo" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}", encoding="utf-8")
    (tmp_path / "hub" / "models--models--sd-typo" / "refs").mkdir()
    (tmp_path / "hub" / "models--models--sd-typo" / "refs" / "main").write_text("0123abcd", encoding="utf-8")
    good["model"]["path"] = "models/sd-typo"
    assert run_cli(capsys, "validate", write_spec(good))[0] == 0


def test_done_line_of_two_identical_sets_reads_fid_zero():
    """FID of a set against itself is 0; float64 gives it as a tiny negative or positive number, which the
    done line prints as 0.0000 (not -0.0000); metrics.json keeps the number as computed."""
    from synthmill.jobs.evaluate import done_line

    summary = {"metrics": {"fid": -3.2e-12}, "samples": {"generated": 22, "reference": 22}, "units_resumed": 0,
               "units_run": 10, "elapsed_s": 1.0}
    assert done_line(summary, "/o").startswith("done: FID 0.0000 (generated 22, reference 22 samples;")
    summary["metrics"]["fid"] = 12.345678
    assert done_line(summary, "/o").startswith("done: FID 12.3457 (")


def test_output_cut_short_by_its_reader_ends_quietly(good, write_spec, tmp_path):
    """``synthmill run JOB.yaml --dry-run | head -1``: the reader closes the pipe before synthmill writes;
    synthmill stops with 141 (as a process ended by SIGPIPE) and no traceback, at once or at exit."""
    import subprocess

    read, write = os.pipe()
    os.close(read)  # a reader that has gone already
    proc = subprocess.run([sys.executable, "-m", "synthmill.cli", "run", write_spec(good), "--dry-run"], stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    os.close(write)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, (
        proc.stderr[-3000:])


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch, good, write_spec):
    """Ctrl-C during a job (a KeyboardInterrupt out of the job's wait on Ray) says what is kept, not a traceback."""
    from synthmill import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_main", interrupted)
    assert cli.main(["run", write_spec(good)]) == 130
    assert capsys.readouterr().err == ("synthmill: interrupted; what was committed is kept, and the same command "
                                       "resumes from it\n")


def test_an_interpolation_anywhere_is_exit_2_and_resolves_nothing(capsys, write_spec, good, monkeypatch):
    """A spec runs no code and reads no environment: '${oc.env:...}' (which OmegaConf would resolve, copying a
    secret into job.yaml, every shard and the index) is exit 2 naming the field, in the file or in an override,
    before anything is written."""
    monkeypatch.setenv("SYNTHMILL_TEST_SECRET", "S3CRET-VALUE")
    out = good["output"]["path"]
    bad = dict(good, sampling={"negative_prompt": "${oc.env:SYNTHMILL_TEST_SECRET}"})
    line = expect_error(capsys, write_spec(bad), "field 'sampling.negative_prompt': holds an interpolation",
                        "envsubst", output=out)
    assert "S3CRET" not in line
    expect_error(capsys, write_spec(dict(good, model=dict(good["model"], path="${oc.env:HOME}/m"))),
                 "field 'model.path': holds an interpolation", output=out)
    expect_error(capsys, write_spec(good), "override 'output.path=${oc.env:HOME}/x': holds an interpolation",
                 overrides=("output.path=${oc.env:HOME}/x",), output=out)
    expect_error(capsys, write_spec(dict(good, prompts=dict(good["prompts"], column=["${x}"]))),
                 "field 'prompts.column.0': holds an interpolation", output=out)
