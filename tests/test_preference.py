"""Human-preference metrics (hpsv2, image_reward, pickscore) against their releases' own scoring, on identical images
and weights.

No release can run here: the ``hpsv2`` package pins pytest 7.2 and protobuf < 4 (it does not install beside this
stack) and downloads LAION's CLIP at its first call; ``image-reward`` pins timm 0.6.13, needs fairscale and imports
helpers transformers 5 removed; PickScore has no package, its release is a README snippet calling transformers. So
each reference below is the release's scoring written out in the test, from its definition, on tiny seeded
networks saved in the releases' checkpoint formats (synthmill.testing.preference_weights) and loaded by the job
through ``hpsv2.weights``, ``image_reward.weights`` / ``med_config`` / ``tokenizer`` and ``pickscore.model``, as
users load the real ones:

- HPSv2 (``hpsv2/img_score.py`` and its ``open_clip``'s ``image_transform(resize_longest_max=True)``): an open_clip
  CLIP loaded with ``torch.load(cp)["state_dict"]``; ToTensor, the longest side resized to the input size
  (bicubic on the tensor) and zero-padded around the centre, OpenAI mean/std; ``tokenize``; one image at a time,
  ``diag(image_features @ text_features.T)`` of the model's normalised features.
- ImageReward (``ImageReward/ImageReward.py`` with BLIP's ``vit.py`` and ``med.py``): the checkpoint's own tensors,
  by their names, through BLIP's ViT (pre-norm blocks, fused qkv, LayerNorm eps 1e-6) and BERT (bidirectional
  self-attention, cross-attention to the image in every layer, masks of -10000), the MLP head's five linear layers
  on the first token, ``(r - mean) / std``; one image at a time, the prompt padded to 35 tokens.
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
from tests.conftest import write_image_folder

pytestmark = pytest.mark.slow

SIZES = [(32, 32), (50, 30), (24, 56), (64, 64), (40, 40)]


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict[str, str]:
    from synthmill.testing.preference_weights import save_tiny_hps, save_tiny_pickscore

    root = tmp_path_factory.mktemp("preference")
    from synthmill.testing.preference_weights import save_tiny_image_reward

    arch, weights = save_tiny_hps(str(root / "hps"), seed=1)
    return {"hps_arch": arch, "hps_weights": weights, "pick": save_tiny_pickscore(str(root / "pick"), seed=2),
            "ir": save_tiny_image_reward(str(root / "ir"), seed=3)}


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
        "metrics": ["hpsv2", "image_reward", "pickscore"],
        "hpsv2": {"weights": nets["hps_weights"], "architecture": nets["hps_arch"]},
        "image_reward": dict(nets["ir"]),
        "pickscore": {"model": nets["pick"]},
        "output": {"path": output},
        "cluster": {"num_actors": 2, "batch_size": 4},
    }
    for key, value in sections.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
    return spec


@pytest.fixture(scope="module")
def preferred(ray_cluster, shapes_folder, nets, tmp_path_factory):
    """One evaluate job of the three metrics (3 units over 2 actors): its spec, metrics.json, per-image scores."""
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
    for name in ("hpsv2", "image_reward", "pickscore"):
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


def test_image_reward_equals_the_release_forward_pass(preferred, shapes_folder, nets):
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
    from transformers import BertTokenizer

    state = torch.load(nets["ir"]["weights"], map_location="cpu")
    with open(nets["ir"]["med_config"], encoding="utf-8") as fh:
        med = json.load(fh)
    tokenizer = BertTokenizer.from_pretrained(nets["ir"]["tokenizer"])  # blip.init_tokenizer
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    vit = {k[len("blip.visual_encoder."):]: v for k, v in state.items() if k.startswith("blip.visual_encoder.")}
    bert = {k[len("blip.text_encoder."):]: v for k, v in state.items() if k.startswith("blip.text_encoder.")}
    width, patch = vit["patch_embed.proj.weight"].shape[0], vit["patch_embed.proj.weight"].shape[-1]
    size = int((vit["pos_embed"].shape[1] - 1) ** 0.5) * patch
    depth = len({k.split(".")[1] for k in vit if k.startswith("blocks.")})
    preprocess = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                          lambda image: image.convert("RGB"), ToTensor(),
                          Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])

    def heads(x, n):  # (B, L, C) -> (B, n, L, C / n)
        return x.view(x.shape[0], x.shape[1], n, -1).permute(0, 2, 1, 3)

    def visual_encoder(x):  # BLIP vit.VisionTransformer: 64-wide heads (base 768 / 12, large 1024 / 16)
        n = width // 64
        x = F.conv2d(x, vit["patch_embed.proj.weight"], vit["patch_embed.proj.bias"], stride=patch)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([vit["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + vit["pos_embed"][:, :x.shape[1] + 1]
        for b in range(depth):
            p = f"blocks.{b}."
            y = F.layer_norm(x, (width,), vit[p + "norm1.weight"], vit[p + "norm1.bias"], eps=1e-6)
            q, k, v = F.linear(y, vit[p + "attn.qkv.weight"], vit[p + "attn.qkv.bias"]).chunk(3, dim=-1)
            q, k, v = heads(q, n), heads(k, n), heads(v, n)
            attn = ((q @ k.transpose(-2, -1)) * (width // n) ** -0.5).softmax(dim=-1)
            y = (attn @ v).transpose(1, 2).reshape(x.shape)
            x = x + F.linear(y, vit[p + "attn.proj.weight"], vit[p + "attn.proj.bias"])
            y = F.layer_norm(x, (width,), vit[p + "norm2.weight"], vit[p + "norm2.bias"], eps=1e-6)
            y = F.linear(F.gelu(F.linear(y, vit[p + "mlp.fc1.weight"], vit[p + "mlp.fc1.bias"])),
                         vit[p + "mlp.fc2.weight"], vit[p + "mlp.fc2.bias"])
            x = x + y
        return F.layer_norm(x, (width,), vit["norm.weight"], vit["norm.bias"], eps=1e-6)

    def text_encoder(ids, mask, image_embeds):  # BLIP med.BertModel, mode "multimodal"
        h, n, eps = med["hidden_size"], med["num_attention_heads"], med["layer_norm_eps"]

        def ln(x, name):
            return F.layer_norm(x, (h,), bert[name + ".weight"], bert[name + ".bias"], eps=eps)

        def lin(x, name):
            return F.linear(x, bert[name + ".weight"], bert[name + ".bias"])

        def attention(x, context, name, extended_mask):
            q, k, v = (heads(lin(t, f"{name}.self.{w}"), n) for t, w in ((x, "query"), (context, "key"),
                                                                        (context, "value")))
            scores = q @ k.transpose(-1, -2) / (h // n) ** 0.5 + extended_mask
            y = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(x.shape)
            return ln(lin(y, f"{name}.output.dense") + x, f"{name}.output.LayerNorm")

        x = bert["embeddings.word_embeddings.weight"][ids] + bert["embeddings.position_embeddings.weight"][
            :ids.shape[1]]
        x = ln(x, "embeddings.LayerNorm")
        self_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0
        image_mask = torch.zeros(image_embeds.shape[0], 1, 1, image_embeds.shape[1])  # every patch attended
        for i in range(med["num_hidden_layers"]):
            p = f"encoder.layer.{i}"
            x = attention(x, x, f"{p}.attention", self_mask)
            x = attention(x, image_embeds, f"{p}.crossattention", image_mask)
            x = ln(lin(F.gelu(lin(x, f"{p}.intermediate.dense")), f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
        return x

    theirs = []
    for png, prompt in _samples(shapes_folder):  # ImageReward.score(prompt, image)
        text = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        with torch.no_grad():
            image_embeds = visual_encoder(preprocess(Image.open(png)).unsqueeze(0))
            r = text_encoder(text.input_ids, text.attention_mask, image_embeds)[:, 0, :].float()
            for layer in (0, 2, 4, 6, 7):  # MLP: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear
                r = F.linear(r, state[f"mlp.layers.{layer}.weight"], state[f"mlp.layers.{layer}.bias"])
            theirs.append(((r - 0.16717362830052426) / 1.0333394966054072).item())
    _, result, scores = preferred
    ours = scores["image_reward"]
    assert len(ours) == 22
    assert np.std(theirs) > 1e-2, "scores this alike would not test the order of images"
    assert np.abs(ours - np.array(theirs)).max() <= 1e-4 * max(1.0, np.abs(theirs).max()), (ours, theirs)
    assert abs(result["metrics"]["image_reward"] - np.mean(theirs)) <= 1e-4 * max(1.0, abs(np.mean(theirs)))


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
    with open(nets["ir"]["weights"], "rb") as fh:
        ir_sha = hashlib.sha256(fh.read()).hexdigest()
    with open(nets["ir"]["med_config"], "rb") as fh:
        med_sha = hashlib.sha256(fh.read()).hexdigest()
    assert m["image_reward_network"] == {"weights": nets["ir"]["weights"], "sha256": ir_sha,
                                         "med_config": nets["ir"]["med_config"], "med_config_sha256": med_sha,
                                         "tokenizer": nets["ir"]["tokenizer"]}
    assert "zero-padded" in protocol["hpsv2"]["score"] and "logit_scale" in protocol["pickscore"]["score"]
    assert "35 tokens" in protocol["image_reward"]["score"]
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
    # ImageReward: another network's checkpoint, a med_config that is no BERT configuration, no vocabulary
    wrong = pref_spec(shapes_folder, out, nets, image_reward={"weights": nets["hps_weights"]})
    line = _refused(write_spec, capsys, wrong, "image_reward.weights")
    assert "not the weights of the ImageReward network" in line
    wrong = pref_spec(shapes_folder, out, nets, image_reward={"med_config": nets["hps_arch"]})
    line = _refused(write_spec, capsys, wrong, "image_reward.med_config")
    assert "not a BERT configuration" in line
    _refused(write_spec, capsys, pref_spec(shapes_folder, out, nets, image_reward={"tokenizer": str(other)}),
             "image_reward.tokenizer")
    # images without captions
    bare = write_image_folder(tmp_path / "bare", 2, captions=False)
    for metric in ("hpsv2", "image_reward", "pickscore"):
        line = _refused(write_spec, capsys, pref_spec(bare, out, nets, metrics=[metric]), "generated.path")
        assert "no caption" in line and metric in line, line


def test_the_registry_names_per_image_features_after_their_metrics():
    """A per-sample table reads each metric's scores as the feature of the same name, one value per image."""
    from synthmill.metrics.base import RowsTotal
    from synthmill.metrics.registry import FEATURES, METRICS

    for name in ("hpsv2", "image_reward", "pickscore"):
        assert METRICS[name].features == {"generated": (name,)}
        assert isinstance(FEATURES[name].total(), RowsTotal)


