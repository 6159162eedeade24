"""Evaluate jobs against the reference libraries, on identical images and an identical weights file.

The real Inception and CLIP weights cannot be downloaded here, so seeded random weights of the same
networks are saved to files and loaded through the same paths that load the real ones: our scorer
through ``fid.weights`` / ``clip.model: local-dir:``; pytorch-fid through torch.hub's cache (where it
looks for the standard file), torch-fidelity through ``feature_extractor_weights_path``, open_clip
through ``create_model_and_transforms``. The generated set is the session's reference generate job
(22 samples in 5 shards, one caption over 77 tokens); the real set is a folder of altered copies.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import tarfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from synthmill.cli import main
from tests.conftest import eval_spec, run_eval, write_image_folder

pytestmark = pytest.mark.slow


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_fid_matches_pytorch_fid(evaluated, image_folders, inception_file, tmp_path, monkeypatch):
    """Same images, same weights file: pytorch-fid's own pipeline gives the same FID and statistics."""
    from pytorch_fid import fid_score
    from pytorch_fid.inception import FID_WEIGHTS_URL

    spec, result = evaluated
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    shutil.copy(inception_file, hub / os.path.basename(FID_WEIGHTS_URL))  # where torch.hub looks first
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    gen, real = image_folders
    # calculate_fid_given_paths is these two calls per path and one Frechet distance; made separately so
    # that the statistics are computed once (each sqrtm of 2048x2048 takes seconds here)
    from pytorch_fid.inception import InceptionV3

    model = InceptionV3([3]).eval()
    mu, sigma = fid_score.compute_statistics_of_path(gen, model, 50, 2048, "cpu", 0)
    mu_r, sigma_r = fid_score.compute_statistics_of_path(real, model, 50, 2048, "cpu", 0)
    theirs = fid_score.calculate_frechet_distance(mu, sigma, mu_r, sigma_r)
    ours = result["metrics"]["fid"]
    assert ours > 0.01, "a FID this small would not test anything"
    assert _relative(ours, theirs) <= 1e-4, (ours, theirs)

    # The statistics themselves, and fid_stats.npz / reference_stats.npz as pytorch-fid reads them.
    out = spec["output"]["path"]
    for path, (m, s) in (("fid_stats.npz", (mu, sigma)), ("reference_stats.npz", (mu_r, sigma_r))):
        m_ours, s_ours = fid_score.compute_statistics_of_path(os.path.join(out, path), model, 50, 2048, "cpu")
        assert np.abs(m_ours - m).max() <= 1e-5 * np.abs(m).max(), path
        assert np.abs(s_ours - s).max() <= 1e-4 * np.abs(s).max(), path


def test_inception_score_matches_torch_fidelity(evaluated, image_folders, inception_file):
    import torch_fidelity

    _, result = evaluated
    theirs = torch_fidelity.calculate_metrics(
        input1=image_folders[0], isc=True, isc_splits=10, cuda=False, cache=False, verbose=False,
        feature_extractor_weights_path=inception_file, samples_find_ext="png")
    ours = result["metrics"]["inception_score"]
    assert ours["mean"] > 1.05, "an IS of 1 would not test anything"
    assert _relative(ours["mean"], theirs["inception_score_mean"]) <= 1e-3
    assert _relative(ours["std"], theirs["inception_score_std"]) <= 1e-2


def test_clip_score_matches_open_clip(evaluated, image_folders, clip_model):
    import open_clip
    import torch
    from PIL import Image

    _, result = evaluated
    model, _, preprocess = open_clip.create_model_and_transforms(clip_model)
    tokenizer = open_clip.get_tokenizer(clip_model)
    cos = []
    for png in sorted(glob.glob(os.path.join(image_folders[0], "*.png"))):
        caption = open(png[:-4] + ".txt", encoding="utf-8").read()
        with torch.no_grad():
            a = model.encode_image(preprocess(Image.open(png).convert("RGB"))[None])
            b = model.encode_text(tokenizer([caption]))
        cos.append(torch.nn.functional.cosine_similarity(a, b).item())
    m = result["metrics"]
    assert abs(m["clip_score"] - np.mean(cos)) <= 1e-4 * max(abs(np.mean(cos)), 1e-3)
    assert abs(m["clip_score_x100"] - np.mean(100 * np.clip(cos, 0, None))) <= 1e-2
    assert m["clip_truncated_captions"] == 2  # the PartiPrompts prompt, twice (images_per_prompt 2)
    assert result["samples"] == {"generated": 22, "reference": 22}


