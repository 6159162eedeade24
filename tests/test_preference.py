"""Human-preference metrics (hpsv2, pickscore) against their releases' own scoring, on identical images and weights.

Neither release can run here: the ``hpsv2`` package pins pytest 7.2 and protobuf < 4 (it does not install beside
this stack) and downloads LAION's CLIP at its first call; PickScore has no package, its release is a README
snippet calling transformers. So each reference below is the release's scoring written out in the test, from its
definition, on tiny seeded networks saved in the releases' checkpoint formats (synthmill.testing.preference_weights)
and loaded by the job through ``hpsv2.weights`` / ``pickscore.model``, as users load the real ones:

- HPSv2 (``hpsv2/img_score.py`` and its ``open_clip``'s ``image_transform(resize_longest_max=True)``): an open_clip
  CLIP loaded with ``torch.load(cp)["state_dict"]``; ToTensor, the longest side resized to the input size
  (bicubic on the tensor) and zero-padded around the centre, OpenAI mean/std; ``tokenize``; one image at a time,
  ``diag(image_features @ text_features.T)`` of the model's normalised features.
- PickScore (its README): ``AutoProcessor`` / ``AutoModel``, one prompt at a time,
  ``logit_scale.exp() * (text_embs @ image_embs.T)[0]`` of the normalised features.

The generated set is the session's generated images resized to five different shapes (so the HPS resize and pad
and the CLIP processor's resize and crop all act), with their captions, one over 77 tokens.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

import numpy as np
import pytest

from synthmill.cli import main
from tests.conftest import run_eval, write_image_folder

pytestmark = pytest.mark.slow

SIZES = [(32, 32), (50, 30), (24, 56), (64, 64), (40, 40)]


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict[str, str]:
    from synthmill.testing.preference_weights import save_tiny_hps, save_tiny_pickscore

    root = tmp_path_factory.mktemp("preference")
    arch, weights = save_tiny_hps(str(root / "hps"), seed=1)
    return {"hps_arch": arch, "hps_weights": weights, "pick": save_tiny_pickscore(str(root / "pick"), seed=2)}


@pytest.fixture(scope="module")
def shapes_folder(image_folders, tmp_path_factory) -> str:
    """The generated images at five shapes, each with its caption."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("shapes")
    for k, png in enumerate(sorted(glob.glob(os.path.join(image_folders[0], "*.png")))):
        name = os.path.basename(png)[:-4]
        Image.open(png).convert("RGB").resize(SIZES[k % len(SIZES)]).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_bytes(open(png[:-4] + ".txt", "rb").read())
    return str(folder)


def pref_spec(generated: str, output: str, nets: dict[str, str], **sections) -> dict:
    spec = {
        "kind": "evaluate",
        "generated": {"path": generated, "samples_per_unit": 8},
        "metrics": ["hpsv2", "pickscore"],
        "hpsv2": {"weights": nets["hps_weights"], "architecture": nets["hps_arch"]},
        "pickscore": {"model": nets["pick"]},
        "output": {"path": output},
        "cluster": {"num_actors": 2, "batch_size": 4},
    }
    for key, value in sections.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
    return spec


@pytest.fixture(scope="module")
def preferred(ray_cluster, shapes_folder, nets, tmp_path_factory):
    """One evaluate job of both metrics (3 units over 2 actors): its spec, metrics.json, per-image scores."""
    import yaml

    from synthmill.jobs import evaluate
    from synthmill.jobs.spec import load_spec

    folder = tmp_path_factory.mktemp("pref_eval")
    spec = pref_spec(shapes_folder, str(folder / "out"), nets)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = evaluate.run(evaluate.prepare(load_spec(str(path))))
    parts = sorted(glob.glob(str(folder / "out" / "partials" / "generated" / "*.npz")))
    scores = {}
    for name in ("hpsv2", "pickscore"):
        arrays = []
        for p in parts:
            with np.load(p) as z:
                arrays.append(z[name])
        scores[name] = np.concatenate(arrays)
    return spec, result, scores


def _samples(folder: str) -> list[tuple[str, str]]:
    """(image file, caption) in the set's order."""
    return [(png, open(png[:-4] + ".txt", encoding="utf-8").read())
            for png in sorted(glob.glob(os.path.join(folder, "*.png")))]


