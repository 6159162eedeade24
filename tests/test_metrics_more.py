"""KID, precision/recall and CMMD against their references, on identical images and identical weights files.

KID and precision/recall are checked against ``torch_fidelity.calculate_metrics`` with the same (random)
Inception weights file, asked for its Inception network for both metrics (its default for prc alone is
VGG-16); CMMD against the published formula computed directly in float64 numpy on embeddings that
open_clip gives for the same images from the same (tiny, random) CLIP folder. One evaluation (2 actors) of
the session's generate job against the folder of altered copies feeds most checks; a second one (1 actor,
the first one's reference_stats.npz as its reference) must give the same numbers bit for bit.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from synthmill.cli import main
from tests.conftest import eval_spec, run_eval

pytestmark = pytest.mark.slow

KID = {"subsets": 20, "subset_size": 10}


def _spec(generated: str, output: str, inception_file: str, clip_model: str, reference: str, **extra) -> dict:
    spec = eval_spec(generated, output, inception_file, clip_model, reference,
                     metrics=["kid", "precision_recall", "cmmd", "is"], kid=dict(KID),
                     cmmd={"model": clip_model, "pretrained": None}, **extra)
    spec["inception_score"] = {"splits": 2}
    return spec


@pytest.fixture(scope="module")
def real(image_folders, tmp_path_factory) -> str:
    """A reference that overlaps the generated set: its first 11 images as they are, the other 11 altered (so that
    precision and recall are neither 0 nor 1)."""
    import shutil

    folder = tmp_path_factory.mktemp("overlap")
    for k, png in enumerate(sorted(glob.glob(os.path.join(image_folders[0], "*.png")))):
        shutil.copy(png if k < 11 else os.path.join(image_folders[1], os.path.basename(png)), folder)
    return str(folder)


@pytest.fixture(scope="module")
def more(reference, real, inception_file, clip_model, tmp_path_factory):
    """kid, precision_recall, cmmd and is of the generate job's 5 shards (2 actors) against ``real``."""
    import yaml

    from synthmill.jobs import evaluate
    from synthmill.jobs.spec import load_spec

    folder = tmp_path_factory.mktemp("more")
    spec = _spec(reference[1], str(folder / "out"), inception_file, clip_model, real)
    spec["reference"]["samples_per_unit"] = 8
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return spec, evaluate.run(evaluate.prepare(load_spec(str(path))))


def test_kid_and_precision_recall_equal_torch_fidelity(more, image_folders, real, inception_file):
    import torch_fidelity

    _, result = more
    theirs = torch_fidelity.calculate_metrics(
        input1=image_folders[0], input2=real, kid=True, prc=True, isc=True, isc_splits=2,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=inception_file,
        kid_subsets=KID["subsets"], kid_subset_size=KID["subset_size"], cuda=False, cache=False, verbose=False,
        samples_find_ext="png")
    m = result["metrics"]
    assert abs(m["kid"]) > 1e-3, "a KID of 0 would not test anything"
    kid_mean, kid_std = theirs["kernel_inception_distance_mean"], theirs["kernel_inception_distance_std"]
    assert abs(m["kid"] - kid_mean) <= 1e-3 * abs(kid_mean), (m["kid"], kid_mean)
    assert abs(m["kid_std"] - kid_std) <= 1e-2 * kid_std, (m["kid_std"], kid_std)
    assert (m["precision"], m["recall"], m["f_score"]) == (theirs["precision"], theirs["recall"], theirs["f_score"])
    assert 0 < m["precision"] < 1 and 0 < m["recall"] < 1, m  # counts that are not all-or-nothing
    # one forward pass gives IS's logits and these features: IS is still torch-fidelity's
    assert abs(m["inception_score"]["mean"] - theirs["inception_score_mean"]) <= 1e-3 * theirs["inception_score_mean"]


