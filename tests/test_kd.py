"""The distillation loss: its three terms, and feature taps that stay correct under DDP.

The DDP check runs two real gloo processes: each wraps the same seeded student in
``DistributedDataParallel`` (gradient checkpointing on, so blocks run again during backward) and
takes half of a batch; after backward, every process's gradients must equal the gradients of one
unwrapped process on the whole batch.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from synthmill.models.kd import DistillLoss, FeatureTaps, LossWeights, stage_pairs
from synthmill.models.students import make_student
from tests.test_students import _build, _tiny_sd_config, _tiny_sdxl_config


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread here; the setting is restored for the modules after this one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(n: int, sdxl: bool, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(n, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    cond = {"encoder_hidden_states": torch.randn(n, 7, 32, generator=g)}
    if sdxl:
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(n, 32, generator=g),
                                     "time_ids": torch.randn(n, 6, generator=g)}
    return noisy, t, cond, torch.randn(n, 4, 16, 16, generator=g)


@pytest.mark.parametrize("arch", ["bk-base", "bk-small", "bk-tiny", "ssd-1b", "vega"])
def test_terms_and_stage_pairs(arch):
    sdxl = arch in ("ssd-1b", "vega")
    teacher = _build(_tiny_sdxl_config() if sdxl else _tiny_sd_config(), seed=1).requires_grad_(False)
    student = make_student(teacher, arch).train()
    pairs = stage_pairs(student, teacher)
    if arch == "bk-tiny":  # no 4th stage: up block i is the teacher's i + 1; the last down block lost its downsampler
        assert ("up_blocks.0", "up_blocks.1") in pairs and ("down_blocks.2", "down_blocks.2") not in pairs
    if arch in ("bk-small", "bk-tiny"):
        assert "mid_block" not in [a for a, _ in pairs]
    loss = DistillLoss(student, teacher, LossWeights(1.0, 0.5, 2.0))
    noisy, t, cond, target = _batch(2, sdxl)
    total, terms = loss(noisy, t, cond, target)
    assert terms["loss_feature_kd"] > 0 and terms["loss_output_kd"] > 0
    weighted = terms["loss_task"] + 0.5 * terms["loss_output_kd"] + 2.0 * terms["loss_feature_kd"]
    assert abs(terms["loss"] - weighted) < 1e-5
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert sum(p.grad is not None for p in student.parameters()) > 0.9 * len(list(student.parameters()))


def test_taps_record_only_inside_the_with_block():
    teacher = _build(_tiny_sd_config(), seed=1)
    taps = FeatureTaps(teacher, ["up_blocks.1"])
    noisy, t, cond, _ = _batch(1, False)
    with torch.no_grad():
        teacher(noisy, t, **cond)
        assert taps.features == {}
        with taps as feats:
            teacher(noisy, t, **cond)
        assert list(feats) == ["up_blocks.1"]
        with pytest.raises(RuntimeError, match="ran twice"), taps:
            teacher(noisy, t, **cond)
            teacher(noisy, t, **cond)
    with pytest.raises(ValueError, match="no block named"):
        FeatureTaps(teacher, ["up_blocks.9"])


def _grads(student: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None}


def _setup(arch: str):
    torch.set_num_threads(1)
    teacher = _build(_tiny_sd_config(), seed=1).requires_grad_(False)
    student = make_student(teacher, arch).train()
    return teacher, student


def _ddp_worker(rank: int, world: int, port: int, arch: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        teacher, student = _setup(arch)
        student.enable_gradient_checkpointing()
        model = DDP(student)
        loss = DistillLoss(model, teacher, LossWeights())  # taps resolve through the wrapper
        noisy, t, cond, target = _batch(4, False)
        half = slice(2 * rank, 2 * rank + 2)
        part = {k: v[half] for k, v in cond.items()}
        total, _ = loss(noisy[half], t[half], part, target[half])
        total.backward()
        torch.save(_grads(student), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("arch", ["bk-small"])
def test_feature_kd_under_ddp_equals_one_process(arch, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), arch, str(tmp_path)), nprocs=2, join=True)
    teacher, student = _setup(arch)
    loss = DistillLoss(student, teacher, LossWeights())
    noisy, t, cond, target = _batch(4, False)
    total, _ = loss(noisy, t, cond, target)
    total.backward()
    want = _grads(student)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == want.keys()
        worst = max(float((got[k] - want[k]).abs().max() / (want[k].abs().max() + 1e-12)) for k in want)
        assert worst < 1e-4, (rank, worst)