def test_baselines_give_the_job_scores(preferred, shapes_folder, nets):
    """The release loops the evaluate-all benchmark times against give the job's per-image scores."""
    from benchmarks.preference_baselines import RELEASE_LOOPS

    _, _, scores = preferred
    files, captions = (list(x)[-6:] for x in zip(*_samples(shapes_folder), strict=True))  # 5 shapes, 2 long
    sections = {"hpsv2": {"weights": nets["hps_weights"], "architecture": nets["hps_arch"]},
                "image_reward": dict(nets["ir"]), "pickscore": {"model": nets["pick"]}}
    assert set(RELEASE_LOOPS) == set(sections)
    for name, loop in RELEASE_LOOPS.items():
        theirs = loop(files, captions, sections[name], "cpu")
        assert np.abs(theirs - scores[name][-6:]).max() <= 1e-4 * max(1.0, np.abs(theirs).max()), name


def test_a_finished_job_is_resumed_whole(preferred, write_spec):
    """The settings of the three metrics give the same fingerprint again: every unit counts as scored."""
    from synthmill.jobs import evaluate
    from synthmill.jobs.spec import load_spec

    spec, result, _ = preferred
    plan = evaluate.plan_summary(evaluate.prepare(load_spec(write_spec(spec))))
    assert plan["generated"]["units_done"] == plan["generated"]["units"] == 3
    assert plan["fingerprint"] == json.load(open(os.path.join(spec["output"]["path"], "plan.json")))["fingerprint"]


