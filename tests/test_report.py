"""``synthmill report``: the page of a study, a generate, an evaluate and a distill output, opened from disk in
real headless Chromium (Debian's ``chromium``, driven by playwright): no console error, every image decoded,
the study's table in the page equal to its table.json, and a screenshot that is not blank."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import yaml

from synthmill.cli import main
from tests.conftest import base_spec

pytestmark = pytest.mark.usefixtures("ray_address")

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def chromium() -> str:
    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if not path:
        # CI installs it (.ci/run): there, a missing browser is a failure, never a quiet skip
        (pytest.fail if os.environ.get("CI") else pytest.skip)("no chromium (apt-get install chromium)")
    return path


def browse(chromium: str, page_file: Path, screenshot: Path) -> dict:
    """Open ``page_file`` from disk in headless Chromium; what the page shows, as plain data."""
    from playwright.sync_api import sync_playwright

    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url[:80]}"))
            page.goto(page_file.resolve().as_uri(), wait_until="load")
            seen = page.evaluate("""() => ({
                images: Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]),
                tables: Array.from(document.querySelectorAll('table')).map(t => ({
                    cls: t.className,
                    head: Array.from(t.querySelectorAll('thead th')).map(th => th.textContent),
                    rows: Array.from(t.querySelectorAll('tbody tr')).map(tr => Array.from(tr.children).map(td => ({
                        text: td.textContent, value: td.dataset.value, cls: td.className,
                        images: td.querySelectorAll('img').length,
                        captions: Array.from(td.querySelectorAll('figcaption')).map(f => f.textContent)})))})),
                headings: Array.from(document.querySelectorAll('h2, h3, h4')).map(h => h.textContent),
                sheets: Array.from(document.querySelectorAll('.sheet')).map(s => s.querySelectorAll('img').length),
                external: Array.from(document.querySelectorAll('[src]')).map(e => e.getAttribute('src'))
                          .filter(s => !s.startsWith('data:')),
            })""")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    seen["errors"] = errors
    return seen


def assert_sound(seen: dict, screenshot: Path) -> None:
    """No console error, nothing loaded from outside the file, every image decoded, a screenshot with content."""
    import numpy as np
    from PIL import Image

    assert seen["errors"] == []
    assert seen["external"] == []
    assert seen["images"] and all(done and width > 0 for _, done, width in seen["images"]), seen["images"]
    shot = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float64)
    assert shot.shape[0] >= 900 and shot.shape[1] >= 1280
    ink = shot < 200  # not white nor the light greys of table heads and borders
    assert ink.mean() > 0.02 and shot.std() > 20, (ink.mean(), shot.std())


def tables(seen: dict, css: str) -> list[dict]:
    return [t for t in seen["tables"] if t["cls"] == css]


def cells_as_dict(table: dict) -> dict:
    return {row[0]["text"]: json.loads(row[1]["value"]) for row in table["rows"]}


# ---- a study-shaped output from real generate and evaluate jobs ----

def _parameters(folder: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in Path(folder).rglob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            for name in fh.keys():
                total += math.prod(fh.get_slice(name).get_shape())
    return total


@pytest.fixture(scope="session")
def study(reference, evaluated, prompts_tsv, tmp_path_factory):
    """A study's output as the study job lays it out: models/a and scores/a (the reference job and its evaluation,
    copied), models/b (a second tiny pipeline, same prompts and seed, generated here), scores/b (evaluated here
    like a, and per category by the prompts' ``id`` column) and table.json per its contract."""
    from synthmill.jobs import evaluate, generate
    from synthmill.jobs.spec import load_spec
    from synthmill.testing.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("study")
    out = root / "out"
    (out / "models").mkdir(parents=True)
    (out / "scores").mkdir()
    spec_a, ref_out = reference
    shutil.copytree(ref_out, out / "models" / "a")
    shutil.copytree(evaluated[0]["output"]["path"], out / "scores" / "a")
    model_b = save_tiny_pipeline(root / "model_b", "sd", seed=7)
    spec_b = base_spec(model_b, prompts_tsv, str(out / "models" / "b"))

    def run(kind, spec: dict, name: str) -> dict:
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return kind.run(kind.prepare(load_spec(str(path))))

    assert run(generate, spec_b, "gen_b")["status"] == "complete"
    spec_eval = dict(evaluated[0], generated={"path": str(out / "models" / "b")},
                     output={"path": str(out / "scores" / "b")}, categories={"column": "id", "path": prompts_tsv},
                     cluster={**evaluated[0]["cluster"], "num_actors": 1})  # one scorer: fewer network loads
    assert run(evaluate, spec_eval, "eval_b")["status"] == "complete"
    models = {"a": spec_a["model"]["path"], "b": model_b}
    # a's: BK-SDM's SD v1.4 row (the tiny model does worse); b's FID: one it beats (its difference green)
    published = {"a": {"fid": 13.05, "is_mean": 36.76, "clip_score": 0.2958}, "b": {"fid": 1000.0}}
    metric_keys = ["fid", "is_mean", "clip_score"]
    rows = []
    for name, model in models.items():
        m = json.loads((out / "scores" / name / "metrics.json").read_text())["metrics"]
        measured = {"fid": m["fid"], "is_mean": m["inception_score"]["mean"], "clip_score": m["clip_score"]}
        summary = json.loads((out / "models" / name / "summary.json").read_text())
        row = {"model": name, "path": model}
        for k in metric_keys:
            pub = published[name].get(k)
            row.update({k: measured[k], f"{k}_published": pub,
                        f"{k}_difference": measured[k] - pub if pub is not None else None})
        row.update(images_per_s=summary["images_per_s"], unet_parameters=_parameters(os.path.join(model, "unet")),
                   pipeline_parameters=_parameters(model), samples=summary["samples"])
        rows.append(row)
    table = {"kind": "study", "metrics": metric_keys, "columns": list(rows[0]), "rows": rows,
             "seed": spec_b["sampling"]["seed"], "prompts": prompts_tsv}
    (out / "table.json").write_text(json.dumps(table, indent=1))
    (out / "plan.json").write_text(json.dumps({"kind": "study", "models": list(models)}))
    return str(out), table


# Run alone, this test's fixtures also make the session's reference job and its evaluation (in a full run, the
# evaluate tests made them already): on a busy 2-core machine that is more than the default 600 s.
@pytest.mark.timeout(1800)
def test_study_page_in_chromium(study, chromium, tmp_path):
    out, table = study
    page_file = tmp_path / "report.html"
    assert main(["report", out, "-o", str(page_file)]) == 0
    shot = tmp_path / "study.png"
    seen = browse(chromium, page_file, shot)
    assert_sound(seen, shot)

    # the table equals table.json: its columns in order, each cell's exact value and its text
    [page_table] = tables(seen, "study")
    assert page_table["head"] == table["columns"]
    assert len(page_table["rows"]) == len(table["rows"])
    for cells, row in zip(page_table["rows"], table["rows"], strict=True):
        for cell, column in zip(cells, table["columns"], strict=True):
            value = row[column]
            assert json.loads(cell["value"]) == value, column
            if isinstance(value, float):
                assert float(cell["text"]) == pytest.approx(value, rel=5e-6), column  # 6 significant digits
            else:
                assert cell["text"] == ("\u2014" if value is None else str(value)), column
            if column.endswith("_difference") and value is not None:
                lower_better = column == "fid_difference"
                assert cell["cls"] == ("better" if (value < 0) == lower_better else "worse"), column
            elif column.endswith("_difference"):
                assert cell["cls"] == "", column
    assert [c["cls"] for c in page_table["rows"][1] if c["cls"]] == ["better"]  # b's FID, below the 1000 published

    # the same-seed grid: a prompt per row, one image per model, and the same seed across the row
    [grid] = tables(seen, "grid")
    assert grid["head"] == ["prompt", "a", "b"]
    assert len(grid["rows"]) == 8  # GRID_ROWS of the 22 samples
    for row in grid["rows"]:
        assert [c["images"] for c in row[1:]] == [1, 1]
        assert row[1]["captions"] == row[2]["captions"] and row[1]["captions"][0].startswith("seed ")
        key = row[0]["text"][-10:]
        assert row[1]["captions"] == [f"seed {table['seed'] + int(key)}"]

    # a bar chart per metric, and per category (the prompts' id column) for the per-sample clip_score
    alts = [alt for alt, _, _ in seen["images"]]
    assert [a for a in alts if a.endswith(" per model")] == [f"{m} per model" for m in table["metrics"]]
    assert "clip_score by category" in alts


@pytest.mark.timeout(1200)  # its distillation starts Ray Train
def test_generate_evaluate_and_distill_pages_in_chromium(study, reference, distilled_small, chromium, tmp_path):
    """One page of three outputs: sections in the order given, each with what its kind shows."""
    import pyarrow.parquet as pq

    out, _ = study
    _, gen = reference
    page_file = tmp_path / "three.html"
    evaluated = os.path.join(out, "scores", "b")
    assert main(["report", gen, evaluated, distilled_small, "-o", str(page_file)]) == 0
    shot = tmp_path / "three.png"
    seen = browse(chromium, page_file, shot)
    assert_sound(seen, shot)
    assert [h for h in seen["headings"] if h.startswith(("generate:", "evaluate:", "distill:"))] == [
        f"generate: {gen}", f"evaluate: {evaluated}", f"distill: {distilled_small}"]

    # generate: the counts agree with the index, every sample on the contact sheet (22 < 64), both plots
    index = pq.read_table(os.path.join(gen, "index.parquet")).to_pylist()
    counts = cells_as_dict(tables(seen, "counts")[0])
    assert counts["samples"] == f"{len(index)} of {len(index)}"
    assert counts["blank prompts"] == sum(r["blank_prompt"] for r in index) == 2
    assert counts["truncated prompts"] == sum(r["truncated"] for r in index) == 2
    assert counts["flagged (nsfw)"] == sum(bool(r["nsfw"]) for r in index)
    assert seen["sheets"][0] == len(index)
    alts = [alt for alt, _, _ in seen["images"]]
    assert "images per second over time" in alts and "device idle per actor" in alts
    summary = json.loads(Path(gen, "summary.json").read_text())
    actors = tables(seen, "actors")[0]
    assert [json.loads(r[4]["value"]) for r in actors["rows"]] == [a["device_idle_fraction"]
                                                                    for a in summary["actors"]]

    # evaluate: every number of metrics.json, and the 4 best and 4 worst samples by clip_score with images
    metrics = json.loads(Path(evaluated, "metrics.json").read_text())
    shown = cells_as_dict(tables(seen, "metrics")[0])
    assert shown["fid"] == metrics["metrics"]["fid"]
    assert shown["inception_score_mean"] == metrics["metrics"]["inception_score"]["mean"]
    assert shown["clip_score"] == metrics["metrics"]["clip_score"]
    protocol = {r[0]["text"]: r[1]["text"] for r in tables(seen, "protocol")[0]["rows"]}
    assert protocol["fid"] == metrics["protocol"]["fid"]
    assert seen["headings"].count("clip_score: highest") == 1
    scores = sorted(pq.read_table(os.path.join(evaluated, "scores.parquet")).column("clip_score").to_pylist())
    extremes = [a for a in alts if a.startswith("clip_score ")]
    assert extremes == [f"clip_score {v:.6g}" for v in scores[::-1][:4] + scores[:4]]
    assert len(tables(seen, "categories")[0]["rows"]) == 11  # the prompts' 11 ids (scores/b has categories)

    # distill: a curve per loss term (and nothing else on that plot), the learning rate and samples/s
    first = json.loads(Path(distilled_small, "metrics.jsonl").read_text().splitlines()[0])
    assert [k for k in first if k.startswith("loss")] == ["loss", "loss_feature_kd", "loss_output_kd", "loss_task"]
    assert {"loss terms: loss, loss_feature_kd, loss_output_kd, loss_task", "learning rate", "samples/s"} <= set(alts)


@pytest.fixture(scope="session")
def distilled_small(reference, tmp_path_factory) -> str:
    """A 2-step distillation of a tiny teacher on the reference job's shards (one worker)."""
    from synthmill.jobs import distill
    from synthmill.jobs.spec import load_spec
    from synthmill.testing.tiny import save_tiny_pipeline

    folder = tmp_path_factory.mktemp("distill_report")
    teacher = save_tiny_pipeline(folder / "teacher", "sd", seed=3, unet_layout="full")
    spec = {"kind": "distill", "teacher": {"path": teacher}, "student": {"arch": "bk-small"},
            "data": {"path": reference[1], "resolution": 32, "loader_workers": 1, "shuffle_buffer": 8},
            "loss": {"task": 1.0, "output_kd": 1.0, "feature_kd": 1.0},
            "train": {"max_steps": 2, "batch_size": 2, "gradient_accumulation": 1, "learning_rate": 1.0e-3,
                      "checkpoint_every": 2, "log_every": 1},
            "cluster": {"num_workers": 1}, "output": {"path": str(folder / "out")}}
    path = folder / "distill.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert distill.run(distill.prepare(load_spec(str(path))))["status"] == "complete"
    return spec["output"]["path"]


def test_thumbnails_are_a_fixed_seeded_sample(reference):
    """A big output's contact sheet shows at most its limit of images, the same ones every time."""
    from synthmill.jobs.report_generate import contact_sheet
    from synthmill.sharding.layout import OutputLayout

    layout = OutputLayout(reference[1])
    first, again = contact_sheet(layout, limit=5), contact_sheet(layout, limit=5)
    assert first == again and first.count("<img") == 5 and "5 of 22 samples" in first


def test_a_path_that_is_not_an_output_is_exit_2(reference, tmp_path, capsys):
    _, gen = reference
    (tmp_path / "plain").mkdir()
    page_file = tmp_path / "r.html"
    assert main(["report", gen, str(tmp_path / "plain"), "-o", str(page_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"synthmill: error: {tmp_path / 'plain'}: not a synthmill output (it has no plan.json)"
    assert not page_file.exists()
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "plan.json").write_text(json.dumps({"kind": "painting"}))
    assert main(["report", str(tmp_path / "odd"), "-o", str(page_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"synthmill: error: {tmp_path / 'odd'}: a synthmill output of kind 'painting'")
    assert "\n" not in err and not page_file.exists()
