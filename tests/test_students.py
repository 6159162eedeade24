"""Student UNets (BK-SDM, SSD-1B, Segmind-Vega): layouts, parameter counts, weight copy, errors, meta device.

Full-size counts are checked on the meta device (no memory, no weights); the copy itself on tiny, seeded
teachers built in code. Nothing touches a hub.
"""

from __future__ import annotations

import json

import pytest
import torch

from synthmill.models.students import (
    KNOWN_ARCHS,
    PUBLISHED_PARAMS,
    copy_weights,
    count_parameters,
    make_student,
    student_config,
)
from synthmill.testing.tiny import tiny_unet_config
from synthmill.testing.unet_configs import build_unet, get_unet_config

SD_ARCHS = ("bk-base", "bk-small", "bk-tiny")
SDXL_ARCHS = ("ssd-1b", "vega")


def _quiet_to():
    """diffusers warns on every ``.to(dtype)``; the tests cast nothing, but keep the log readable."""
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()


_quiet_to()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and 2 OpenMP threads on a busy 2-core machine spin
    against each other (a 32-channel conv goes from 0.3 ms to 30 ms); restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# full-size layouts on the meta device


@pytest.fixture(scope="module")
def sd14_meta():
    return build_unet("sd-v1.4")  # meta device


@pytest.fixture(scope="module")
def sdxl_meta():
    return build_unet("sdxl-base-1.0")


def _within(n: int, published: float, tol: float = 0.005) -> bool:
    return abs(n - published) / published <= tol


def test_teacher_configs_param_counts(sd14_meta, sdxl_meta):
    assert next(sd14_meta.parameters()).is_meta and next(sdxl_meta.parameters()).is_meta
    assert count_parameters(sd14_meta) == 859_520_964
    assert count_parameters(sdxl_meta) == 2_567_463_684
    assert _within(count_parameters(sd14_meta), PUBLISHED_PARAMS["sd-v1.4"])
    assert _within(count_parameters(sdxl_meta), PUBLISHED_PARAMS["sdxl-base-1.0"])
    # get_unet_config hands out copies
    cfg = get_unet_config("sd-v1.4")
    cfg["block_out_channels"].append(1)
    assert get_unet_config("sd-v1.4")["block_out_channels"] == [320, 640, 1280, 1280]


@pytest.mark.parametrize("arch", SD_ARCHS + SDXL_ARCHS)
def test_student_param_counts_match_published(arch, sd14_meta, sdxl_meta):
    teacher = sd14_meta if arch in SD_ARCHS else sdxl_meta
    student, report = make_student(teacher, arch, return_report=True)
    assert all(p.is_meta for p in student.parameters())
    assert not report.weights_copied
    assert report.initialised == []  # every student tensor has a teacher source
    n = count_parameters(student)
    published = PUBLISHED_PARAMS[arch]
    assert _within(n, published), f"{arch}: {n:,} vs published {published:,.0f} ({(n - published) / published:+.3%})"


def test_full_size_layouts(sd14_meta, sdxl_meta):
    base = make_student(sd14_meta, "bk-base")
    assert [len(b.resnets) for b in base.down_blocks] == [1, 1, 1, 1]
    assert [len(b.resnets) for b in base.up_blocks] == [2, 2, 2, 2]
    assert base.mid_block is not None
    assert make_student(sd14_meta, "bk-small").mid_block is None
    tiny = make_student(sd14_meta, "bk-tiny")
    assert tiny.config.block_out_channels == [320, 640, 1280]
    assert len(tiny.down_blocks) == len(tiny.up_blocks) == 3 and tiny.mid_block is None
    assert tiny.down_blocks[2].downsamplers is None
    # BK-SDM's own student configs (src/unet_config/bk_{base,small,tiny}/config.json), layout fields
    ca_down, ca_up = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
    bk_published = {
        "bk-base": ([320, 640, 1280, 1280], [ca_down] * 3 + ["DownBlock2D"], ["UpBlock2D"] + [ca_up] * 3,
                    "UNetMidBlock2DCrossAttn"),
        "bk-small": ([320, 640, 1280, 1280], [ca_down] * 3 + ["DownBlock2D"], ["UpBlock2D"] + [ca_up] * 3, None),
        "bk-tiny": ([320, 640, 1280], [ca_down] * 3, [ca_up] * 3, None),
    }
    for arch, (channels, down, up, mid) in bk_published.items():
        cfg = student_config(sd14_meta, arch)
        assert list(cfg["block_out_channels"]) == channels
        assert list(cfg["down_block_types"]) == down and list(cfg["up_block_types"]) == up
        assert cfg["layers_per_block"] == 1 and cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") == mid
        assert cfg["cross_attention_dim"] == 768 and cfg["attention_head_dim"] == 8

    def depths(unet):
        down = [[len(a.transformer_blocks) for a in getattr(b, "attentions", [])] for b in unet.down_blocks]
        up = [[len(a.transformer_blocks) for a in getattr(b, "attentions", [])] for b in unet.up_blocks]
        return down, up

    assert depths(sdxl_meta) == ([[], [2, 2], [10, 10]], [[10, 10, 10], [2, 2, 2], []])
    ssd = make_student(sdxl_meta, "ssd-1b")
    assert depths(ssd) == ([[], [2, 2], [4, 4]], [[4, 4, 10], [2, 1, 1], []])
    assert type(ssd.mid_block).__name__ == "UNetMidBlock2D" and len(ssd.mid_block.resnets) == 1
    assert len(ssd.mid_block.attentions) == 0
    vega = make_student(sdxl_meta, "vega")
    assert depths(vega) == ([[], [1, 1], [2, 2]], [[2, 2, 2], [1, 1, 1], []])
    assert type(vega.mid_block).__name__ == "UNetMidBlock2D"
    # Segmind's Vega deep dive: down 247M, mid 31M, up 460M
    assert round(count_parameters(vega.down_blocks) / 1e6) == 247
    assert round(count_parameters(vega.mid_block) / 1e6) == 31
    assert round(count_parameters(vega.up_blocks) / 1e6) == 460