def test_merge_over_actors_equals_one_pass(evaluated, reference, inception_file):
    """Per-unit float64 sums merged by the driver = mean and covariance of all features at once."""
    from PIL import Image

    from synthmill.metrics import weights
    from synthmill.metrics.frechet import frechet_distance
    from synthmill.metrics.inception import InceptionExtractor

    spec, result = evaluated
    _, out = reference
    import torch

    net = InceptionExtractor(weights.load_state_dict(inception_file), inception_file, "pytorch-fid", True, False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors (cluster.cpus_per_actor): CPU kernels differ by thread count
    feats = []
    for tar in sorted(glob.glob(os.path.join(out, "shards", "*.tar"))):  # the job's batches: 4 per unit
        import webdataset as wds

        images = [np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"))
                  for s in wds.WebDataset(tar, shardshuffle=False, empty_check=False)]
        feats += [net.fid_features(images[i:i + 4]).astype(np.float64) for i in range(0, len(images), 4)]
    torch.set_num_threads(threads)
    x = np.concatenate(feats)
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    rows = []  # a unit of a few images commits its float32 feature rows (8 KiB each), not 32 MiB of sums
    for k in range(5):
        with np.load(os.path.join(spec["output"]["path"], "partials", "generated", f"{k:06d}.npz")) as part:
            assert "outer" not in part.files and part["features"].dtype == np.float32
            rows.append(part["features"])
    assert np.array_equal(np.concatenate(rows).astype(np.float64), x)
    with np.load(os.path.join(spec["output"]["path"], "reference_stats.npz")) as ref:
        one_pass = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
    with np.load(os.path.join(spec["output"]["path"], "fid_stats.npz")) as st:
        assert np.abs(st["mu"] - mu).max() <= 1e-12 * np.abs(mu).max()
        assert np.abs(st["sigma"] - sigma).max() <= 1e-9 * np.abs(sigma).max()
        assert int(st["n"]) == 22 and str(st["protocol"]) == "pytorch-fid"
    assert _relative(result["metrics"]["fid"], one_pass) <= 1e-9


def test_a_unit_keeps_its_feature_rows_until_the_sums_are_smaller():
    """Rows while they are fewer than 2 * d, then float64 sums; the driver's merge of any mix of the two
    forms (and of partials written as sums by earlier versions) equals one pass over all rows."""
    from synthmill.metrics.frechet import GaussianSums, UnitFeatures

    d = 8
    rng = np.random.default_rng(3)
    units = [rng.random((n, d), dtype=np.float32) for n in (3, 15, 16, 40)]
    arrays = []
    for x in units:
        u = UnitFeatures(d)
        for lo in range(0, len(x), 5):  # batches of 5
            u.add(x[lo:lo + 5])
        arrays.append(dict(u.arrays(), n=np.array(len(x))))
    assert [sorted(a) for a in arrays] == [["features", "n"], ["features", "n"],
                                           ["n", "outer", "sum"], ["n", "outer", "sum"]]
    assert np.array_equal(arrays[1]["features"], units[1])
    assert UnitFeatures(d).arrays()["features"].shape == (0, d)
    merged, one_pass = GaussianSums.empty(d), GaussianSums.empty(d)
    for a in arrays:
        merged.merge_unit(a)
    one_pass.add(np.concatenate(units))
    assert merged.n == one_pass.n == 74
    for got, want in zip(merged.mean_cov(), one_pass.mean_cov(), strict=True):
        assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()


def test_partials_are_read_ahead_on_threads_and_parsed_by_the_caller(tmp_path, monkeypatch):
    """The merge reads the next units' npz bytes on threads but parses each in its own thread: numpy parses
    npz headers with ast.literal_eval, which CPython 3.11 can break on several threads at once ("SystemError: AST
    constructor recursion depth mismatch" was seen once in ~20 merges)."""
    from synthmill.metrics import partials

    rng = np.random.default_rng(0)
    units = [rng.random((3, 4), dtype=np.float32) for _ in range(6)]
    for k, x in enumerate(units):
        partials.commit(str(tmp_path), "generated", k, {"features": x}, {"identity": str(k)})
    parsed_on, real_load = [], np.load

    def spying_load(*a, **kw):
        parsed_on.append(threading.current_thread())
        return real_load(*a, **kw)

    monkeypatch.setattr(np, "load", spying_load)
    got = [part["features"] for part in partials.load_in_order(str(tmp_path), "generated", range(6))]
    assert all(np.array_equal(a, b) for a, b in zip(got, units, strict=False)) and len(got) == 6
    assert parsed_on == [threading.current_thread()] * 6


def test_metrics_json_records_how(evaluated, inception_file):
    spec, result = evaluated
    on_disk = json.load(open(os.path.join(spec["output"]["path"], "metrics.json")))
    assert on_disk["metrics"] == json.loads(json.dumps(result["metrics"]))
    assert on_disk["protocol"]["fid"] == "pytorch-fid" and "bilinear" in on_disk["protocol"]["fid_preprocessing"]
    assert on_disk["protocol"]["tf32"] is False
    from synthmill.metrics.weights import sha256_file

    assert on_disk["weights"]["sha256"] == sha256_file(inception_file) and on_disk["weights"]["standard"] is False
    for pkg in ("pytorch-fid", "torch-fidelity", "open_clip_torch", "torch"):
        assert on_disk["versions"][pkg] != "not installed"
    assert on_disk["units"] == {"generated": 5, "reference": 3}


def test_resume_rescores_only_damaged_units(evaluated, write_spec):
    """Delete one marker and truncate another unit's npz: a rerun scores those two and nothing else."""
    spec, first = evaluated
    part = os.path.join(spec["output"]["path"], "partials", "generated")
    before = {f: os.stat(os.path.join(part, f)).st_mtime_ns for f in os.listdir(part)}
    os.unlink(os.path.join(part, "000001.json"))
    with open(os.path.join(part, "000003.npz"), "r+b") as fh:
        fh.truncate(100)
    # a run killed inside metrics.json's or a partial's write left their temporaries: this run removes them
    dead = [os.path.join(spec["output"]["path"], "metrics.json.tmp-" + "cd" * 16),
            os.path.join(part, "000002.npz.tmp-" + "ef" * 16)]
    for path in dead:
        open(path, "wb").close()
        os.utime(path, (time.time() - 60, time.time() - 60))
    again = run_eval(write_spec, dict(spec, cluster=dict(spec["cluster"], num_actors=1)))  # 1 actor, 2 units
    assert not any(map(os.path.exists, dead))
    assert again["units_run"] == 2 and again["units_resumed"] == 6
    assert again["metrics"] == first["metrics"]  # bit for bit
    for name in ("000000.npz", "000002.npz", "000004.npz"):
        assert os.stat(os.path.join(part, name)).st_mtime_ns == before[name]


def test_reference_stats_file_and_protocol_mismatch(evaluated, reference, inception_file, clip_model, write_spec,
                                                    tmp_path, capsys):
    """A stats .npz written by synthmill is a reusable reference, and it refuses another protocol."""
    spec, first = evaluated
    stats = os.path.join(spec["output"]["path"], "reference_stats.npz")
    again = eval_spec(reference[1], str(tmp_path / "out"), inception_file, clip_model, stats, metrics=["fid"],
                      cluster={"num_actors": 1, "batch_size": 4})
    result = run_eval(write_spec, again)
    assert _relative(result["metrics"]["fid"], first["metrics"]["fid"]) <= 1e-12
    assert result["metrics"]["fid_reference"]["kind"] == "stats"
    assert os.listdir(tmp_path / "out" / "partials") == ["generated"]  # no reference images were scored
    clean = dict(again, fid={"protocol": "clean", "weights": inception_file}, output={"path": str(tmp_path / "o2")})
    assert main(["run", write_spec(clean)]) == 2
    err = capsys.readouterr().err
    assert "protocol='pytorch-fid'" in err and "reference.path" in err
    assert not os.path.exists(tmp_path / "o2")
    # stats of images at their own size (resize_to null, stored as 0) are named as the spec says it
    resized = dict(again, fid={"weights": inception_file, "resize_to": 64}, output={"path": str(tmp_path / "o3")})
    assert main(["run", write_spec(resized)]) == 2
    err = capsys.readouterr().err
    assert "was computed with fid.resize_to=None, this job uses fid.resize_to=64; " in err, err
    assert not os.path.exists(tmp_path / "o3")


def test_clean_protocol_resizes_like_clean_fid(image_folders):
    """The clean protocol's resize is clean-fid's own resizer, bit for bit."""
    from cleanfid.resize import make_resizer
    from PIL import Image

    from synthmill.metrics.inception import _clean_resize

    theirs = make_resizer("PIL", False, "bicubic", (299, 299))
    for png in sorted(glob.glob(os.path.join(image_folders[0], "*.png")))[:3]:
        im = np.asarray(Image.open(png).convert("RGB"))
        assert np.array_equal(_clean_resize(im), theirs(im))


def test_folder_with_resize_and_clean_protocol(image_folders, inception_file, clip_model, write_spec, tmp_path):
    """An image folder, clean protocol and resize_to: stats differ from pytorch-fid's and are recorded."""
    gen, real = image_folders
    mixed = tmp_path / "mixed"
    shutil.copytree(gen, mixed)
    from PIL import Image

    Image.open(os.path.join(gen, "0000000000.png")).resize((40, 24)).save(mixed / "0000000000.png")
    spec = eval_spec(str(mixed), str(tmp_path / "out"), inception_file, clip_model, metrics=["fid_stats", "clip"],
                     fid={"protocol": "clean", "resize_to": 48, "weights": inception_file},
                     generated__samples_per_unit=10, cluster={"num_actors": 1, "batch_size": 4})
    result = run_eval(write_spec, spec)
    assert result["protocol"]["fid"] == "clean" and result["protocol"]["resize_to"] == 48
    assert result["units"] == {"generated": 3} and result["samples"] == {"generated": 22}
    with np.load(tmp_path / "out" / "fid_stats.npz") as st:
        assert str(st["protocol"]) == "clean" and int(st["resize_to"]) == 48 and np.isfinite(st["sigma"]).all()
    assert "fid" not in result["metrics"] and "clip_score" in result["metrics"]


class _Server:
    """A local HTTP server for weight downloads, counting requests."""

    def __init__(self, folder: str):
        hits = self.hits = []

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=folder, **k)

            def do_GET(self):
                hits.append(self.path)
                super().do_GET()

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_weights_from_url_are_checked_and_cached(inception_file, tmp_path, monkeypatch):
    from synthmill.metrics import weights

    monkeypatch.setenv("SYNTHMILL_CACHE", str(tmp_path / "cache"))
    srv = _Server(os.path.dirname(inception_file))
    try:
        url = f"{srv.url}/{os.path.basename(inception_file)}"
        digest = weights.sha256_file(inception_file)
        with pytest.raises(weights.WeightsError, match="expected deadbeef"):
            weights.resolve(url, "deadbeef")
        assert glob.glob(str(tmp_path / "cache" / "weights" / "*.pth")) == []  # a wrong file is never cached
        path, got = weights.resolve(url, digest[:12])
        assert got == digest and open(path, "rb").read() == open(inception_file, "rb").read()
        n = len(srv.hits)
        assert weights.resolve(url, digest) == (path, digest)
        assert len(srv.hits) == n  # second time from the cache
    finally:
        srv.close()


