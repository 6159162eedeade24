"""KID (``kid``) and precision/recall (``precision_recall``): torch-fidelity's own functions on its features.

Both read torch-fidelity's Inception pool features (``FeatureExtractorInceptionV3``, layer ``2048``, the
default layer of both metrics for that network), from the weights file and the forward pass of IS. Each
unit keeps its images' 2048 float32 features in sample order; the driver concatenates them in unit order,
so torch-fidelity's seeded subsets (KID) and its nearest-neighbour balls (precision/recall) see the same
rows whatever the number of actors. The reference may be a statistics file that keeps these rows
(``reference_stats.npz`` of an evaluation that computed KID or precision/recall against images).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from synthmill.errors import SpecError
from synthmill.metrics.base import Feature, Finish, Metric, Rows, need
from synthmill.metrics.inception import FIDELITY_POOL
from synthmill.metrics.rowstats import StoredRows, load_rows, reference_rows

DIM = 2048
NETWORK_WORDS = ("torch-fidelity FeatureExtractorInceptionV3 ('inception-v3-compat'), feature layer '2048' "
                 "(pool), from the fid.weights file: uint8 pixels, TF1-compatible bilinear resize to 299x299, "
                 "(x-128)/128")


def _made_by(spec: Any) -> dict[str, Any]:
    """What the stats file records beside the rows (the weights' sha256 and resize_to are its own fields)."""
    return {f"{FIDELITY_POOL}_network": "torch-fidelity inception-v3-compat 2048"}


POOL = Feature(FIDELITY_POOL, "inception",
               lambda: Rows(FIDELITY_POOL, lambda: np.zeros((0, DIM), np.float32)),
               lambda: StoredRows(FIDELITY_POOL, _made_by))


def _load(metric: str, least: Any):
    """The reference_stats loader of ``metric``: the rows, made with this job's weights and resize, and enough."""

    def load(path: str, opts: dict[str, Any] | None, spec: Any, info: dict[str, dict[str, Any]]):
        want = {"weights_sha256": info.get("inception", {}).get("sha256"), "resize_to": spec.fid.resize_to or 0,
                **_made_by(spec)}
        ref = load_rows(path, opts, FIDELITY_POOL, DIM, want, metric)
        at_least, why = least(spec)
        if len(ref.rows) < at_least:
            raise SpecError(f"reference.path {path}: {metric} needs at least {at_least} samples ({why}), the file "
                            f"has {len(ref.rows)}")
        return ref

    return load


def _generated(f: Finish) -> np.ndarray:
    return f.totals["generated"][FIDELITY_POOL].values


# ---- KID ----

def _kid_least(spec: Any) -> tuple[int, str]:
    return spec.kid.subset_size, f"one subset of kid.subset_size={spec.kid.subset_size}"


def _check_kid(spec: Any, samples: Mapping[str, int | None]) -> None:
    at_least, why = _kid_least(spec)
    need("kid", "generated", samples.get("generated"), at_least, why)
    need("kid", "reference", samples.get("reference"), at_least, why)


def _finish_kid(f: Finish) -> dict[str, Any]:
    import torch
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    k = f.spec.kid
    ref, desc = reference_rows(f, "kid", FIDELITY_POOL)
    out = kid_features_to_metric(
        torch.from_numpy(np.ascontiguousarray(_generated(f))), torch.from_numpy(np.ascontiguousarray(ref)),
        kid_subsets=k.subsets, kid_subset_size=k.subset_size, kid_kernel="poly", kid_kernel_poly_degree=k.degree,
        kid_kernel_poly_gamma=k.gamma, kid_kernel_poly_coef0=k.coef0, rng_seed=k.seed, verbose=False)
    return {"kid": out[KEY_METRIC_KID_MEAN], "kid_std": out[KEY_METRIC_KID_STD], "kid_reference": desc}


def _describe_kid(spec: Any) -> dict[str, Any]:
    k = spec.kid
    return {"network": NETWORK_WORDS,
            "kid": (f"torch-fidelity's kid_features_to_metric: mean (kid) and std (kid_std) over {k.subsets} subsets "
                    f"of {k.subset_size} samples drawn from each set without replacement with numpy "
                    f"RandomState({k.seed}); unbiased MMD^2 with the polynomial kernel (gamma x.y + {k.coef0})^"
                    f"{k.degree}, gamma {k.gamma if k.gamma is not None else '1/2048'}"),
            **{name: getattr(k, name) for name in ("subsets", "subset_size", "degree", "gamma", "coef0", "seed")}}


KID = Metric("kid", {"generated": (FIDELITY_POOL,), "reference": (FIDELITY_POOL,)}, _check_kid, _finish_kid,
             protocol=("kid", _describe_kid),
             reference_hint="kid needs a reference (real images, or a stats .npz that keeps their KID features)",
             reference_stats=_load("kid", _kid_least))


# ---- precision and recall ----

def _prc_least(spec: Any) -> tuple[int, str]:
    k = spec.precision_recall.neighborhood
    return k + 1, f"each sample's {k}th nearest neighbour, precision_recall.neighborhood={k}"


def _check_prc(spec: Any, samples: Mapping[str, int | None]) -> None:
    at_least, why = _prc_least(spec)
    need("precision_recall", "generated", samples.get("generated"), at_least, why)
    need("precision_recall", "reference", samples.get("reference"), at_least, why)


def _finish_prc(f: Finish) -> dict[str, Any]:
    import torch
    from torch_fidelity.metric_prc import prc_features_to_metric

    ref, desc = reference_rows(f, "precision_recall", FIDELITY_POOL)
    # torch-fidelity's convention: features_1 generated, features_2 real
    out = prc_features_to_metric(
        torch.from_numpy(np.ascontiguousarray(_generated(f))), torch.from_numpy(np.ascontiguousarray(ref)),
        prc_neighborhood=f.spec.precision_recall.neighborhood, prc_batch_size=10000, save_cpu_ram=False,
        verbose=False)
    return {"precision": float(out["precision"]), "recall": float(out["recall"]), "f_score": float(out["f_score"]),
            "precision_recall_reference": desc}


def _describe_prc(spec: Any) -> dict[str, Any]:
    k = spec.precision_recall.neighborhood
    return {"network": NETWORK_WORDS,
            "precision_recall": (f"torch-fidelity's prc_features_to_metric (Kynkaanniemi et al. 2019) on these "
                                 f"features, not torch-fidelity's default VGG-16 for prc: precision is the share of "
                                 f"generated samples within the ball of some real sample's {k}th nearest real "
                                 f"neighbour, recall the share of real samples within some generated sample's ball; "
                                 f"f_score 2PR/(P+R)"),
            "neighborhood": k}


PRECISION_RECALL = Metric(
    "precision_recall", {"generated": (FIDELITY_POOL,), "reference": (FIDELITY_POOL,)}, _check_prc, _finish_prc,
    protocol=("precision_recall", _describe_prc),
    reference_hint="precision_recall needs a reference (real images, or a stats .npz that keeps their features)",
    reference_stats=_load("precision_recall", _prc_least))