def test_a_checkpoint_replaced_in_place_is_a_new_job(preferred, nets, write_spec, tmp_path, capsys):
    """The weights' digests enter the fingerprint: plan.json names the digest each network's file had; once the
    HPS checkpoint is overwritten in place with other weights, the same spec is refused as an output conflict
    (exit 2, naming output.path). The file is put back afterwards for the other tests."""
    import shutil

    from synthmill.testing.preference_weights import save_tiny_hps

    spec, _, _ = preferred
    weights = nets["hps_weights"]
    recorded = json.load(open(os.path.join(spec["output"]["path"], "plan.json")))["networks_sha256"]
    assert set(recorded) == {"hpsv2", "image_reward", "pickscore"}
    assert recorded["hpsv2"] == hashlib.sha256(open(weights, "rb").read()).hexdigest()
    path = write_spec(spec)
    assert main(["validate", path]) == 0
    capsys.readouterr()

    _, other = save_tiny_hps(str(tmp_path / "other"), seed=7)
    shutil.copyfile(weights, tmp_path / "kept")
    try:
        shutil.copyfile(other, weights)  # same path, other weights
        assert main(["validate", path]) == 2
    finally:
        shutil.copyfile(tmp_path / "kept", weights)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("synthmill: error: output.path") and "different job" in err, err
