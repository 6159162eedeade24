"""Trained parts in generate (``model.unet``, ``model.lora``) and latents from generation (``output.save_latents``)
read by distill instead of the VAE encoder.

One generate job swaps in the UNet of another tiny pipeline (seed 1) and loads a tiny LoRA (peft adapters with
random non-zero weights, saved with the pipeline class's ``save_lora_weights``) at scale 0.7, and saves latents;
its images and latents are compared with plain diffusers given the same UNet and LoRA. Two distill runs then
train on the same shards, one reading stored latents (the VAE's own encodings of the images) and one encoding
the images.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from synthmill.cli import main
from tests.conftest import files_under, read_wds, run_job
from tests.test_s3 import s3  # noqa: F401 - the moto server fixture

pytestmark = pytest.mark.usefixtures("ray_address")

SCALE = 0.7


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tiny_sd):
    from synthmill.testing.tiny import save_tiny_lora, save_tiny_unet

    folder = tmp_path_factory.mktemp("parts")
    return save_tiny_unet(folder / "unet", seed=1), save_tiny_lora(folder / "lora", tiny_sd, seed=0)


def parts_spec(tiny_sd, prompts_tsv, parts, output: str) -> dict:
    unet, lora = parts
    return {
        "kind": "generate",
        "model": {"path": tiny_sd, "unet": unet, "lora": [{"path": lora, "scale": SCALE}]},
        "prompts": {"path": prompts_tsv, "column": "caption", "limit": 4},
        "sampling": {"steps": 2, "guidance_scale": 7.5, "height": 32, "width": 32, "seed": 77},
        "output": {"path": output, "samples_per_shard": 2, "save_latents": True},
        "cluster": {"num_actors": 1, "batch_size": 2},
    }


@pytest.fixture(scope="module")
def generated(tiny_sd, prompts_tsv, parts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("generated")
    spec = parts_spec(tiny_sd, prompts_tsv, parts, str(folder / "out"))
    spec_file = folder / "job.yaml"
    import yaml

    spec_file.write_text(yaml.safe_dump(spec))
    summary = run_job(lambda s: str(spec_file), spec)
    assert summary["status"] == "complete"
    return spec, str(spec_file), spec["output"]["path"]


def _plain(tiny_sd, unet: str | None, lora: str | None):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    kwargs = {"unet": UNet2DConditionModel.from_pretrained(unet)} if unet else {}
    pipe = DiffusionPipeline.from_pretrained(tiny_sd, **kwargs)
    if lora:
        pipe.load_lora_weights(lora, adapter_name="trained")
        pipe.set_adapters(["trained"], adapter_weights=[SCALE])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_unet_and_lora_give_plain_diffusers_images_and_latents(generated, tiny_sd, parts):
    """Each image equals, pixel for pixel, a plain diffusers call of the pipeline with that UNet passed in and that
    LoRA loaded at that scale; each KEY.latents.npy is float16 and equals that call's ``output_type="latent"`` in
    float16. Without the LoRA, or without the UNet, the images differ (the comparison can fail)."""
    spec, _, out = generated
    samples = read_wds(out)
    assert len(samples) == 4
    prompts = [json.loads(s["json"])["prompt"] for s in samples]
    seeds = [json.loads(s["json"])["seed"] for s in samples]
    ours = np.stack([_png(s["png"]) for s in samples])
    stored = [np.load(io.BytesIO(s["latents.npy"]), allow_pickle=False) for s in samples]

    def call(pipe, output_type):
        return _sample(pipe, prompts, seeds, output_type)

    plain = _plain(tiny_sd, *parts)
    theirs = (call(plain, "np") * 255).round().astype(np.uint8)
    latents = call(plain, "latent")
    assert np.array_equal(ours, theirs)
    assert all(a.dtype == np.float16 and a.shape == (4, 16, 16) for a in stored)
    assert np.array_equal(np.stack(stored), latents.to(torch.float16).numpy())
    for unet, lora in ((parts[0], None), (None, parts[1])):  # one part missing: other images
        other = (call(_plain(tiny_sd, unet, lora), "np") * 255).round()
        assert np.abs(other - ours).max() > 10, (unet, lora)
    plan = json.load(open(os.path.join(out, "plan.json")))
    assert set(plan["parts_files"]) == {"model.unet", "model.lora.0.path"}
    assert "diffusion_pytorch_model.safetensors" in plan["parts_files"]["model.unet"]
    assert "pytorch_lora_weights.safetensors" in plan["parts_files"]["model.lora.0.path"]


def _sample(pipe, prompts: list[str], seeds: list[int], output_type: str):
    """``pipe``'s output for the job's prompts and seeds, in the job's batches of 2 (a float32 batch of 4 differs in
    the last bits) and on one torch thread, as the actor (cpus_per_actor 1: other thread counts sum in another
    order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = [pipe(prompts[i:i + 2], num_inference_steps=2, guidance_scale=7.5, height=32, width=32,
                    output_type=output_type, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + 2]]
                    ).images for i in range(0, len(prompts), 2)]
    finally:
        torch.set_num_threads(threads)
    return torch.cat(out) if output_type == "latent" else np.concatenate(out)


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_fused_lora_is_the_same_model(generated, tiny_sd, parts, write_spec, tmp_path, prompts_tsv):
    """``model.lora_fuse``: the LoRA fused into the weights gives the unfused images to within float rounding
    (one 8-bit level), in another job (fused is another fingerprint)."""
    spec = parts_spec(tiny_sd, prompts_tsv, parts, str(tmp_path / "fused"))
    spec["model"]["lora_fuse"] = True
    spec["output"]["save_latents"] = False
    spec["prompts"]["limit"] = 2
    assert run_job(write_spec, spec)["status"] == "complete"
    fused = [_png(s["png"]).astype(int) for s in read_wds(spec["output"]["path"])]
    unfused = [_png(s["png"]).astype(int) for s in read_wds(generated[2])][:2]
    assert max(np.abs(a - b).max() for a, b in zip(fused, unfused, strict=True)) <= 1


