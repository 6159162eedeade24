"""CMMD (``cmmd``): the MMD of CLIP image embeddings with a Gaussian RBF kernel (Jayasumana et al., 2024).

The network is open_clip's, named by ``cmmd.model`` / ``cmmd.pretrained`` (the paper's: ViT-L/14 at 336 px,
OpenAI weights), with the model's own eval transform. Each unit keeps its images' float32 embeddings in
sample order; the driver concatenates them in unit order, normalises each to unit length in float64 and
computes the MMD over all pairs, block by block with float64 sums, so the number does not depend on the
number of actors.

The formula is the reference implementation's (google-research/cmmd, ``distance.mmd``): with
``k(x, y) = exp(-|x - y|^2 / (2 sigma^2))``, sigma 10,

    cmmd = 1000 * (mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j))

where each mean runs over all pairs, the diagonal included (the biased, V-statistic estimate). The paper's
equation is the unbiased one, leaving out the diagonal terms (``k(x_i, x_i) = 1``) of the within-set
means: that is ``cmmd_unbiased``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from synthmill.errors import SpecError
from synthmill.metrics.base import Feature, Finish, Metric, Network, Rows, need
from synthmill.metrics.rowstats import StoredRows, load_rows, reference_rows

log = logging.getLogger(__name__)

SIGMA = 10.0
SCALE = 1000.0
BLOCK = 2048  # rows per block of the pairwise sums: a 2048 x 2048 float64 block is 32 MiB
FEATURE = "cmmd_embedding"


# ---- the kernel sums ----

def kernel_sum(x: np.ndarray, y: np.ndarray, block: int = BLOCK) -> float:
    """sum over all (i, j) of exp(-|x_i - y_j|^2 / (2 sigma^2)), float64, block by block in a fixed order."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xn, yn = (x * x).sum(1), (y * y).sum(1)
    gamma = 1.0 / (2.0 * SIGMA ** 2)
    total = 0.0
    for i in range(0, len(x), block):
        for j in range(0, len(y), block):
            d2 = xn[i:i + block, None] + yn[None, j:j + block] - 2.0 * (x[i:i + block] @ y[j:j + block].T)
            total += float(np.exp(-gamma * d2).sum())
    return total


def normalise(e: np.ndarray) -> np.ndarray:
    e = np.asarray(e, np.float64)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def cmmd(x: np.ndarray, y: np.ndarray, block: int = BLOCK) -> dict[str, float]:
    """``cmmd`` (the reference code's estimate) and ``cmmd_unbiased`` (the paper's) of two sets of embeddings,
    each normalised to unit length here."""
    x, y = normalise(x), normalise(y)
    m, n = len(x), len(y)
    kxx, kyy, kxy = kernel_sum(x, x, block), kernel_sum(y, y, block), kernel_sum(x, y, block)
    return {"cmmd": SCALE * (kxx / (m * m) + kyy / (n * n) - 2 * kxy / (m * n)),
            # k(x_i, x_i) = 1: the diagonal's sum is the set's size
            "cmmd_unbiased": SCALE * ((kxx - m) / (m * (m - 1)) + (kyy - n) / (n * (n - 1)) - 2 * kxy / (m * n))}


# ---- the network ----

