"""Shared fixtures: one real local Ray for the whole run, tiny pipelines saved once, spec writers."""

from __future__ import annotations

import glob
import hashlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COCO = REPO / "configs" / "prompts" / "coco2014_5k_captions.tsv"
PARTI = REPO / "configs" / "prompts" / "PartiPrompts.tsv"


def free_port() -> int:
    """A TCP port nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One real Ray cluster for the whole run (ray.cluster_utils: tests add and remove nodes).

    The head node has the machine's 2 CPUs; node failures are detected within a few seconds.
    CLI subprocesses join it through RAY_ADDRESS.
    """
    import ray
    from ray.cluster_utils import Cluster

    # Ray Train's controller polls its workers every 2 s by default; the suite's tiny runs take a few
    # seconds per attempt, so poll faster (processes started by this cluster inherit the variable).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # `ray job submit` entrypoints run the console scripts of this interpreter, as in an activated venv
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": True,  # its job server: tests/test_connect.py submits with `ray job submit`
            "dashboard_port": 0,
            "dashboard_agent_listen_port": free_port(),  # not Ray's fixed default: another Ray may hold that one
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        },
    )
    context = ray.init(address=cluster.address, log_to_driver=False)
    cluster.dashboard_url = "http://" + context.dashboard_url
    yield cluster
    ray.shutdown()
    cluster.shutdown()


# Benchmark smokes run in the background: one after another, in fresh interpreters at a low CPU priority, each
# on a local Ray of its own that it starts (so their actors run at that priority too and take no CPU from the
# session's Ray). They use the CPU time the other tests leave idle (waiting on Ray, on subprocesses, on sleeps);
# their tests run last and only read what the smokes printed.
BACKGROUND_SMOKES = {
    "test_extract_benchmark_smoke": ["-m", "benchmarks", "extract", "--smoke"],
    "test_fid_benchmark_smoke": ["-m", "benchmarks", "fid", "--smoke"],
    "test_driver_benchmark_smoke": ["-m", "benchmarks", "driver", "--smoke"],
    "test_startup_benchmark_smoke": ["-m", "benchmarks", "startup", "--smoke", "--s3"],
    "test_chaos_benchmark_smoke": ["-m", "benchmarks.chaos", "--smoke"],
    "test_generate_benchmark_smoke": ["-m", "benchmarks.generate", "--smoke"],
    "test_distill_benchmark_smoke": ["-m", "benchmarks", "distill", "--smoke"],
    "test_evaluate_all_benchmark_smoke": ["-m", "benchmarks", "evaluate-all", "--smoke"],
    "test_filter_benchmark_smoke": ["-m", "benchmarks", "filter", "--smoke"],
    "test_study_benchmark_smoke": ["-m", "benchmarks", "study", "--smoke"],
    "test_train_benchmark_smoke": ["-m", "benchmarks", "train", "--smoke"],
}
#: The background smokes' priority: low, yet not so low that their Rays' own processes starve outright.
BACKGROUND_NICE = 10
#: Seconds one background smoke may run (at a low priority, on a machine busy with the other tests).
BACKGROUND_TIMEOUT_S = 900


def pytest_collection_modifyitems(items: list) -> None:
    """The background smokes' tests run last, when their smokes have had the whole run to finish."""
    items.sort(key=lambda item: item.originalname in BACKGROUND_SMOKES)