# ---- bad input: exit 2, one line naming the field or file, nothing written ----

def _tar_with_odd_size(folder, gen):
    """Two tars: the generated PNGs, and one image of another size."""
    from PIL import Image

    pngs = sorted(glob.glob(os.path.join(gen, "*.png")))
    for i, chunk in enumerate((pngs[:6], pngs[6:10])):
        with tarfile.open(folder / f"part{i}.tar", "w") as tf:
            for p in chunk:
                tf.add(p, arcname=os.path.basename(p))
                tf.add(p[:-4] + ".txt", arcname=os.path.basename(p)[:-4] + ".txt")
    odd = folder / "odd"
    odd.mkdir()
    Image.new("RGB", (40, 24), (10, 20, 30)).save(odd / "9999999999.png")
    with tarfile.open(folder / "part2.tar", "w") as tf:
        tf.add(odd / "9999999999.png", arcname="9999999999.png")
    return str(folder / "part*.tar")


BAD = {
    "missing reference": (lambda c: {"reference": {"path": c["tmp"] + "/nowhere"}}, "reference.path", "not found"),
    "fid without reference": (lambda c: {"reference": {"path": None}}, "reference.path", "fid_stats"),
    "too few for IS": (lambda c: {"inception_score": {"splits": 50}}, "generated.path",
                       "is needs at least 50 samples"),
    "unknown protocol": (lambda c: {"fid": {"protocol": "tf-fid", "weights": c["weights"]}}, "fid.protocol", "clean"),
    "wrong weights hash": (lambda c: {"fid": {"weights": c["weights"], "weights_sha256": "deadbeef"}},
                           "fid.weights", "expected deadbeef"),
    "weights not a state dict": (lambda c: {"fid": {"weights": c["gen_spec"]}}, "fid.weights", "state dict"),
    "unknown clip model": (lambda c: {"clip": {"model": "ViT-G-15", "pretrained": None}}, "clip.model", "did you mean"),
    "mixed sizes in a folder": (lambda c: {"generated": {"path": c["mixed"]}}, "0000000003.png", "mixed sizes"),
    "stats without sigma": (lambda c: {"reference": {"path": c["bad_npz"]}}, "reference.path", "'sigma'"),
    "unknown metric": (lambda c: {"metrics": ["fid", "kdi"]}, "metrics[1]", "known"),
}