def _open_clip_embeddings(clip_model: str, folder: str) -> np.ndarray:
    import open_clip
    import torch
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(clip_model)
    out = []
    for png in sorted(glob.glob(os.path.join(folder, "*.png"))):
        with torch.no_grad():
            out.append(model.encode_image(preprocess(Image.open(png).convert("RGB"))[None])[0].numpy())
    return np.array(out, np.float64)


def _published_cmmd(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The formula of google-research/cmmd's distance.mmd on unit-normalised embeddings, whole matrices at once, and
    the paper's unbiased form (no diagonal in the within-set means)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)

    def k(a, b):
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return np.exp(-d2 / (2 * 10.0 ** 2))

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    biased = 1000 * (kxx.mean() + kyy.mean() - 2 * kxy.mean())
    unbiased = 1000 * ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                       - 2 * kxy.mean())
    return biased, unbiased


def test_cmmd_equals_the_published_formula(more, image_folders, real, clip_model):
    from synthmill.metrics.weights import sha256_file

    spec, result = more
    # the job's embeddings (the generated set's partials in unit order; the reference's as its stats file keeps
    # them) are open_clip's for the same images, to float32 rounding (open_clip here runs one image at a time)
    out = spec["output"]["path"]
    x = np.concatenate([np.load(p)["cmmd_embedding"] for p in sorted(glob.glob(
        os.path.join(out, "partials", "generated", "*.npz")))]).astype(np.float64)
    with np.load(os.path.join(out, "reference_stats.npz")) as z:
        y = z["cmmd_embedding"].astype(np.float64)
    for ours, folder in ((x, image_folders[0]), (y, real)):
        direct = _open_clip_embeddings(clip_model, folder)
        assert ours.shape == direct.shape == (22, 32)
        assert np.abs(ours - direct).max() <= 1e-5 * np.abs(direct).max()
    biased, unbiased = _published_cmmd(x, y)
    m = result["metrics"]
    assert biased > 1e-3, "a CMMD of 0 would not test anything"
    assert abs(m["cmmd"] - biased) <= 1e-9 * biased, (m["cmmd"], biased)
    assert abs(m["cmmd_unbiased"] - unbiased) <= 1e-9 * abs(unbiased), (m["cmmd_unbiased"], unbiased)
    weights = os.path.join(clip_model[len("local-dir:"):], "open_clip_model.safetensors")
    assert m["cmmd_network"] == {"model": clip_model, "pretrained": None, "weights_sha256": sha256_file(weights)}


def test_cmmd_blocks_add_up_to_the_whole():
    """The blockwise float64 sums equal one pass over whole matrices, whatever the block size."""
    from synthmill.metrics.cmmd import cmmd

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(37, 16)), rng.normal(0.2, 1, size=(29, 16))
    whole = _published_cmmd(x, y)
    for block in (1, 5, 29, 4096):
        got = cmmd(x, y, block)
        assert abs(got["cmmd"] - whole[0]) <= 1e-11 * abs(whole[0]), block
        assert abs(got["cmmd_unbiased"] - whole[1]) <= 1e-11 * abs(whole[1]), block


def test_metrics_json_says_how_each_was_computed(more, inception_file):
    spec, result = more
    on_disk = json.load(open(os.path.join(spec["output"]["path"], "metrics.json")))
    p = on_disk["protocol"]
    assert "torch-fidelity" in p["kid"]["network"] and p["kid"]["subset_size"] == 10 and p["kid"]["degree"] == 3
    assert "kid_features_to_metric" in p["kid"]["kid"] and "RandomState(2020)" in p["kid"]["kid"]
    assert p["precision_recall"]["neighborhood"] == 3 and "prc_features_to_metric" in p["precision_recall"][
        "precision_recall"]
    assert p["cmmd"]["sigma"] == 10 and p["cmmd"]["scale"] == 1000 and "diagonal included" in p["cmmd"]["cmmd"]
    assert {"torch-fidelity", "open_clip_torch"} <= set(on_disk["versions"])
    from synthmill.metrics.weights import sha256_file

    assert on_disk["weights"]["sha256"] == sha256_file(inception_file)
    with np.load(os.path.join(spec["output"]["path"], "reference_stats.npz")) as z:
        assert z["fidelity_pool"].shape == (22, 2048) and z["cmmd_embedding"].shape == (22, 32)
        assert str(z["cmmd_model"]) == spec["cmmd"]["model"] and str(z["weights_sha256"]) == sha256_file(inception_file)
    assert on_disk["metrics"]["kid_reference"]["stats_written"].endswith("reference_stats.npz")


