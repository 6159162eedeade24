"""CLIP score (``clip``): the cosine of each generated image with its own caption (open_clip, ``clipscore``).

Each unit keeps one float64 cosine per image, in sample order, and counts the captions longer than the
model's context; the driver concatenates the cosines in unit order and reports their mean in both
published forms.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from synthmill.errors import SpecError
from synthmill.metrics.base import Feature, Finish, Metric, Network, PerSample, need


class _Net:
    """The CLIP model as the scorer runs it: cosines of a batch of images with their captions."""

    def __init__(self, spec: Any, device: str):
        from synthmill.metrics.clipscore import ClipScorer

        self.scorer = ClipScorer(spec.clip.model, spec.clip.pretrained, device)

    def extract(self, features: tuple[str, ...], images: list[Any], captions: list[str]) -> dict[str, Any]:
        return {"clip_cosine": (self.scorer.cosines(images, captions), self.scorer.truncated(captions))}


def _check_network(spec: Any, opts: dict[str, Any] | None) -> dict[str, Any]:
    from synthmill.metrics.clipscore import known_model

    problem = known_model(spec.clip.model, spec.clip.pretrained)
    if problem:
        raise SpecError(problem)
    return {}


NETWORK = Network("clip", load=lambda spec, info, features, device: _Net(spec, device),
                  prepare=lambda spec, image: image, check=_check_network,
                  captions="the clip metric scores each image against its caption")


class CosineUnit:
    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.truncated = 0

    def add(self, values: tuple[np.ndarray, int]) -> None:
        self.parts.append(values[0])
        self.truncated += values[1]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"cos": np.concatenate(self.parts) if self.parts else np.zeros(0)}

    def marker(self) -> dict[str, Any]:
        return {"truncated_captions": self.truncated}


class CosineTotal:
    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.truncated = 0

    def add(self, arrays: Mapping[str, np.ndarray], marker: Mapping[str, Any]) -> None:
        self.parts.append(arrays["cos"])
        self.truncated += int(marker.get("truncated_captions", 0))


COSINE = Feature("clip_cosine", "clip", CosineUnit, CosineTotal, per_sample=PerSample("clip_score", "cos"))


def _check(spec: Any, samples: Mapping[str, int | None]) -> None:
    need("clip", "generated", samples.get("generated"), 1, "one image with its caption")


def _finish(f: Finish) -> dict[str, Any]:
    from synthmill.metrics.clipscore import clip_scores

    total = f.totals["generated"]["clip_cosine"]
    return {**clip_scores(np.concatenate(total.parts)), "clip_truncated_captions": total.truncated}


def _describe(spec: Any) -> dict[str, Any]:
    return {"model": spec.clip.model, "pretrained": spec.clip.pretrained,
            "clip_score": "mean cosine of image and caption embeddings",
            "clip_score_x100": "mean of 100 * max(cosine, 0) (torchmetrics, MLPerf)"}


CLIP = Metric("clip", {"generated": ("clip_cosine",)}, _check, _finish, protocol=("clip", _describe),
              libraries=("open_clip_torch",))