def _sha256(path: str | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Net:
    """The CMMD CLIP model as the scorer runs it: image embeddings of a batch, and the sha256 of its weights."""

    def __init__(self, spec: Any, device: str):
        from synthmill.metrics.clipscore import ClipScorer, checkpoint_file

        self.scorer = ClipScorer(spec.cmmd.model, spec.cmmd.pretrained, device)
        try:  # the file open_clip just loaded; a hub lookup that fails here leaves the digest unknown (None)
            self.sha256 = _sha256(checkpoint_file(spec.cmmd.model, spec.cmmd.pretrained))
        except Exception as e:
            log.warning("cmmd.model %s: cannot find the weights file to hash (%s)", spec.cmmd.model, e)
            self.sha256 = None

    def extract(self, features: tuple[str, ...], images: list[Any], captions: list[Any]) -> dict[str, Any]:
        return {FEATURE: (self.scorer.embeddings(images), self.sha256)}


def _check_network(spec: Any, opts: dict[str, Any] | None) -> dict[str, Any]:
    from synthmill.metrics.clipscore import known_model

    problem = known_model(spec.cmmd.model, spec.cmmd.pretrained, "cmmd")
    if problem:
        raise SpecError(problem)
    return {}


NETWORK = Network("cmmd", load=lambda spec, info, features, device: _Net(spec, device),
                  prepare=lambda spec, image: image, check=_check_network)


# ---- the feature: embeddings per unit, with the digest of the weights that made them ----

class EmbeddingUnit(Rows):
    def __init__(self) -> None:
        super().__init__(FEATURE, lambda: np.zeros((0, 0), np.float32))
        self.sha256: str | None = None

    def add(self, values: tuple[np.ndarray, str | None]) -> None:
        super().add(values[0])
        self.sha256 = values[1]

    def marker(self) -> dict[str, Any]:
        return {"cmmd_weights_sha256": self.sha256}


def _made_by(spec: Any) -> dict[str, Any]:
    return {"cmmd_model": spec.cmmd.model, "cmmd_pretrained": spec.cmmd.pretrained or ""}


class EmbeddingTotal(StoredRows):
    def __init__(self) -> None:
        super().__init__(FEATURE, _made_by)
        self.digests: set[str | None] = set()

    def add(self, arrays: Mapping[str, np.ndarray], marker: Mapping[str, Any]) -> None:
        if len(arrays[FEATURE]):
            super().add(arrays, marker)
            self.digests.add(marker.get("cmmd_weights_sha256"))


EMBEDDING = Feature(FEATURE, "cmmd", EmbeddingUnit, EmbeddingTotal)


# ---- the metric ----

def _load(path: str, opts: dict[str, Any] | None, spec: Any, info: dict[str, dict[str, Any]]):
    ref = load_rows(path, opts, FEATURE, None, _made_by(spec), "cmmd")
    if len(ref.rows) < 2:
        raise SpecError(f"reference.path {path}: cmmd needs at least 2 samples (the unbiased estimate), the file "
                        f"has {len(ref.rows)}")
    return ref


def _check(spec: Any, samples: Mapping[str, int | None]) -> None:
    need("cmmd", "generated", samples.get("generated"), 2, "the unbiased estimate needs two")
    need("cmmd", "reference", samples.get("reference"), 2, "the unbiased estimate needs two")


def _finish(f: Finish) -> dict[str, Any]:
    total = f.totals["generated"][FEATURE]
    ref, desc = reference_rows(f, "cmmd", FEATURE)
    digests = set(total.digests)
    if "reference" in f.totals:
        digests |= f.totals["reference"][FEATURE].digests
    if len(digests) > 1:  # units scored on nodes that loaded different files under one name
        raise SpecError(f"cmmd.model {f.spec.cmmd.model}: the scorers loaded weights of different sha256 "
                        f"({', '.join(sorted(str(d) for d in digests))}); make every node see the same weights")
    gen = total.values
    if gen.shape[1] != ref.shape[1]:
        raise SpecError(f"reference.path: its CMMD embeddings have {ref.shape[1]} dimensions, cmmd.model "
                        f"{f.spec.cmmd.model} gives {gen.shape[1]}")
    return {**cmmd(gen, ref), "cmmd_network": {"model": f.spec.cmmd.model, "pretrained": f.spec.cmmd.pretrained,
                                                "weights_sha256": next(iter(digests), None)},
            "cmmd_reference": desc}


def _describe(spec: Any) -> dict[str, Any]:
    return {"network": f"open_clip {spec.cmmd.model} ({spec.cmmd.pretrained or 'no pretrained tag'}), image "
                       "embeddings through the model's own eval transform",
            "cmmd": (f"1000 x MMD^2 of the unit-normalised embeddings, Gaussian RBF kernel sigma {SIGMA:g}: the "
                     "reference code's estimate (every mean over all pairs, diagonal included), computed exactly over "
                     "all pairs in float64 blocks"),
            "cmmd_unbiased": "the same, the within-set means leaving out the diagonal (the paper's equation)",
            "sigma": SIGMA, "scale": SCALE, "model": spec.cmmd.model, "pretrained": spec.cmmd.pretrained}


def settings(spec: Any) -> dict[str, Any]:
    return {"model": spec.cmmd.model, "pretrained": spec.cmmd.pretrained}


CMMD = Metric("cmmd", {"generated": (FEATURE,), "reference": (FEATURE,)}, _check, _finish,
              protocol=("cmmd", _describe),
              reference_hint="cmmd needs a reference (real images, or a stats .npz that keeps their CMMD embeddings)",
              reference_stats=_load, settings=settings)