def test_hpsv2_equals_the_release_forward_pass(preferred, shapes_folder, nets):
    import open_clip
    import torch
    import torchvision.transforms.functional as F
    from open_clip.model import CLIP
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    with open(nets["hps_arch"], encoding="utf-8") as fh:
        cfg = json.load(fh)["model_cfg"]
    model = CLIP(**cfg)
    model.load_state_dict(torch.load(nets["hps_weights"], map_location="cpu")["state_dict"])
    model.eval()
    size = cfg["vision_cfg"]["image_size"]

    def preprocess_val(image):  # hpsv2's image_transform(is_train=False, resize_longest_max=True)
        x = F.to_tensor(image)
        height, width = x.shape[1:]
        scale = size / float(max(height, width))
        if scale != 1.0:
            new_size = tuple(round(dim * scale) for dim in (height, width))
            x = F.resize(x, new_size, InterpolationMode.BICUBIC)
            pad_h, pad_w = size - new_size[0], size - new_size[1]
            x = F.pad(x, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        return F.normalize(x, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

    theirs = []
    for png, caption in _samples(shapes_folder):
        with torch.no_grad():
            image_features, text_features, _ = model(preprocess_val(Image.open(png)).unsqueeze(0),
                                                     open_clip.tokenize([caption]))
            theirs.append(torch.diagonal(image_features @ text_features.T).item())
    _, result, scores = preferred
    ours = scores["hpsv2"]
    assert len(ours) == len(theirs) == 22
    assert np.std(theirs) > 1e-2, "scores this alike would not test the order of images"
    assert np.abs(ours - np.array(theirs)).max() <= 1e-4, (ours, theirs)
    assert abs(result["metrics"]["hpsv2"] - np.mean(theirs)) <= 1e-4
    assert result["metrics"]["hpsv2_std"] == pytest.approx(np.std(ours), abs=1e-12)


def test_pickscore_equals_the_release_scoring_call(preferred, shapes_folder, nets):
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(nets["pick"])
    model = AutoModel.from_pretrained(nets["pick"]).eval()

    def features(out):  # transformers 5 returns an output object where 4.x returned the projected tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    theirs = []
    for png, prompt in _samples(shapes_folder):
        image_inputs = processor(images=[Image.open(png)], padding=True, truncation=True, max_length=77,
                                 return_tensors="pt")
        text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            image_embs = features(model.get_image_features(**image_inputs))
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = features(model.get_text_features(**text_inputs))
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            theirs.append((model.logit_scale.exp() * (text_embs @ image_embs.T)[0]).item())
    _, result, scores = preferred
    ours = scores["pickscore"]
    assert len(ours) == 22
    assert np.std(theirs) > 1e-1, "scores this alike would not test the order of images"
    assert np.abs(ours - np.array(theirs)).max() <= 1e-4 * max(1.0, np.abs(theirs).max()), (ours, theirs)
    assert abs(result["metrics"]["pickscore"] - np.mean(theirs)) <= 1e-4 * max(1.0, abs(np.mean(theirs)))


def test_metrics_json_names_networks_weights_and_protocol(preferred, nets):
    spec, result, _ = preferred
    m, protocol = result["metrics"], result["protocol"]
    with open(nets["hps_weights"], "rb") as fh:
        hps_sha = hashlib.sha256(fh.read()).hexdigest()
    with open(os.path.join(nets["pick"], "model.safetensors"), "rb") as fh:
        pick_sha = hashlib.sha256(fh.read()).hexdigest()
    assert m["hpsv2_network"] == {"weights": nets["hps_weights"], "sha256": hps_sha, "architecture": nets["hps_arch"],
                                  "version": None}
    assert m["pickscore_network"] == {"weights": nets["pick"], "sha256": pick_sha, "revision": None,
                                      "processor": nets["pick"]}
    assert "zero-padded" in protocol["hpsv2"]["score"] and "logit_scale" in protocol["pickscore"]["score"]
    assert protocol["clip"] is None and result["samples"] == {"generated": 22}
    assert result["versions"]["transformers"] != "not installed"
    assert result["units"] == {"generated": 3} and result["weights"] is None  # no Inception network ran


def _refused(write_spec, capsys, spec: dict, needle: str) -> str:
    path = write_spec(spec)
    assert main(["validate", path]) == 2, needle
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith((f"synthmill: error: {needle}", f"synthmill: error: field '{needle}'")), err
    assert not os.path.exists(spec["output"]["path"])
    return err[-1]


def test_bad_input_is_refused_naming_the_field(nets, write_spec, tmp_path, capsys):
    """Exit 2 from validate, one line naming the field, nothing written (no Ray: validate loads no network)."""
    import torch

    from synthmill.testing.preference_weights import TINY_HPS

    out = str(tmp_path / "out")
    shapes_folder = write_image_folder(tmp_path / "images", 2)
    # a checkpoint of another network: the same keys with other shapes, and a state dict of other keys
    other = tmp_path / "other"
    other.mkdir()
    (other / "cfg.json").write_text(json.dumps({**TINY_HPS, "embed_dim": 16}))
    from synthmill.metrics.hps import build

    torch.save({"state_dict": build(json.loads((other / "cfg.json").read_text())).state_dict()}, other / "w.pt")
    line = _refused(write_spec, capsys, pref_spec(shapes_folder, out, nets, hpsv2={"weights": str(other / "w.pt")}),
                    "hpsv2.weights")
    assert "not the weights of the HPSv2 network" in line and "shape" in line
    torch.save({"state_dict": {"conv.weight": torch.zeros(2)}}, other / "x.pt")
    line = _refused(write_spec, capsys, pref_spec(shapes_folder, out, nets, hpsv2={"weights": str(other / "x.pt")}),
                    "hpsv2.weights")
    assert "keys missing" in line
    line = _refused(write_spec, capsys, pref_spec(shapes_folder, out, nets, hpsv2={"weights_sha256": "0" * 64}),
                    "hpsv2.weights")
    assert "sha256" in line
    _refused(write_spec, capsys, pref_spec(shapes_folder, out, nets, hpsv2={"architecture": "ViT-Q-99"}),
             "hpsv2.architecture")
    _refused(write_spec, capsys, pref_spec(shapes_folder, out, nets, hpsv2={"version": "v3"}), "hpsv2.version")
    # PickScore: a folder that is no transformers model, and one of another model type
    line = _refused(write_spec, capsys, pref_spec(shapes_folder, out, nets, pickscore={"model": str(other)}),
                    "pickscore.model")
    assert "config.json" in line
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    line = _refused(write_spec, capsys, pref_spec(shapes_folder, out, nets, pickscore={"model": str(other)}),
                    "pickscore.model")
    assert "not the PickScore network" in line
    # images without captions
    bare = write_image_folder(tmp_path / "bare", 2, captions=False)
    for metric in ("hpsv2", "pickscore"):
        line = _refused(write_spec, capsys, pref_spec(bare, out, nets, metrics=[metric]), "generated.path")
        assert "no caption" in line and metric in line, line


def test_the_registry_names_per_image_features_after_their_metrics():
    """A per-sample table reads each metric's scores as the feature of the same name, one value per image."""
    from synthmill.metrics.base import RowsTotal
    from synthmill.metrics.registry import FEATURES, METRICS

    for name in ("hpsv2", "pickscore"):
        assert METRICS[name].features == {"generated": (name,)}
        assert isinstance(FEATURES[name].total(), RowsTotal)


def test_baselines_give_the_job_scores(preferred, shapes_folder, nets):
    """The release loops the evaluate-all benchmark times against give the job's per-image scores."""
    from benchmarks.preference_baselines import BASELINES

    _, _, scores = preferred
    files, captions = (list(x) for x in zip(*_samples(shapes_folder), strict=True))
    sections = {"hpsv2": {"weights": nets["hps_weights"], "architecture": nets["hps_arch"]},
                "pickscore": {"model": nets["pick"]}}
    assert set(BASELINES) == set(sections)
    for name, loop in BASELINES.items():
        theirs = loop(files, captions, sections[name], "cpu")
        assert np.abs(theirs - scores[name]).max() <= 1e-4 * max(1.0, np.abs(theirs).max()), name


def test_resumed_job_reuses_units(preferred, write_spec):
    """A unit's partial removed: only it is scored again, and the scores are the same."""
    spec, result, scores = preferred
    out = spec["output"]["path"]
    os.unlink(os.path.join(out, "partials", "generated", "000001.json"))
    os.unlink(os.path.join(out, "metrics.json"))
    again = run_eval(write_spec, spec)
    assert again["units_resumed"] == 2 and again["units_run"] == 1
    for name in ("hpsv2", "pickscore"):
        assert again["metrics"][name] == pytest.approx(result["metrics"][name], abs=1e-9)