class BackgroundChain:
    """Commands run one after another on a thread, each in a fresh interpreter at BACKGROUND_NICE, outputs to files."""

    def __init__(self, runs: dict[str, list[str]], folder: Path) -> None:
        import threading

        self.results: dict[str, tuple[int, str, str]] = {}
        self.done = {name: threading.Event() for name in runs}
        self.closing = threading.Event()
        self.proc = None
        self.ray_tmp = tempfile.mkdtemp(prefix="smk", dir="/tmp")
        self.thread = threading.Thread(target=self._run, args=(runs, folder), daemon=True)
        self.thread.start()

    def _run(self, runs: dict[str, list[str]], folder: Path) -> None:
        import subprocess

        # Their local Rays keep their files (and the "current cluster" address file that Ray's job server and
        # `ray.init()` read) out of /tmp/ray: a job submitted to the session's Ray must not find theirs.
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = self.ray_tmp  # short: Ray's socket paths must stay under 108 bytes
        # At low priority a local Ray's start and health checks wait for the CPU: Ray's bounds (30 s for a raylet
        # to register, ~15 s of missed health checks) are made to fit a busy machine
        env.setdefault("RAY_raylet_start_wait_time_s", "600")
        env.setdefault("RAY_health_check_failure_threshold", "100")
        for name, args in runs.items():
            if self.closing.is_set():
                break
            out, err = folder / f"{name}.out", folder / f"{name}.err"
            with open(out, "w", encoding="utf-8") as o, open(err, "w", encoding="utf-8") as e:
                self.proc = subprocess.Popen(["nice", "-n", str(BACKGROUND_NICE), sys.executable, *args], cwd=REPO,
                                             stdout=o, stderr=e, env=env, start_new_session=True)
                try:
                    code = self.proc.wait(timeout=BACKGROUND_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, 9)
                    self.proc.wait()
                    code = -9
            self.results[name] = (code, out.read_text(encoding="utf-8"), err.read_text(encoding="utf-8"))
            self.done[name].set()

    def result(self, name: str) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) of ``name`` once it ended (-9: killed after BACKGROUND_TIMEOUT_S)."""
        assert self.done[name].wait(timeout=len(self.done) * BACKGROUND_TIMEOUT_S), name
        return self.results[name]

    def close(self) -> None:
        self.closing.set()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
        self.thread.join()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def background_smokes(request, tmp_path_factory):
    """The BackgroundChain of the selected tests in BACKGROUND_SMOKES, started before the first test."""
    selected = {item.originalname for item in request.session.items}
    chain = BackgroundChain({name: args for name, args in BACKGROUND_SMOKES.items() if name in selected},
                            tmp_path_factory.mktemp("smokes"))
    yield chain
    chain.close()


@pytest.fixture(scope="session")
def ray_address(ray_cluster) -> str:
    return ray_cluster.address


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    """A tiny SD 1.x-layout pipeline folder (safetensors), saved with save_pretrained."""
    from synthmill.testing.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd", "sd", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    """A tiny SDXL-layout pipeline folder (two text encoders)."""
    from synthmill.testing.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", "sdxl", seed=0)


@pytest.fixture(scope="session")
def prompts_tsv(tmp_path_factory) -> str:
    """Eleven real prompts: nine COCO captions, one blank row, one PartiPrompts prompt over 77 tokens."""
    import csv

    with open(COCO, encoding="utf-8") as fh:
        coco = [row["caption"] for row in csv.DictReader(fh, delimiter="\t")][:9]
    with open(PARTI, encoding="utf-8") as fh:
        parti = [row["Prompt"] for row in csv.DictReader(fh, delimiter="\t")]
    long_prompt = max(parti, key=len)
    path = tmp_path_factory.mktemp("prompts") / "prompts.tsv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["id", "caption"])
        for i, text in enumerate(coco[:5] + ["   "] + coco[5:] + [long_prompt]):
            w.writerow([i, text])
    return str(path)


def base_spec(model: str, prompts: str, output: str) -> dict[str, Any]:
    """A small CPU generate spec (32x32, 2 steps) as a dict."""
    return {
        "kind": "generate",
        "model": {"path": model},
        "prompts": {"path": prompts, "column": "caption"},
        "sampling": {"steps": 2, "guidance_scale": 7.5, "height": 32, "width": 32, "seed": 1234,
                     "images_per_prompt": 2},
        "output": {"path": output, "samples_per_shard": 5},
        "cluster": {"num_actors": 2, "batch_size": 3},
    }


@pytest.fixture
def write_spec(tmp_path) -> Callable[[dict], str]:
    """Write a spec dict to a YAML file in the test's temp folder; return its path."""
    counter = iter(range(1000))

    def write(spec: dict) -> str:
        path = tmp_path / f"job{next(counter)}.yaml"
        path.write_text(yaml.safe_dump(spec), encoding="utf-8")
        return str(path)

    return write


def initial_malloc_env(pid: int | str = "self") -> dict[str, str]:
    """The MALLOC_* variables of the environment process ``pid`` started with (glibc reads them then only)."""
    with open(f"/proc/{pid}/environ", "rb") as fh:
        return dict(e.decode().split("=", 1) for e in fh.read().split(b"\0") if e.startswith(b"MALLOC_"))