def test_one_actor_and_a_stats_reference_give_the_same_numbers(more, reference, inception_file, clip_model, write_spec,
                                                                tmp_path):
    """One actor instead of two, and the first job's reference_stats.npz instead of the images: bit for bit."""
    spec, result = more
    stats = os.path.join(spec["output"]["path"], "reference_stats.npz")
    again = _spec(reference[1], str(tmp_path / "out"), inception_file, clip_model, stats,
                  cluster={"num_actors": 1, "batch_size": 4})
    again["metrics"] = ["kid", "precision_recall", "cmmd"]
    second = run_eval(write_spec, again)["metrics"]
    first = result["metrics"]
    for key in ("kid", "kid_std", "precision", "recall", "f_score", "cmmd", "cmmd_unbiased"):
        assert second[key] == first[key], key
    assert second["cmmd_reference"] == {"kind": "stats", "path": stats, "samples": 22}


def _restated(stats: str, tmp, **changes) -> str:
    with np.load(stats) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update({k: np.array(v) for k, v in changes.items()})
    path = str(tmp / "changed.npz")
    np.savez(path, **arrays)
    return path


BAD = {
    "kid subset larger than the set": (
        lambda stats, tmp: {"kid": {"subset_size": 23}}, "generated.path: kid needs at least 23 samples"),
    "kid subset larger than the stats file": (
        lambda stats, tmp: {"kid": {"subset_size": 23}, "reference": {"path": stats}, "generated": {"path": None}},
        "kid needs at least 23 samples (one subset of kid.subset_size=23), the file has 22"),
    "stats file without the features": (
        lambda stats, tmp: {"reference": {"path": _restated(stats, tmp, fidelity_pool=np.zeros(3))}},
        "'fidelity_pool' is float64 of shape (3,)"),
    "stats file of another CLIP": (
        lambda stats, tmp: {"reference": {"path": _restated(stats, tmp, cmmd_model="ViT-B-32")}},
        "made with cmmd_model='ViT-B-32'"),
    "cmmd model unknown": (lambda stats, tmp: {"cmmd": {"model": "ViT-Q-99"}}, "cmmd.model 'ViT-Q-99'"),
    "neighborhood 0": (lambda stats, tmp: {"precision_recall": {"neighborhood": 0}}, "precision_recall.neighborhood"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, more, reference, real, inception_file, clip_model, write_spec, tmp_path, capsys):
    change, needle = BAD[case]
    spec_more, _ = more
    stats = os.path.join(spec_more["output"]["path"], "reference_stats.npz")
    out = str(tmp_path / "out")
    spec = _spec(reference[1], out, inception_file, clip_model, real)
    spec["metrics"] = ["kid", "precision_recall", "cmmd"]
    for section, value in change(stats, tmp_path).items():
        if section == "generated" and value["path"] is None:  # a set of 23 images: only the stats file is too small
            from tests.conftest import write_image_folder

            value = {"path": write_image_folder(tmp_path / "gen23", 23)}
        spec[section] = dict(spec.get(section) or {}, **value)
    assert main(["run", write_spec(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([ln for ln in err if ln.startswith("synthmill: error:")]) == 1, err
    assert needle in err[-1], err[-1]
    assert not os.path.exists(out)