@pytest.fixture
def bad_context(reference, image_folders, inception_file, tmp_path):
    from PIL import Image

    mixed = tmp_path / "mixed"
    shutil.copytree(image_folders[0], mixed)
    Image.new("RGB", (40, 24)).save(mixed / "0000000003.png")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(2048))
    return {"tmp": str(tmp_path), "weights": inception_file, "gen_spec": os.path.join(reference[1], "plan.json"),
            "mixed": str(mixed), "bad_npz": str(tmp_path / "bad.npz")}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, bad_context, reference, image_folders, inception_file, clip_model, write_spec, capsys):
    change, where, what = BAD[case]
    out = os.path.join(bad_context["tmp"], "out")
    spec = eval_spec(reference[1], out, inception_file, clip_model, image_folders[1])
    for section, value in change(bad_context).items():
        spec[section] = dict(spec.get(section, {}), **value) if isinstance(value, dict) else value
    assert main(["run", write_spec(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("synthmill: error:") and where in err and what in err, err
    assert not os.path.exists(out)


def _images(tmp, bad_image: str | None = None, caption: bytes | None = None) -> str:
    """Three 32x32 PNGs with captions; ``bad_image`` replaced by bytes that are no image, the first caption by
    ``caption``."""
    folder = write_image_folder(tmp / "images", 3)
    if bad_image:
        Path(folder, bad_image).write_bytes(b"not an image")
    if caption is not None:
        Path(folder, "000000.txt").write_bytes(caption)
    return folder


def _file(tmp, name: str, data: bytes) -> str:
    tmp.mkdir(exist_ok=True)
    (tmp / name).write_bytes(data)
    return str(tmp / name)


def _tar(path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def _npz(tmp, name: str, **arrays) -> str:
    np.savez(tmp / name, **arrays)
    return str(tmp / name)


def _generate_output(tmp, plan: dict | str, job_yaml: str | None = None) -> str:
    """A folder that looks like a generate job's output: ``plan``, ``job_yaml``, one committed shard of two PNGs."""
    import hashlib

    from PIL import Image

    out = tmp / "gen_output"
    (out / "shards").mkdir(parents=True)
    (out / "index").mkdir()
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, "PNG")
    tar = Path(_tar(out / "shards" / "000000.tar", {"a.png": png.getvalue(), "a.txt": b"a", "b.png": png.getvalue()}))
    marker = {"shard": 0, "fingerprint": "f", "size": tar.stat().st_size, "count": 2,
              "sha256": hashlib.sha256(tar.read_bytes()).hexdigest()}
    (out / "shards" / "000000.json").write_text(json.dumps(marker))
    (out / "index" / "000000.parquet").write_bytes(b"")
    (out / "plan.json").write_text(plan if isinstance(plan, str) else json.dumps({"fingerprint": "f", **plan}))
    if job_yaml is not None:
        (out / "job.yaml").write_text(job_yaml)
    return str(out)


# Files that cannot be read as what they stand for: the field given them, how the test makes one in tmp_path,
# and what the error line says. All are found by validation: no network loads, no Ray.
BAD_FILES = {
    "unreadable first image": ("generated", lambda t: _images(t, bad_image="000000.png"),
                               ["000000.png: not a readable image (UnidentifiedImageError)"]),
    "unreadable later image": ("generated", lambda t: _images(t, bad_image="000002.png"),
                               ["000002.png: not a readable image"]),
    "tar of unreadable images": ("generated", lambda t: _tar(t / "g.tar", {"0.png": b"no image", "0.txt": b"a"}),
                                 ["g.tar:0: not a readable image"]),
    "not a tar": ("generated", lambda t: _file(t, "fake.tar", b"this is not a tar file"),
                  ["fake.tar: not a readable tar file"]),
    "a file, not a folder": ("generated", lambda t: os.path.join(_images(t), "000000.png"),
                             ["000000.png: not a folder, a .tar or a glob of tars"]),
    "caption not UTF-8": ("generated", lambda t: _images(t, caption=b"\xff\xfe bad"),
                          ["000000.png: its caption (.txt) is not UTF-8 text"]),
    "plan.json not JSON": ("generated", lambda t: _generate_output(t, "{not json"),
                           ["plan.json: damaged, not a JSON document"]),
    "plan.json without shards": ("generated", lambda t: _generate_output(t, {"kind": "generate"}),
                                 ['plan.json: "shards" is None, not a positive whole number']),
    "plan.json shards not a number": ("generated", lambda t: _generate_output(t, {"kind": "generate", "shards": "x"}),
                                      ['plan.json: "shards" is \'x\'']),
    "plan.json with no shards": ("generated", lambda t: _generate_output(t, {"kind": "generate", "shards": 0}),
                                 ['plan.json: "shards" is 0']),
    "job.yaml width not a number": ("generated", lambda t: _generate_output(t, {"kind": "generate", "shards": 1},
                                                                          "sampling: {width: abc, height: 32}"),
                                    ["job.yaml: field 'sampling.width'", "could not be converted to Integer"]),
    "stats of strings": ("reference", lambda t: _npz(t, "s.npz", mu=np.array(["a"] * 3), sigma=np.zeros((3, 3))),
                         ["s.npz: mu holds str", "values, not real numbers"]),
    "stats of complex numbers": ("reference", lambda t: _npz(t, "c.npz", mu=np.zeros(3, complex), sigma=np.zeros(1)),
                                 ["c.npz: mu holds complex128 values"]),
    "stats file a folder": ("reference", lambda t: write_image_folder(t / "dir.npz", 1),
                            ["dir.npz: cannot read it (Is a directory)"]),
    "empty weights file": ("fid.weights", lambda t: _file(t, "empty.pth", b""), ["empty.pth: an empty file"]),
    "weights of another network": ("fid.weights", lambda t: _torch_file(t, "other.pth", {"w": np.zeros(1)}),
                                   ["other.pth: not the weights of the FID Inception network (Missing key(s)"]),
    "sigma not a covariance": ("reference", lambda t: _npz(t, "neg.npz", mu=np.zeros(2048), sigma=-np.eye(2048)),
                               ["neg.npz: sigma is not a covariance matrix"]),
    "protocol an array": ("reference", lambda t: _npz(t, "meta.npz", mu=np.zeros(2048), sigma=np.eye(2048),
                                                      protocol=np.array(["a", "b"])),
                          ["meta.npz: 'protocol' is an array of shape (2,)"]),
    "clip config not JSON": ("clip.model", lambda t: "local-dir:" + os.path.dirname(
        _file(t / "clip", "open_clip_config.json", b"{not json")), ["open_clip_config.json cannot be read"]),
}


def _torch_file(tmp, name: str, arrays: dict) -> str:
    import torch

    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, tmp / name)
    return str(tmp / name)


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_input_files(case, inception_file, write_spec, tmp_path, capsys):
    field, make, needles = BAD_FILES[case]
    bad = make(tmp_path)
    out = str(tmp_path / "out")
    spec = eval_spec(write_image_folder(tmp_path / "gen", 3), out, inception_file, "ViT-B-32", metrics=["fid_stats"])
    if field == "fid.weights":
        spec["fid"]["weights"] = bad
    elif field == "clip.model":
        spec["clip"]["model"], spec["metrics"] = bad, ["clip"]
    else:
        spec[field]["path"] = bad
        if field == "reference":
            spec["metrics"] = ["fid"]
    assert main(["run", write_spec(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([ln for ln in err if ln.startswith("synthmill: error:")]) == 1, err
    assert err[-1].startswith(f"synthmill: error: {field}") and all(n in err[-1] for n in needles), err[-1]
    assert not os.path.exists(out)


def test_weights_error_with_an_empty_message(tmp_path, monkeypatch):
    """torch.load may fail with an empty message: the error still says what failed, in one line."""
    import torch

    from synthmill.metrics import weights

    def fail(*args, **kwargs):
        raise EOFError()

    (tmp_path / "w.pth").write_bytes(b"x")
    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(weights.WeightsError, match=r"w\.pth: not a PyTorch state dict of plain tensors \(EOFError"):
        weights.load_state_dict(str(tmp_path / "w.pth"))


@pytest.mark.parametrize("model, needle", [
    ("hf-hub:org/clip", None),
    ("hf-hub:org/no-such-clip", "clip.model hf-hub:org/no-such-clip: no such model on http://127.0.0.1:"),
    ("hf-hub:org/pipe", "clip.model hf-hub:org/pipe: not an open_clip model (no open_clip_config.json on "),
])
def test_hf_hub_clip_model_is_asked_of_the_hub(model, needle, hub, image_folders, write_spec, tmp_path, capsys):
    """An ``hf-hub:`` CLIP model is checked at validate by one HEAD request for its open_clip_config.json
    (tests/hubserver.py answers as the hub does); before, a mistyped one failed on the actors."""
    out = tmp_path / "out"
    path = write_spec(eval_spec(image_folders[0], str(out), "", model, metrics=["clip"]))
    for command in ("validate",) if needle is None else ("validate", "run"):
        code = main([command, path])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == (0 if needle is None else 2), (command, err)
        assert needle is None or err[-1].startswith(f"synthmill: error: {needle}"), err
        assert not os.path.exists(out)
    assert hub.model_requests()
    assert set(hub.model_requests()) == {f"/{model[len('hf-hub:'):]}/resolve/main/open_clip_config.json"}


def test_clip_without_captions_is_refused_at_validate_time(clip_model, write_spec, tmp_path, capsys):
    """The first sample to be CLIP-scored must have a caption: exit 2 naming it from validate, before a network
    loads or anything is written (a caption missing further on is found while scoring)."""
    import webdataset as wds

    folder = write_image_folder(tmp_path / "bare", 3, captions=False)
    with wds.TarWriter(str(tmp_path / "bare.tar")) as w:
        w.write({"__key__": "000000", "png": open(os.path.join(folder, "000000.png"), "rb").read()})
    for generated, first in ((folder, os.path.join(folder, "000000.png")),
                             (str(tmp_path / "bare.tar"), "bare.tar:000000")):
        out = tmp_path / "out"
        path = write_spec(eval_spec(generated, str(out), "", clip_model, metrics=["clip"]))
        for command in ("validate", "run"):
            assert main([command, path]) == 2, (generated, command)
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert err.startswith("synthmill: error: generated.path") and first in err and "no caption" in err, err
            assert not os.path.exists(out)


def test_mixed_sizes_inside_tars_fail_while_scoring(image_folders, inception_file, clip_model, write_spec, tmp_path,
                                                    capsys):
    """Sizes inside foreign tars are only seen while scoring: still exit 2 naming the image, no metrics."""
    pattern = _tar_with_odd_size(tmp_path, image_folders[0])
    out = tmp_path / "out"
    spec = eval_spec(pattern, str(out), inception_file, clip_model, metrics=["fid_stats"],
                     cluster={"num_actors": 1, "batch_size": 4})
    assert main(["run", write_spec(spec)]) == 2
    err = capsys.readouterr().err
    assert "part2.tar:9999999999" in err and "40x24" in err and "mixed sizes" in err
    assert not os.path.exists(out / "metrics.json") and not os.path.exists(out / "fid_stats.npz")


def test_incomplete_generate_output_is_refused(reference, inception_file, clip_model, write_spec, tmp_path, capsys):
    copy = tmp_path / "gen"
    shutil.copytree(reference[1], copy)
    os.unlink(copy / "shards" / "000002.json")
    spec = eval_spec(str(copy), str(tmp_path / "out"), inception_file, clip_model, metrics=["is"])
    assert main(["run", write_spec(spec)]) == 2
    err = capsys.readouterr().err
    assert "not complete (4 of 5 shards committed)" in err and "generated.path" in err


def test_status_of_an_evaluate_output(evaluated, capsys):
    spec, result = evaluated
    assert main(["status", spec["output"]["path"], "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["kind"] == "evaluate" and st["complete"] is True
    assert st["sets"]["generated"] == {"units_done": 5, "units": 5, "samples": 22}
    assert st["metrics"]["fid"] == result["metrics"]["fid"]
    assert main(["status", spec["output"]["path"]]) == 0
    assert "generated  5 / 5 units scored (22 samples)" in capsys.readouterr().out


def test_validate_and_dry_run_of_an_evaluate_spec(evaluated, write_spec, capsys):
    """Both read inputs and the output's partials, score nothing and write nothing."""
    spec, _ = evaluated
    out = spec["output"]["path"]
    def stamps() -> dict[str, int]:
        return {os.path.join(root, f): os.stat(os.path.join(root, f)).st_mtime_ns
                for root, _, files in os.walk(out) for f in files}

    before = stamps()
    path = write_spec(spec)
    assert main(["validate", path]) == 0
    assert "ok: " in capsys.readouterr().out
    assert main(["run", path, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["generated"]["units_done"] == 5 and plan["generated"]["samples"] == 22
    assert plan["reference"]["units"] == 3 and plan["reference"]["kind"] == "folder"
    assert stamps() == before


def test_weights_check_is_quiet_and_captions_are_read_only_for_clip(inception_file, tmp_path):
    """Validation builds the FID network on the meta device to compare keys and shapes: without a warning
    per tensor (there were 566). A caption that is not UTF-8 fails only what reads captions (clip, distill):
    the samples of an FID or IS pass come without them."""
    import warnings

    from synthmill.distill.data import BadData, _samples
    from synthmill.metrics import weights
    from synthmill.metrics.inception import check_fid_inception
    from synthmill.sharding.images import ImageSetError, iter_unit, open_image_set

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_fid_inception(weights.load_state_dict(inception_file), inception_file)
    assert [str(w.message) for w in caught] == []
    unit = open_image_set(_images(tmp_path, caption=b"\xff\xfe bad")).units[0]
    assert [s.caption for s in iter_unit(unit, captions=False)] == [None] * 3
    with pytest.raises(ImageSetError, match="caption .* is not UTF-8 text"):
        list(iter_unit(unit))
    with pytest.raises(BadData, match=r"^data.path: .*000000.png: its caption \(.txt\) is not UTF-8 text"):
        list(_samples(unit, None))


def test_a_folder_image_or_caption_rewritten_in_place_changes_its_units_identity(tmp_path):
    """A resumed evaluation reuses a unit's partial only for the same input: an image rewritten at the same
    size (a BMP of other colours) or an edited caption gives its unit another identity; the other units and
    an unchanged folder keep theirs."""
    from PIL import Image

    from synthmill.sharding.images import open_image_set

    for i in range(4):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.bmp")
        (tmp_path / f"{i}.txt").write_text(f"caption {i}", encoding="utf-8")

    def identities() -> list[str]:
        return [u.identity for u in open_image_set(str(tmp_path), samples_per_unit=2).units]

    first = identities()
    assert len(set(first)) == 2 and identities() == first
    size = os.path.getsize(tmp_path / "3.bmp")
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "3.bmp")
    os.utime(tmp_path / "3.bmp",
             ns=(os.stat(tmp_path / "3.bmp").st_atime_ns, os.stat(tmp_path / "3.bmp").st_mtime_ns + 10**9))
    assert os.path.getsize(tmp_path / "3.bmp") == size
    second = identities()
    assert second[0] == first[0] and second[1] != first[1]
    (tmp_path / "0.txt").write_text("caption X", encoding="utf-8")  # same size, other words
    os.utime(tmp_path / "0.txt", ns=(0, os.stat(tmp_path / "0.txt").st_mtime_ns + 10**9))
    third = identities()
    assert third[0] != second[0] and third[1] == second[1]