def _error(code_and_err: tuple[int, str]) -> str:
    code, err = code_and_err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("synthmill: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_parts_are_exit_2_naming_the_field(tiny_sd, parts, prompts_tsv, write_spec, tmp_path, capsys):
    """Checked before anything runs or is written: a missing folder or file, a folder that is not a UNet, a UNet
    whose inputs do not fit the pipeline, a file that holds no LoRA; distill refuses both settings."""
    unet, lora = parts
    wrong = str(tmp_path / "unet8")
    shutil.copytree(unet, wrong)
    config = json.load(open(os.path.join(wrong, "config.json")))
    config["cross_attention_dim"] = 48
    json.dump(config, open(os.path.join(wrong, "config.json"), "w"))
    cases = [
        ({"unet": str(tmp_path / "nope")}, "model.unet", "folder not found"),
        ({"unet": os.path.join(tiny_sd, "vae")}, "model.unet", "not a UNet (its config.json names 'AutoencoderKL')"),
        ({"unet": wrong}, "model.unet", "its cross_attention_dim is 48, and the UNet of model.path"),
        ({"lora": [{"path": str(tmp_path / "nope.safetensors")}]}, "model.lora.0.path", "not found"),
        ({"lora": [{"path": os.path.join(unet, "diffusion_pytorch_model.safetensors")}]}, "model.lora.0.path",
         "holds no LoRA weights"),
        ({"lora": [{"path": unet}]}, "model.lora.0.path", "no pytorch_lora_weights.safetensors in that folder"),
    ]
    for model, field, message in cases:
        out = str(tmp_path / "out")
        spec = parts_spec(tiny_sd, prompts_tsv, parts, out)
        spec["model"] = {"path": tiny_sd, **model}
        code = main(["run", write_spec(spec)])
        line = _error((code, capsys.readouterr().err))
        assert line.startswith(f"synthmill: error: {field} ") and message in line, line
        assert not os.path.exists(out)
    from tests.test_distill import distill_spec

    for key, value in (("unet", unet), ("lora", [{"path": lora}])):
        spec = distill_spec(tiny_sd, str(tmp_path), str(tmp_path / "d"))
        spec["teacher"][key] = value
        line = _error((main(["run", write_spec(spec)]), capsys.readouterr().err))
        assert f"field 'teacher.{key}': is a generate setting" in line, line


# ---- distill over stored latents -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exact_teacher(tmp_path_factory) -> str:
    """A tiny SD teacher (full UNet layout) whose VAE posterior has a negligible spread (log-variance -30, as a
    trained VAE's is tiny): a sample of it is its mean, so stored encodings are what the encoder gives."""
    from synthmill.testing.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd", seed=3, unet_layout="full")
    conv = pipe.vae.quant_conv
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[half:] = 0
        conv.bias[half:] = -30.0
    folder = str(tmp_path_factory.mktemp("teacher") / "sd")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _rewrite_shards(src: str, dst: str, latents_of) -> None:
    """Copy ``src``'s shards into ``dst``: each sample's latents member replaced by ``latents_of(png)`` (None: left
    out)."""
    os.makedirs(dst)
    for tar in sorted(glob.glob(os.path.join(src, "shards", "*.tar"))):
        with tarfile.open(tar) as fin, tarfile.open(os.path.join(dst, os.path.basename(tar)), "w") as fout:
            members = {m.name: fin.extractfile(m).read() for m in fin.getmembers()}
            for name, data in members.items():
                if name.endswith(".latents.npy"):
                    new = latents_of(members[name.replace(".latents.npy", ".png")])
                    if new is None:
                        continue
                    buf = io.BytesIO()
                    np.save(buf, new)
                    data = buf.getvalue()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                fout.addfile(info, io.BytesIO(data))


def test_distill_reads_stored_latents_instead_of_the_encoder(generated, exact_teacher, write_spec, tmp_path):
    """The same shards twice: with each sample's latents the teacher VAE's encoding of its image (float16), and
    without latents. The losses agree within 1e-3 at every step, and the run over latents encodes no sample
    (``vae_encoded`` in metrics.jsonl) while the other encodes every one."""
    from diffusers import AutoencoderKL

    from tests.test_distill import distill_spec, metrics_lines, run_distill

    vae = AutoencoderKL.from_pretrained(exact_teacher, subfolder="vae")

    def encode(png: bytes) -> np.ndarray:
        pixels = torch.from_numpy(_png(png).copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)[None]
        with torch.no_grad():
            mean = vae.encode(pixels).latent_dist.mean[0] * vae.config.scaling_factor
        return mean.to(torch.float16).numpy()

    with_latents, without = str(tmp_path / "with"), str(tmp_path / "without")
    _rewrite_shards(generated[2], with_latents, encode)
    _rewrite_shards(generated[2], without, lambda png: None)
    runs = {}
    for name, data in (("with", f"{with_latents}/*.tar"), ("without", f"{without}/*.tar")):
        spec = distill_spec(exact_teacher, data, str(tmp_path / f"out-{name}"), max_steps=3, checkpoint_every=3,
                            gradient_accumulation=1, ema=False, gradient_checkpointing=False)
        spec["data"].update(center_crop=True, random_flip=False)
        spec["cluster"]["num_workers"] = 1
        assert run_distill(write_spec, spec)["status"] == "complete"
        runs[name] = metrics_lines(spec["output"]["path"])
    assert [r["step"] for r in runs["with"]] == [1, 2, 3] == [r["step"] for r in runs["without"]]
    assert [r["vae_encoded"] for r in runs["with"]] == [0, 0, 0]
    assert [r["vae_encoded"] for r in runs["without"]] == [2, 2, 2]
    for a, b in zip(runs["with"], runs["without"], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-3, (a, b)


def test_a_lora_file_replaced_in_place_refuses_the_rerun(generated, tiny_sd, capsys):
    """plan.json holds the LoRA file's identity (size, time): the same command is a resume while the file is as
    it was, and exit 2 naming model.lora.0.path once it was rewritten, with nothing written."""
    from synthmill.testing.tiny import save_tiny_lora

    spec, spec_file, out = generated
    assert main(["run", spec_file, "--dry-run"]) == 0
    capsys.readouterr()
    before = files_under(out)
    save_tiny_lora(spec["model"]["lora"][0]["path"], tiny_sd, seed=5)  # another LoRA, same file name
    line = _error((main(["run", spec_file]), capsys.readouterr().err))
    assert line.startswith(f"synthmill: error: model.lora.0.path {spec['model']['lora'][0]['path']}: its files "
                           f"changed since {out} was started from it (pytorch_lora_weights.safetensors"), line
    assert files_under(out) == before


# ---- parts on S3, and a UNet from the hub ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, tiny_sd) -> str:
    """The LoRA of ``parts`` (seed 0) saved again on its own, as ``generated`` used it: a test above rewrites the one
    in ``parts``."""
    from synthmill.testing.tiny import save_tiny_lora

    folder = save_tiny_lora(tmp_path_factory.mktemp("lora0"), tiny_sd, seed=0)
    return os.path.join(folder, "pytorch_lora_weights.safetensors")


def test_parts_on_s3_give_the_local_parts_images_and_a_lora_replaced_there_refuses_the_rerun(
        generated, s3, tiny_sd, parts, lora_file, prompts_tsv, write_spec, tmp_path, capsys):  # noqa: F811
    """``model.unet`` as ``{path: s3://.../pipe, subfolder: unet}`` and ``model.lora`` as an ``s3://`` .safetensors
    file, on the moto server: the job's first shard equals, image for image and latent for latent, the job with the
    local copies; plan.json records the objects' sizes and ETags; the same command resumes, and once the LoRA object
    was replaced in place it is exit 2 naming model.lora.0.path, nothing written. Bad parts on S3 are exit 2 naming
    their field."""
    from synthmill.testing.tiny import save_tiny_lora

    fs = s3["fs"]
    fs.put(parts[0], "synth/parts/pipe/unet", recursive=True)
    fs.put_file(lora_file, "synth/parts/lora/style.safetensors")
    out = str(tmp_path / "out")
    spec = parts_spec(tiny_sd, prompts_tsv, parts, out)
    spec["model"]["unet"] = {"path": "s3://synth/parts/pipe", "subfolder": "unet"}
    spec["model"]["lora"][0]["path"] = "s3://synth/parts/lora/style.safetensors"
    spec["prompts"]["limit"] = 2
    spec["storage"] = {"endpoint_url": s3["endpoint"], **s3["creds"]}
    spec_file = write_spec(spec)
    assert main(["run", spec_file]) == 0, capsys.readouterr().err
    capsys.readouterr()
    remote, local = read_wds(out), read_wds(generated[2])[:2]
    assert [s["__key__"] for s in remote] == [s["__key__"] for s in local]
    for a, b in zip(remote, local, strict=True):
        assert np.array_equal(_png(a["png"]), _png(b["png"]))
        assert a["latents.npy"] == b["latents.npy"]
    plan = json.load(open(os.path.join(out, "plan.json")))
    info = fs.info("synth/parts/lora/style.safetensors")
    assert plan["parts_files"]["model.lora.0.path"] == {"": [info["size"], info["ETag"]]}
    assert set(plan["parts_files"]["model.unet"]) == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert main(["run", spec_file, "--dry-run"]) == 0
    capsys.readouterr()
    before = files_under(out)
    other = save_tiny_lora(tmp_path / "other", tiny_sd, seed=5)
    fs.put_file(os.path.join(other, "pytorch_lora_weights.safetensors"), "synth/parts/lora/style.safetensors")
    assert fs.info("synth/parts/lora/style.safetensors", refresh=True)["size"] == info["size"]  # only the ETag tells
    line = _error((main(["run", spec_file]), capsys.readouterr().err))
    assert line.startswith("synthmill: error: model.lora.0.path s3://synth/parts/lora/style.safetensors: its files "
                           f"changed since {out} was started from it (the file itself"), line
    assert files_under(out) == before
    cases = [
        ({"unet": {"path": "s3://synth/parts/pipe", "subfolder": "vae"}}, "model.unet", "folder not found"),
        ({"unet": "s3://synth/parts/pipe"}, "model.unet", "not a diffusers UNet folder (no readable config.json)"),
        ({"lora": [{"path": "s3://synth/parts/pipe/unet"}]}, "model.lora.0.path",
         "no pytorch_lora_weights.safetensors in that folder"),
        ({"lora": [{"path": "s3://synth/parts/nothing"}]}, "model.lora.0.path", "not found"),
        ({"lora": [{"path": "s3://synth/parts/pipe/unet/diffusion_pytorch_model.safetensors"}]}, "model.lora.0.path",
         "holds no LoRA weights"),
    ]
    for model, field, message in cases:
        bad = json.loads(json.dumps(spec))
        bad["model"] = {"path": tiny_sd, **model}
        bad["output"]["path"] = str(tmp_path / "bad")
        line = _error((main(["validate", write_spec(bad)]), capsys.readouterr().err))
        assert line.startswith(f"synthmill: error: {field} ") and message in line, line


@pytest.fixture
def unet_hub(hub, parts, tiny_sd, tmp_path, monkeypatch):
    """The hub stand-in also serving ``org/parts`` (the parts UNet in ``unet/``), ``org/bare-unet`` (a repo whose
    root is that UNet) and ``org/tiny-sd`` (the tiny pipeline); downloads go to a hub cache under ``tmp_path``."""
    from huggingface_hub import constants

    repo = tmp_path / "repo"
    shutil.copytree(parts[0], repo / "unet")
    hub.repos.update({"org/parts": {"main": str(repo)}, "org/bare-unet": {"main": parts[0]},
                      "org/tiny-sd": {"main": tiny_sd}})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return hub


def test_a_hub_unet_in_a_subfolder_gives_the_local_folders_images(unet_hub, generated, tiny_sd, parts, lora_file,
                                                                   prompts_tsv, write_spec, tmp_path, capsys):
    """``model.unet: {path: org/parts, subfolder: unet}`` (diffusers' ``from_pretrained(repo, subfolder="unet")``)
    passes validate by asking the hub, and the pipeline the actors load with it (``load_pipeline``, from the hub
    through its cache) makes the images of the job that used the local folder, with the same LoRA. A repo whose root
    is the UNet is the plain string. A missing subfolder, a subfolder that is no UNet, a pipeline repo given without
    its subfolder, an unknown repo or revision: exit 2 naming model.unet."""
    from synthmill.jobs.generate_spec import GenerateSpec, LoraSpec, ModelSpec
    from synthmill.models.loading import load_pipeline

    def spec_with(unet) -> str:
        spec = parts_spec(tiny_sd, prompts_tsv, parts, str(tmp_path / "out"))
        spec["model"]["unet"] = unet
        return write_spec(spec)

    for unet in ({"path": "org/parts", "subfolder": "unet"}, "org/bare-unet", {"path": "org/bare-unet"}):
        assert main(["validate", spec_with(unet)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert "/org/parts/resolve/main/unet/config.json" in unet_hub.downloads
    cases = [
        ({"path": "org/parts", "subfolder": "nope"}, "no nope/config.json on http://127.0.0.1:"),
        ({"path": "org/tiny-sd", "subfolder": "vae"}, "not a UNet (its config.json names 'AutoencoderKL')"),
        ("org/tiny-sd", "a pipeline repo, its UNet is in unet/ (write model.unet: {path: org/tiny-sd, subfolder: "
                        "unet})"),
        ({"path": "org/no-such-unet", "subfolder": "unet"}, "no such folder here and no such model on http://"),
    ]
    for unet, message in cases:
        line = _error((main(["validate", spec_with(unet)]), capsys.readouterr().err))
        assert line.startswith("synthmill: error: model.unet org/") and message in line, line
    line = _error((main(["validate", spec_with({"path": "org/parts", "subfolder": "unet", "revision": "v9"})]),
                   capsys.readouterr().err))
    assert line.startswith("synthmill: error: model.unet.revision v9: no such revision of org/parts on "), line
    line = _error((main(["validate", spec_with({"path": "org/parts", "subdir": "unet"})]), capsys.readouterr().err))
    assert "unknown key 'model.unet.subdir' (known keys here: path, subfolder, revision)" in line, line

    model = ModelSpec(path=tiny_sd, unet={"path": "org/parts", "subfolder": "unet"},
                      lora=[LoraSpec(path=lora_file, scale=SCALE)])
    pipe = load_pipeline(model, "cpu")
    weights = [d for d in unet_hub.downloads if d.startswith("/org/parts/resolve/")
               and d.endswith("/unet/diffusion_pytorch_model.safetensors")]
    assert len(weights) == 1, unet_hub.downloads  # from the hub, at the commit its config.json came from
    samples = read_wds(generated[2])
    prompts = [json.loads(s["json"])["prompt"] for s in samples]
    seeds = [json.loads(s["json"])["seed"] for s in samples]
    images = (_sample(pipe, prompts, seeds, "np") * 255).round().astype(np.uint8)
    assert np.array_equal(images, np.stack([_png(s["png"]) for s in samples]))
    # the string form keeps the fingerprint basis it had (the string); a subfolder is another job
    specs = [GenerateSpec(model=ModelSpec(path=tiny_sd, unet=unet))
             for unet in (parts[0], {"path": parts[0]}, {"path": parts[0], "subfolder": "unet"})]
    assert specs[0]._fingerprint_basis("d")["model"]["unet"] == parts[0]
    assert specs[0].fingerprint("d") == specs[1].fingerprint("d") != specs[2].fingerprint("d")
