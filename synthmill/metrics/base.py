"""The shapes of the metrics table (:mod:`synthmill.metrics.registry`): networks, features and metrics.

An evaluate job scores image sets in units. For each image a scorer runs the **networks** the job's
metrics need (each once per actor, whatever number of metrics read it), and keeps per unit what each
network gives per image, a **feature** (FID's pool3 activations, IS's logits, CLIP's cosines). A unit
commits its features' arrays as its partial; the driver adds the partials of a set in unit order into one
total per feature, exactly (float64, concatenation), so the result does not depend on how many actors
scored or in which order they finished. A **metric** then turns the totals into the numbers of
``metrics.json`` (``finish``), after checking that the sets are large enough for it (``check``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synthmill.errors import SpecError


@dataclass(frozen=True)
class Network:
    """A network a scorer holds, and how one image is made ready for it.

    ``load(spec, info, features, device)`` builds it on the actor (``info``: what ``check`` found on the
    driver, e.g. the weights file's digest) and returns an object whose ``extract(features, inputs,
    captions)`` gives ``{feature: per-image values}`` for a batch. ``prepare(spec, image)`` turns one decoded
    RGB PIL image into its input. ``check(spec, opts)`` runs on the driver before anything loads: it raises
    :class:`SpecError` for a bad file or name and returns ``info``.
    """

    name: str
    load: Callable[[Any, dict[str, Any], tuple[str, ...], str], Any]
    prepare: Callable[[Any, Any], Any]
    check: Callable[[Any, dict[str, Any] | None], dict[str, Any]]
    captions: str | None = None  # why it needs each image's caption, or None when it does not
    same_size: Callable[[Any], bool] = lambda spec: False  # its inputs must all be one size (unless resized)


@dataclass(frozen=True)
class Feature:
    """What a network gives per image, kept per unit (``unit()``: ``add(values)``, ``arrays()`` for the
    partial's npz, ``marker()`` for extra marker fields) and merged in unit order on the driver (``total()``:
    ``add(arrays, marker)``)."""

    name: str
    network: str
    unit: Callable[[], Any]
    total: Callable[[], Any]


@dataclass
class Finish:
    """What a metric's ``finish`` reads and writes: the job's spec, each set's merged feature totals and
    sample count, the network info from the driver's checks, and the output's files."""

    spec: Any
    totals: dict[str, dict[str, Any]]  # set name -> feature name -> total
    samples: dict[str, int]  # set name -> samples scored; a metric may add the reference's
    info: dict[str, dict[str, Any]]  # network name -> what its check found
    reference: Any  # the reference given as statistics, as FID loads it (metrics.fid.ReferenceStats), or None
    reference_kind: str | None  # the reference image set's kind (folder, tars, synthmill), or None
    write: Callable[[str, bytes], str]  # (file name, bytes) -> its URL in the output
    done: dict[str, Any] = field(default_factory=dict)  # what one metric computed that another reuses
    references: dict[str, Any] = field(default_factory=dict)  # metric name -> its reference_stats, from a stats file


@dataclass(frozen=True)
class Metric:
    """One entry of ``metrics:``.

    ``features``: set name (``generated``, ``reference``) -> the features it needs of that set. A metric that
    needs the reference set names ``reference_hint`` (said when no reference is given) and, where statistics
    can stand in for the images, ``reference_stats`` (path, opts, spec, info) -> the loaded statistics.
    ``check(spec, samples)`` raises :class:`SpecError` when a set is too small (a count of None is not known
    yet and passes). ``finish`` returns this metric's entries of ``metrics.json``'s ``metrics``; ``protocol``
    ``(key, describe(spec))`` its entry of ``metrics.json``'s ``protocol``. ``settings(spec)``: the settings of
    its own that shape a unit's partial, for the job's fingerprint (None: it has none beyond the network's).
    """

    name: str
    features: Mapping[str, tuple[str, ...]]
    check: Callable[[Any, Mapping[str, int | None]], None]
    finish: Callable[[Finish], dict[str, Any]]
    protocol: tuple[str, Callable[[Any], Any]] | None = None
    reference_hint: str | None = None
    reference_stats: Callable[[str, dict[str, Any] | None, Any, dict[str, dict[str, Any]]], Any] | None = None
    settings: Callable[[Any], Any] | None = None


def need(metric: str, set_name: str, n: int | None, at_least: int, why: str) -> None:
    """SpecError unless the set ``set_name`` (when its count ``n`` is known) has ``at_least`` samples."""
    if n is not None and n < at_least:
        raise SpecError(f"{set_name}.path: {metric} needs at least {at_least} samples ({why}), the set has {n}")


class Rows:
    """A unit's per-image values of one feature, concatenated in sample order (IS logits, CLIP cosines)."""

    def __init__(self, key: str, empty: Callable[[], np.ndarray]):
        self.key, self.empty, self.parts = key, empty, []

    def add(self, values: np.ndarray) -> None:
        self.parts.append(values)

    def arrays(self) -> dict[str, np.ndarray]:
        return {self.key: np.concatenate(self.parts) if self.parts else self.empty()}

    def marker(self) -> dict[str, Any]:
        return {}


class RowsTotal:
    """A set's per-image values of one feature: every unit's rows, concatenated in unit order."""

    def __init__(self, key: str):
        self.key, self.parts = key, []

    def add(self, arrays: Mapping[str, np.ndarray], marker: Mapping[str, Any]) -> None:
        self.parts.append(arrays[self.key])

    @property
    def values(self) -> np.ndarray:
        return np.concatenate(self.parts)