# ---------------------------------------------------------------------------------------------------------
# tiny seeded teachers: the copy itself


def _tiny_sd_config() -> dict:
    return tiny_unet_config("sd")


def _tiny_sdxl_config() -> dict:
    return tiny_unet_config("sdxl")


def _build(cfg: dict, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg)
    # Move every tensor off its initial value (norms start at 1/0 in any model), so equality means "copied".
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet.eval()


@pytest.fixture(scope="module")
def tiny_sd_teacher():
    return _build(_tiny_sd_config(), seed=1)


@pytest.fixture(scope="module")
def tiny_sdxl_teacher():
    return _build(_tiny_sdxl_config(), seed=2)


def _bk_expected_source(key: str, arch: str) -> str:
    """BK-SDM's copy_weight_from_teacher table, restated: student prefix -> teacher prefix, else same name."""
    table: dict[str, str] = {}
    if arch in ("bk-base", "bk-small"):
        table["up_blocks.0.resnets.1."] = "up_blocks.0.resnets.2."
        for i in (1, 2, 3):
            table[f"up_blocks.{i}.resnets.1."] = f"up_blocks.{i}.resnets.2."
            table[f"up_blocks.{i}.attentions.1."] = f"up_blocks.{i}.attentions.2."
    else:  # bk-tiny: the up blocks shift by one
        for i in (0, 1, 2):
            table[f"up_blocks.{i}.resnets.0."] = f"up_blocks.{i + 1}.resnets.0."
            table[f"up_blocks.{i}.attentions.0."] = f"up_blocks.{i + 1}.attentions.0."
            table[f"up_blocks.{i}.resnets.1."] = f"up_blocks.{i + 1}.resnets.2."
            table[f"up_blocks.{i}.attentions.1."] = f"up_blocks.{i + 1}.attentions.2."
        for i in (0, 1):
            table[f"up_blocks.{i}.upsamplers."] = f"up_blocks.{i + 1}.upsamplers."
    for prefix, src in table.items():
        if key.startswith(prefix):
            return src + key[len(prefix):]
    return key


def _forward(unet, sdxl: bool, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, 16, 16, generator=g)
    hidden = torch.randn(batch, 7, 32, generator=g)
    kwargs = {}
    if sdxl:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g),
        }
    with torch.no_grad():
        out = unet(sample, torch.tensor([10, 500]), encoder_hidden_states=hidden, **kwargs).sample
    return sample, out


@pytest.mark.parametrize("arch", SD_ARCHS + SDXL_ARCHS)
def test_weight_copy_tiny(arch, tiny_sd_teacher, tiny_sdxl_teacher):
    sdxl = arch in SDXL_ARCHS
    teacher = tiny_sdxl_teacher if sdxl else tiny_sd_teacher
    student, report = make_student(teacher, arch, return_report=True)
    assert report.weights_copied
    s_sd, t_sd = student.state_dict(), teacher.state_dict()
    assert report.initialised == []
    assert set(report.sources) == set(s_sd)
    for key, src in report.sources.items():
        assert torch.equal(s_sd[key], t_sd[src]), f"{arch}: {key} != teacher {src}"
    # the mapping is the published one
    for key, src in report.sources.items():
        expected = key if sdxl else _bk_expected_source(key, arch)
        assert src == expected, f"{arch}: {key} came from {src}, expected {expected}"
    # the student is a working UNet of the right output shape
    sample, out = _forward(student, sdxl)
    assert out.shape == sample.shape and torch.isfinite(out).all()
    # and it shares no storage with the teacher
    t_ptrs = {t.data_ptr() for t in t_sd.values()}
    assert not any(t.data_ptr() in t_ptrs for t in s_sd.values())


