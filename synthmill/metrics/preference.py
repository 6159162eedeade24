"""What the human-preference metrics share (``hpsv2``, ``pickscore``): one float64 score per generated image with
its caption, kept per unit in sample order (a per-image feature named as the metric), and reported as their mean.

Each metric's network is a module of its own (:mod:`synthmill.metrics.hps`, :mod:`synthmill.metrics.pickscore`);
this module makes their features and metrics alike, so that a per-sample table can read every score the same
way: ``Finish.totals["generated"][name].values`` is the set's scores in sample order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from synthmill.errors import SpecError
from synthmill.metrics.base import Feature, Finish, Metric, Rows, RowsTotal, need
from synthmill.sharding import storage


def score_feature(name: str) -> Feature:
    """The per-image scores of metric ``name``, given by the network of the same name."""
    return Feature(name, name, lambda: Rows(name, lambda: np.zeros(0)), lambda: RowsTotal(name))


def score_metric(name: str, describe: Callable[[Any], Any], settings: Callable[[Any], Any]) -> Metric:
    """A per-sample metric: ``metrics.json`` gets ``NAME`` (the mean score), ``NAME_std`` and ``NAME_network`` (what
    the network's check found: its weights' source and sha256). ``settings(spec)``: what shapes the scores, for the
    job's fingerprint."""

    def check(spec: Any, samples: Mapping[str, int | None]) -> None:
        need(name, "generated", samples.get("generated"), 1, "one image with its caption")

    def finish(f: Finish) -> dict[str, Any]:
        scores = np.asarray(f.totals["generated"][name].values, np.float64)
        network = {k: storage.redact_url(v) if k == "weights" and isinstance(v, str) else v
                   for k, v in f.info.get(name, {}).items() if k != "path"}
        return {name: float(scores.mean()), f"{name}_std": float(scores.std()), f"{name}_network": network}

    return Metric(name, {"generated": (name,)}, check, finish, protocol=(name, describe),
                  settings=settings)


def resolve_weights(field: str, weights: str, sha256: str | None, opts: dict[str, Any] | None) -> tuple[str, str]:
    """(local path, sha256) of a weights file given as a path or URL (a URL is downloaded once per node into the
    weights cache, checked against ``sha256`` when given); SpecError naming ``field`` otherwise."""
    from synthmill.metrics import weights as w

    try:
        return w.resolve(weights, sha256, opts)
    except (w.WeightsError, storage.StorageError) as e:  # a download that failed for good names this field too
        raise SpecError(f"{field}: {e}") from None
