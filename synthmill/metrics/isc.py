"""Inception Score (``is``): torch-fidelity's own function over the unbiased logits of every generated image.

Each unit keeps its images' 1008 logits in sample order; the driver concatenates them in unit order, so
torch-fidelity's seeded shuffle and splits see the same rows whatever the number of actors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from synthmill.metrics.base import Feature, Finish, Metric, Rows, RowsTotal, need
from synthmill.metrics.inception import IS_CONVENTION, inception_score

LOGITS = Feature("logits", "inception", lambda: Rows("logits", lambda: np.zeros((0, 1008), np.float32)),
                 lambda: RowsTotal("logits"))


def _check(spec: Any, samples: Mapping[str, int | None]) -> None:
    splits = spec.inception_score.splits
    need("is", "generated", samples.get("generated"), splits, f"one per split, inception_score.splits={splits}")


def _finish(f: Finish) -> dict[str, Any]:
    isc = f.spec.inception_score
    mean, std = inception_score(f.totals["generated"]["logits"].values, isc.splits, isc.seed, isc.shuffle)
    return {"inception_score": {"mean": mean, "std": std, "splits": isc.splits, "seed": isc.seed,
                                "shuffle": isc.shuffle}}


IS = Metric("is", {"generated": ("logits",)}, _check, _finish,
            protocol=("inception_score", lambda spec: IS_CONVENTION), libraries=("torch-fidelity",))