def test_weight_copy_details(tiny_sd_teacher, tiny_sdxl_teacher):
    _, r = make_student(tiny_sd_teacher, "bk-base", return_report=True)
    assert r.sources["down_blocks.1.resnets.0.conv1.weight"] == "down_blocks.1.resnets.0.conv1.weight"
    assert r.sources["up_blocks.2.attentions.1.proj_in.weight"] == "up_blocks.2.attentions.2.proj_in.weight"
    assert r.sources["mid_block.attentions.0.proj_out.weight"] == "mid_block.attentions.0.proj_out.weight"
    assert "down_blocks.0.resnets.1.conv1.weight" in r.unused_teacher
    assert "up_blocks.3.resnets.1.conv1.weight" in r.unused_teacher  # the dropped middle up layer
    _, r = make_student(tiny_sd_teacher, "bk-small", return_report=True)
    assert not any(k.startswith("mid_block.") for k in r.sources)
    assert any(k.startswith("mid_block.") for k in r.unused_teacher)
    _, r = make_student(tiny_sd_teacher, "bk-tiny", return_report=True)
    assert r.sources["up_blocks.0.upsamplers.0.conv.weight"] == "up_blocks.1.upsamplers.0.conv.weight"
    assert r.sources["up_blocks.2.resnets.1.conv1.weight"] == "up_blocks.3.resnets.2.conv1.weight"
    assert "down_blocks.2.downsamplers.0.conv.weight" in r.unused_teacher
    assert not any(k.startswith(("down_blocks.3.", "up_blocks.3.")) for k in r.sources)
    _, r = make_student(tiny_sdxl_teacher, "ssd-1b", return_report=True)
    assert r.sources["mid_block.resnets.0.conv1.weight"] == "mid_block.resnets.0.conv1.weight"
    assert "mid_block.resnets.1.conv1.weight" in r.unused_teacher
    assert "down_blocks.2.attentions.0.transformer_blocks.3.attn1.to_q.weight" in r.sources
    assert "down_blocks.2.attentions.0.transformer_blocks.4.attn1.to_q.weight" in r.unused_teacher
    assert "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2.weight" in r.sources
    assert "up_blocks.1.attentions.1.transformer_blocks.1.ff.net.2.weight" in r.unused_teacher


def test_copy_weights_into_existing_student(tiny_sd_teacher):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(5)
    student = UNet2DConditionModel.from_config(student_config(tiny_sd_teacher, "bk-small"))
    report = copy_weights(tiny_sd_teacher, student, "bk-small")
    assert report.weights_copied and report.initialised == []
    t_sd = tiny_sd_teacher.state_dict()
    for key, tensor in student.state_dict().items():
        assert torch.equal(tensor, t_sd[report.sources[key]])
    assert "bk-small" in report.summary()


def test_student_follows_teacher_dtype(tiny_sd_teacher):
    import copy as _copy

    teacher = _copy.deepcopy(tiny_sd_teacher).to(torch.bfloat16)
    student, report = make_student(teacher, "bk-tiny", return_report=True)
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    assert all(torch.equal(s_sd[k], t_sd[v]) for k, v in report.sources.items())


def test_folder_arch(tmp_path, tiny_sd_teacher):
    # a student config as a diffusers UNet folder: built as is, weights copied by name where shapes match
    cfg = student_config(tiny_sd_teacher, "bk-small")
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **cfg}))
    student, report = make_student(tiny_sd_teacher, folder, return_report=True)
    assert student.mid_block is None and student.config.layers_per_block == 1
    s_sd, t_sd = student.state_dict(), tiny_sd_teacher.state_dict()
    assert set(report.sources) | set(report.initialised) == set(s_sd)
    assert report.sources and all(k == v for k, v in report.sources.items())
    for key, src in report.sources.items():
        assert torch.equal(s_sd[key], t_sd[src])
    for key in report.initialised:  # by name, the shapes of these do not match the teacher's
        assert key not in t_sd or t_sd[key].shape != s_sd[key].shape
    # a pipeline folder (unet/config.json) and a str path work too
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "unet" / "config.json").write_text((folder / "config.json").read_text())
    student2 = make_student(tiny_sd_teacher, str(pipe))
    assert count_parameters(student2) == count_parameters(student)
    _, out = _forward(student2, sdxl=False)
    assert out.shape == (2, 4, 16, 16)


