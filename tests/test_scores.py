"""Per-sample scores (``scores.parquet``) and per-category tables of evaluate jobs.

The synthmill set is the session's evaluation of the reference generate job (22 samples in 5 shards); the
categories come from real PartiPrompts rows generated with the tiny pipeline.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from synthmill.cli import main
from tests.conftest import PARTI, base_spec, eval_spec, run_eval, run_job

pytestmark = pytest.mark.slow


def _direct_cosines(clip_model: str, folder: str) -> dict[str, float]:
    """Each image's CLIP cosine with its caption, open_clip called directly, one image at a time, by key."""
    import open_clip
    import torch
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(clip_model)
    tokenizer = open_clip.get_tokenizer(clip_model)
    out = {}
    for png in sorted(glob.glob(os.path.join(folder, "*.png"))):
        caption = open(png[:-4] + ".txt", encoding="utf-8").read()
        with torch.no_grad():
            a = model.encode_image(preprocess(Image.open(png).convert("RGB"))[None])
            b = model.encode_text(tokenizer([caption]))
        out[os.path.basename(png)[:-4]] = torch.nn.functional.cosine_similarity(a, b).item()
    return out


def test_scores_parquet_lists_every_sample_and_resumes_to_the_same_bytes(evaluated, reference, image_folders,
                                                                         clip_model, write_spec, tmp_path, capsys):
    spec, result = evaluated
    copy = tmp_path / "eval"  # other modules rerun the session's evaluation in place
    shutil.copytree(spec["output"]["path"], copy)
    scores = pq.read_table(copy / "scores.parquet")
    index = pq.read_table(os.path.join(reference[1], "index.parquet"))

    # one row per sample, in the index's order, with the index's shard, prompt_index and safety flag
    assert scores.column_names == ["key", "shard", "prompt_index", "clip_score", "nsfw"]
    assert scores.num_rows == index.num_rows == 22
    for column in ("key", "shard", "prompt_index", "nsfw"):
        assert scores[column].to_pylist() == index[column].to_pylist(), column
    # the numbers CLIP score averages: the same float64 values, in the same order, give the same mean exactly
    cos = scores["clip_score"].to_numpy()
    assert result["metrics"]["clip_score"] == float(np.mean(cos))
    direct = _direct_cosines(clip_model, image_folders[0])
    assert np.abs(cos - np.array([direct[k] for k in scores["key"].to_pylist()])).max() <= 1e-6
    on_disk = json.loads((copy / "metrics.json").read_text())
    assert on_disk["scores"] == {"file": "scores.parquet", "rows": 22, "columns": scores.column_names}
    for pkg in ("pyarrow", "webdataset", "open_clip_torch", "torch-fidelity", "pytorch-fid"):
        assert on_disk["versions"][pkg] != "not installed", pkg

    # a resumed evaluation: one unit's marker gone, that unit scored again, the same file to the byte
    before = (copy / "scores.parquet").read_bytes()
    os.remove(copy / "partials" / "generated" / "000002.json")
    again = run_eval(write_spec, {**spec, "output": {"path": str(copy)}})
    assert again["units_run"] == 1 and again["units_resumed"] == 4 + 3
    assert (copy / "scores.parquet").read_bytes() == before

    # a folder of the same images: keys are the files' names, no shard, prompt_index or safety flag known;
    # categories need a prompt_index, so asking for them is bad input
    folder = eval_spec(image_folders[0], str(tmp_path / "folder"), "", clip_model, metrics=["clip"])
    bad = {**folder, "categories": {"column": "Category", "path": str(PARTI)}}
    capsys.readouterr()
    assert main(["run", write_spec(bad)]) == 2
    line = capsys.readouterr().err.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("synthmill: error: categories.column: "), line
    assert "prompt_index" in line[0], line
    assert not os.path.exists(tmp_path / "folder")
    run_eval(write_spec, folder)
    mine = pq.read_table(tmp_path / "folder" / "scores.parquet")
    assert mine.column_names == ["key", "shard", "prompt_index", "clip_score"]
    assert mine["key"].to_pylist() == sorted(direct) == scores["key"].to_pylist()
    assert mine["shard"].null_count == mine["prompt_index"].null_count == 22
    assert np.abs(mine["clip_score"].to_numpy() - cos).max() <= 1e-6


