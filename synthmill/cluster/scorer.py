"""The scorer: metric networks on one device, turning units of an image set into committed partials.

:class:`Scorer` is plain Python (benchmarks drive it without Ray); :class:`ScorerActor` is its Ray
actor. ``process(t)`` streams task t's unit (a tar or a list of files) sample by sample: threads
decode the next images while the networks run on the current batch, and only one batch of pixels is
held at a time. The networks and what is kept of each image come from the metrics table
(:mod:`synthmill.metrics.registry`): per unit, each feature's accumulator (FID's features or their
float64 sums, IS logits, CLIP cosines). It commits them as the unit's partial and returns the marker.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from synthmill.metrics import partials
from synthmill.metrics.registry import FEATURES, NETWORKS, networks_of, per_sample_of
from synthmill.sharding import storage
from synthmill.sharding.images import ImageSet, ImageSetError, Sample, Unit, check_pixels, image_size, iter_unit
from synthmill.sharding.nodes import NodePath, check_node_sees

log = logging.getLogger(__name__)


class BadImage(ValueError):
    """An input image that no retry can fix (mixed sizes, undecodable, no caption for CLIP)."""


@dataclass
class SetJob:
    """One image set and what to compute on it: the features its metrics need (metrics.registry)."""

    images: ImageSet
    features: tuple[str, ...] = ()
    size: tuple[int, int] | None = None  # every image must have this (width, height); None: no check
    max_pixels: int | None = None  # larger images are bad input, found from their header before decoding
    name: str = "generated"  # the set's field in the spec, for messages

    @property
    def networks(self) -> tuple[str, ...]:
        return networks_of(self.features)

    @property
    def keyed(self) -> bool:
        """Whether its partials keep each sample's key: some feature is one number per image, which
        ``scores.parquet`` lists by key."""
        return bool(per_sample_of(self.features))

    @property
    def captions(self) -> str | None:
        """Why each image of the set needs its caption, or None."""
        return next((NETWORKS[n].captions for n in self.networks if NETWORKS[n].captions), None)


@dataclass
class Work:
    """Everything a scorer needs besides the spec: the sets, the task list, where to commit."""

    sets: dict[str, SetJob]
    tasks: list[tuple[str, int]]  # task id -> (set name, unit index), unless the call names its unit
    fingerprint: str
    info: dict[str, dict[str, Any]]  # network name -> what the driver's check found (a weights file's digest)
    output: str
    storage: dict[str, Any] = field(default_factory=dict)
    node_paths: list[NodePath] = field(default_factory=list)  # the local inputs every node must see


class Scorer:
    """Holds the metric networks; :meth:`process` may run from several threads (one unit each)."""

    def __init__(self, spec: Any, work: Work):
        import threading

        import torch

        self.spec, self.work = spec, work
        self.samples_done = 0  # images scored so far (the driver's progress bar polls it)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(spec.cluster.cpus_per_actor)
        wanted: dict[str, set[str]] = {}  # network -> the features asked of it, over every set
        for job in work.sets.values():
            for f in job.features:
                wanted.setdefault(FEATURES[f].network, set()).add(f)
        # Each network once, whatever number of metrics and sets read it; a weights URL is fetched into this
        # node's cache (once, under a lock) by the network's own loader.
        self.nets = {n: NETWORKS[n].load(spec, work.info.get(n, {}), tuple(sorted(fs)), self.device)
                     for n, fs in ((n, wanted[n]) for n in NETWORKS if n in wanted)}
        self.lock = threading.Lock()  # one batch on the device at a time
        self.decoders = ThreadPoolExecutor(max_workers=spec.cluster.decode_threads, thread_name_prefix="decode")

    def info(self) -> dict[str, Any]:
        return {"device": self.device, "host": socket.gethostname(), "pid": os.getpid()}

    def _decode(self, job: SetJob, sample: Sample) -> tuple[dict[str, Any], str | None, str]:
        from PIL import Image

        # the header first: an image over the limit is never decoded (its pixels, not its file, cost the memory)
        check_pixels(image_size(sample.image, sample.name), job.max_pixels, sample.name,
                     f"{job.name}.max_image_pixels")
        try:
            with Image.open(io.BytesIO(sample.image)) as im:
                rgb = im.convert("RGB")
        except Exception as e:
            raise BadImage(f"{sample.name}: cannot decode image ({type(e).__name__}: {e})") from None
        if job.size is not None and rgb.size != job.size:
            raise BadImage(
                f"{sample.name}: image is {rgb.size[0]}x{rgb.size[1]}, the set's first image is "
                f"{job.size[0]}x{job.size[1]}; images of mixed sizes give meaningless FID/IS "
                "(set fid.resize_to to score every image at one size)")
        if job.captions and sample.caption is None:
            raise BadImage(f"{sample.name}: no caption (.txt); {job.captions}")
        return {n: NETWORKS[n].prepare(self.spec, rgb) for n in job.networks}, sample.caption, sample.key

    def _batch(self, job: SetJob, batch: list, acc: dict[str, Any]) -> None:
        captions = [b[1] for b in batch]
        with self.lock:
            for n in job.networks:
                mine = tuple(f for f in job.features if FEATURES[f].network == n)
                values = self.nets[n].extract(mine, [b[0][n] for b in batch], captions)
                for f in mine:
                    acc[f].add(values[f])
            self.samples_done += len(batch)

    def process(self, t: int, attempt: int = 1, task: tuple[str, Unit] | None = None) -> dict[str, Any]:
        """Score task ``t``; return its committed marker, or ``{"bad_input": message}``. ``task``: its set's name
        and its unit, when the unit is not in ``work`` (a shard committed after the work was handed out)."""
        if task is None:
            set_name, k = self.work.tasks[t]
            unit = self.work.sets[set_name].images.units[k]
        else:
            set_name, unit = task
            k = unit.index
        job = self.work.sets[set_name]
        t0 = time.perf_counter()
        acc = {f: FEATURES[f].unit() for f in job.features}
        keys: list[str] = []
        n = 0
        bs = self.spec.cluster.batch_size
        batch: list = []
        try:
            samples = iter_unit(unit, self.work.storage, captions=bool(job.captions))
            decoded = storage.ahead(samples, lambda s: self._decode(job, s), self.decoders, 2 * bs)
            for item in decoded:
                batch.append(item)
                keys.append(item[2])
                if len(batch) == bs:
                    self._batch(job, batch, acc)
                    n, batch = n + len(batch), []
            if batch:
                self._batch(job, batch, acc)
                n += len(batch)
        except (BadImage, ImageSetError) as e:  # ImageSetError: a caption that is not UTF-8, a broken tar
            return {"bad_input": str(e)}
        if unit.count is not None and n != unit.count:
            raise RuntimeError(f"{unit.tar or unit.files[0]}: read {n} images, expected {unit.count}")
        arrays: dict[str, np.ndarray] = {"n": np.array(n)}
        marker = {"count": n, "fingerprint": self.work.fingerprint, "identity": unit.identity}
        for a in acc.values():
            arrays.update(a.arrays())
            marker.update(a.marker())
        if job.keyed:  # fixed-width text, which np.load reads without pickle
            arrays[partials.KEYS] = np.array(keys, dtype=f"<U{max(map(len, keys), default=1)}")
            marker[partials.KEYS] = True
        marker.update(seconds=round(time.perf_counter() - t0, 3), attempt=attempt)
        return partials.commit(self.work.output, set_name, k, arrays, marker, self.work.storage)


@ray.remote(num_cpus=1)
class ScorerActor:
    def __init__(self, spec: Any, work: Work):
        self.start_error: Exception | None = None
        try:
            check_node_sees(work.node_paths)  # the sets it scores, the output it commits to
            self.scorer = Scorer(spec, work)
        except Exception as e:  # raised by ready(): Ray would print an __init__'s traceback (synthmill.cluster.pool)
            self.start_error = e

    def ready(self) -> dict[str, Any]:
        if self.start_error is not None:
            raise self.start_error
        return self.scorer.info()

    def process(self, t: int, attempt: int = 1, task: tuple[str, Unit] | None = None) -> dict[str, Any]:
        return self.scorer.process(t, attempt, task)

    def progress(self) -> int:
        return self.scorer.samples_done