# ---------------------------------------------------------------------------------------------------------
# bad inputs


def test_unknown_arch_lists_known(tiny_sd_teacher):
    with pytest.raises(ValueError) as exc:
        make_student(tiny_sd_teacher, "bk-huge")
    msg = str(exc.value)
    assert "bk-huge" in msg
    for arch in KNOWN_ARCHS:
        assert arch in msg


@pytest.mark.parametrize("arch", SDXL_ARCHS)
def test_sdxl_arch_on_sd_teacher(arch, sd14_meta, tiny_sd_teacher):
    for teacher in (sd14_meta, tiny_sd_teacher):
        with pytest.raises(ValueError, match=r"SDXL.*addition_embed_type.*SD 1\.x/2\.x"):
            make_student(teacher, arch)


@pytest.mark.parametrize("arch", SD_ARCHS)
def test_sd_arch_on_sdxl_teacher(arch, sdxl_meta, tiny_sdxl_teacher):
    for teacher in (sdxl_meta, tiny_sdxl_teacher):
        with pytest.raises(ValueError, match=r"SD 1\.x/2\.x.*SDXL UNet \(addition_embed_type='text_time'\)"):
            make_student(teacher, arch)


def test_layouts_that_do_not_fit():
    with torch.device("meta"):
        from diffusers import UNet2DConditionModel

        one_layer = UNet2DConditionModel(**{**_tiny_sd_config(), "layers_per_block": 1})
        shallow_xl = UNet2DConditionModel(**{**_tiny_sdxl_config(), "transformer_layers_per_block": (1, 1, 1)})
    with pytest.raises(ValueError, match="layers_per_block=2"):
        make_student(one_layer, "bk-base")
    with pytest.raises(ValueError, match="teacher has only"):
        make_student(shallow_xl, "vega")


def test_folder_arch_that_does_not_fit(tmp_path, tiny_sd_teacher):
    cfg = student_config(tiny_sd_teacher, "bk-small")
    cfg["cross_attention_dim"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="cross_attention_dim"):
        make_student(tiny_sd_teacher, tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        make_student(tiny_sd_teacher, tmp_path / "nothing")  # a Path is always taken as a folder
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ValueError, match="config.json' holds a JSON list, not a UNet config"):
        make_student(tiny_sd_teacher, tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="cannot read the student UNet config .*config.json'"):
        make_student(tiny_sd_teacher, tmp_path)


# ---------------------------------------------------------------------------------------------------------
# meta-device teachers


@pytest.mark.parametrize("arch", SD_ARCHS + SDXL_ARCHS)
def test_meta_teacher_gives_meta_student(arch, tiny_sd_teacher, tiny_sdxl_teacher):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    sdxl = arch in SDXL_ARCHS
    real_teacher = tiny_sdxl_teacher if sdxl else tiny_sd_teacher
    cfg = _tiny_sdxl_config() if sdxl else _tiny_sd_config()
    real_student, real_report = make_student(real_teacher, arch, return_report=True)
    for ctx in (init_empty_weights(), torch.device("meta")):
        with ctx:
            meta_teacher = UNet2DConditionModel(**cfg)
        assert all(p.is_meta for p in meta_teacher.parameters())
        student, report = make_student(meta_teacher, arch, return_report=True)
        assert all(t.is_meta for t in student.state_dict().values())
        assert not report.weights_copied
        assert count_parameters(student) == count_parameters(real_student)
        assert report.sources == real_report.sources
        assert student.config == real_student.config


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "ssd-1b"])
def test_full_size_random_pipelines_have_the_published_parameter_counts(arch):
    """The benchmark pipelines (testing/full_size.py): every component as big as the hub's (meta device)."""
    from synthmill.testing.full_size import build_random_pipeline

    pipe = build_random_pipeline(arch, device="meta")
    counts = {name: count_parameters(getattr(pipe, name))
              for name in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None}
    unet = {"sd15": 859_520_964, "sdxl": 2_567_463_684, "ssd-1b": 1_331_334_404}[arch]
    want = {"unet": unet, "vae": 83_653_863, "text_encoder": 123_060_480}  # CLIP ViT-L/14's text tower
    if arch != "sd15":
        want["text_encoder_2"] = 694_659_840  # OpenCLIP ViT-bigG/14's, with its projection
        assert pipe.vae.config.force_upcast and pipe.vae.config.scaling_factor == 0.13025
    assert counts == want
    assert pipe.tokenizer("a photo of a cat", padding="max_length").input_ids.__len__() == 77