def files_under(folder: str) -> dict[str, tuple[int, int]]:
    """relative path -> (inode, mtime_ns) of every file, to tell untouched files from rewritten ones."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            st = os.stat(os.path.join(root, n))
            out[os.path.relpath(os.path.join(root, n), folder)] = (st.st_ino, st.st_mtime_ns)
    return out


def run_job(write_spec: Callable[[dict], str], spec: dict, *overrides: str) -> dict:
    """Load, validate and run a generate job in this process (on the session's Ray)."""
    from synthmill.jobs import generate
    from synthmill.jobs.spec import load_spec

    return generate.run(generate.prepare(load_spec(write_spec(spec), overrides)))


def tar_hashes(output: str) -> dict[str, str]:
    """Shard tar name -> sha256, for a local output folder."""
    return {
        os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
        for p in sorted(glob.glob(os.path.join(output, "shards", "*.tar")))
    }


def read_wds(output: str) -> list[dict]:
    """Every sample of a local output's shards, in order, read by webdataset."""
    import webdataset as wds

    urls = sorted(glob.glob(os.path.join(output, "shards", "*.tar")))
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


@pytest.fixture(scope="session")
def reference(ray_address, tiny_sd, prompts_tsv, tmp_path_factory):
    """The reference job (22 samples, 5 shards, 2 actors): its spec dict and output folder."""
    from synthmill.jobs import generate
    from synthmill.jobs.spec import load_spec

    folder = tmp_path_factory.mktemp("reference")
    spec = base_spec(tiny_sd, prompts_tsv, str(folder / "out"))
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    summary = generate.run(generate.prepare(load_spec(str(path))))
    assert summary["status"] == "complete"
    return spec, spec["output"]["path"]


# ---- evaluate: random metric weights, image folders, and one evaluation shared by several modules ----

@pytest.fixture(scope="session")
def inception_file(tmp_path_factory) -> str:
    from synthmill.testing.random_weights import save_random_inception

    return save_random_inception(str(tmp_path_factory.mktemp("weights") / "inception.pth"), seed=0)


@pytest.fixture(scope="session")
def clip_model(tmp_path_factory) -> str:
    from synthmill.testing.random_weights import save_tiny_clip

    return save_tiny_clip(str(tmp_path_factory.mktemp("clip") / "tiny"), seed=0)


@pytest.fixture(scope="session")
def image_folders(reference, tmp_path_factory) -> tuple[str, str]:
    """(generated, real): the reference job's images as PNG files with .txt captions, and altered copies."""
    from PIL import Image, ImageFilter, ImageOps

    _, out = reference
    root = tmp_path_factory.mktemp("folders")
    gen, real = root / "generated", root / "real"
    gen.mkdir()
    real.mkdir()
    for s in read_wds(out):
        (gen / f"{s['__key__']}.png").write_bytes(s["png"])
        (gen / f"{s['__key__']}.txt").write_bytes(s["txt"])
        im = Image.open(io.BytesIO(s["png"])).convert("RGB")
        ImageOps.mirror(im).filter(ImageFilter.GaussianBlur(1)).save(real / f"{s['__key__']}.png")
    return str(gen), str(real)


def write_image_folder(folder, n: int, captions: bool = True) -> str:
    """A folder of ``n`` small 32x32 PNGs, each with a ``.txt`` caption beside it unless ``captions`` is false."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (40 * i % 256, 90, 160)).save(os.path.join(folder, f"{i:06d}.png"))
        if captions:
            Path(folder, f"{i:06d}.txt").write_text(f"a square of colour {i}", encoding="utf-8")
    return str(folder)


def eval_spec(generated: str, output: str, weights: str, clip: str, reference: str | None = None, **extra) -> dict:
    spec = {
        "kind": "evaluate",
        "generated": {"path": generated},
        "reference": {"path": reference},
        "metrics": ["fid", "is", "clip"] if reference else ["fid_stats", "is", "clip"],
        "fid": {"protocol": "pytorch-fid", "weights": weights},
        "clip": {"model": clip, "pretrained": None},
        "output": {"path": output},
        "cluster": {"num_actors": 2, "batch_size": 4},
    }
    for key, value in extra.items():
        section, _, name = key.partition("__")
        if name:
            spec[section][name] = value
        else:
            spec[section] = value
    return spec


def run_eval(write_spec, spec: dict) -> dict:
    from synthmill.jobs import evaluate
    from synthmill.jobs.spec import load_spec

    return evaluate.run(evaluate.prepare(load_spec(write_spec(spec))))


@pytest.fixture(scope="session")
def evaluated(reference, image_folders, inception_file, clip_model, tmp_path_factory):
    """FID / IS / CLIP of the reference job's shards (2 actors) against the real folder."""
    import yaml

    from synthmill.jobs import evaluate
    from synthmill.jobs.spec import load_spec

    _, out = reference
    folder = tmp_path_factory.mktemp("eval")
    spec = eval_spec(out, str(folder / "out"), inception_file, clip_model, image_folders[1])
    spec["reference"]["samples_per_unit"] = 8
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = evaluate.run(evaluate.prepare(load_spec(str(path))))
    return spec, result


# ---- the hub: a stand-in on 127.0.0.1 (tests/hubserver.py) for validation's hub checks ----

def point_hub_at(monkeypatch, url: str) -> None:
    """What HF_ENDPOINT=url does when huggingface_hub is imported (this process imported it long ago)."""
    from huggingface_hub import constants

    template = constants.HUGGINGFACE_CO_URL_TEMPLATE
    assert template.startswith(constants.ENDPOINT), template
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + template[len(constants.ENDPOINT):])
    monkeypatch.setattr(constants, "ENDPOINT", url)


@pytest.fixture
def hub(monkeypatch):
    """A hub stand-in (tests/hubserver.py) that validation's hub checks ask instead of huggingface.co."""
    from tests.hubserver import HubServer

    pipe = {"model_index.json"}
    server = HubServer({"org/pipe": {"main": pipe, "v1": pipe, "refs/pr/1": pipe},
                        "org/text-model": {"main": {"config.json"}}, "org/clip": {"main": {"open_clip_config.json"}}},
                       gated=frozenset({"org/gated"}), broken=frozenset({"org/broken"}))
    point_hub_at(monkeypatch, server.url)
    yield server
    server.close()