def _parti_rows(per_category: int = 2, categories: int = 3) -> list[dict[str, str]]:
    """The first ``per_category`` PartiPrompts rows of each of its first ``categories`` categories."""
    with open(PARTI, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    picked: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        if len(picked.get(row["Category"], [])) < per_category and (row["Category"] in picked
                                                                    or len(picked) < categories):
            picked.setdefault(row["Category"], []).append(row)
    return [r for group in picked.values() for r in group]


def _means(scores, prompt_category: list[str]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[float]] = {}
    for p, v in zip(scores["prompt_index"].to_pylist(), scores["clip_score"].to_pylist(), strict=True):
        groups.setdefault(prompt_category[p], []).append(v)
    return {c: {"count": len(v), "clip_score": float(np.mean(v))} for c, v in sorted(groups.items())}


def test_per_category_table_on_partiprompts(ray_address, tiny_sd, clip_model, write_spec, tmp_path, capsys):
    rows = _parti_rows()
    prompts = tmp_path / "parti.tsv"
    with open(prompts, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, ["Prompt", "Category", "Challenge", "Note"], delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    gen = base_spec(tiny_sd, str(prompts), str(tmp_path / "gen"))
    gen["prompts"]["column"] = "Prompt"
    gen["cluster"]["num_actors"] = 1
    assert run_job(write_spec, gen)["status"] == "complete"  # 6 prompts, 2 images each, 3 shards

    spec = eval_spec(str(tmp_path / "gen"), str(tmp_path / "eval"), "", clip_model, metrics=["clip"],
                     categories={"column": "Category"})  # the generate job's own prompts file
    spec["cluster"]["num_actors"] = 1
    result = run_eval(write_spec, spec)
    scores = pq.read_table(tmp_path / "eval" / "scores.parquet")
    assert result["categories"]["column"] == "Category" and result["categories"]["path"] == str(prompts)
    table = result["categories"]["by_category"]
    assert list(table) == sorted({r["Category"] for r in rows}) and len(table) == 3
    assert table == _means(scores, [r["Category"] for r in rows])
    assert all(v["count"] == 4 for v in table.values()) and result["categories"]["samples_without_category"] == 0
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk["categories"] == json.loads(json.dumps(result["categories"]))

    # the same evaluation by another column of a named file: merged again from its partials, nothing scored
    spec["categories"] = {"column": "Challenge", "path": str(prompts)}
    again = run_eval(write_spec, spec)
    assert again["units_run"] == 0
    assert again["categories"]["by_category"] == _means(scores, [r["Challenge"] for r in rows])

    # both columns in one job: a table for each, and each a column of scores.parquet (for filter's conditions)
    spec["categories"] = {"columns": ["Category", "Challenge"]}
    both = run_eval(write_spec, spec)
    assert both["units_run"] == 0 and both["categories"]["columns"] == ["Category", "Challenge"]
    for column in ("Category", "Challenge"):
        assert both["categories"]["by_column"][column] == {
            "by_category": _means(scores, [r[column] for r in rows]), "samples_without_category": 0}
    joined = pq.read_table(tmp_path / "eval" / "scores.parquet").to_pydict()
    assert joined["clip_score"] == scores.column("clip_score").to_pylist()
    for column in ("Category", "Challenge"):
        assert joined[column] == [rows[p][column] for p in joined["prompt_index"]]
    spec["categories"] = {"column": "Category", "columns": ["Challenge"]}
    capsys.readouterr()
    assert main(["validate", write_spec(spec)]) == 2
    line = capsys.readouterr().err.strip().splitlines()
    assert line == ["synthmill: error: field 'categories.columns': give column or columns, not both"], line

    # a column the file does not have: exit 2, one line naming the field, nothing written
    spec["categories"] = {"column": "category"}
    spec["output"] = {"path": str(tmp_path / "bad")}
    capsys.readouterr()
    assert main(["run", write_spec(spec)]) == 2
    line = capsys.readouterr().err.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("synthmill: error: categories.column 'category' not found in "), line
    assert "Category" in line[0] and not os.path.exists(tmp_path / "bad")


def test_evaluate_all_benchmark_smoke(background_smokes) -> None:
    """``python -m benchmarks evaluate-all --smoke`` (in the background, tests/conftest.py, on a local Ray of its
    own): torch-fidelity's IS and a direct open_clip loop one after another, then one ``synthmill run`` computing
    both; both figures, the ratio, and each number agreeing with its library's."""
    code, stdout, stderr = background_smokes.result("test_evaluate_all_benchmark_smoke")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert re.search(r"^\| \(a\) is: torch-fidelity \| \d+\.\d+ \| \d+\.\d+ \|$", stdout, re.M), stdout
    assert re.search(r"^\| \(b\) synthmill run, is, clip in one pass .* \| \d+\.\d+ \| \d+\.\d+ \|$", stdout,
                     re.M), stdout
    for key in ("inception_score.mean", "inception_score.std", "clip_score"):
        assert re.search(rf"^{re.escape(key)}: synthmill \S+, library \S+, relative difference \S+ "
                         r"\(tolerance \S+: agree\)$", stdout, re.M), stdout
    assert re.search(r"^ratio \(b\)/\(a\) images/s = \d+\.\d+; numbers agree: yes$", stdout, re.M), stdout
