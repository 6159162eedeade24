"""The scorer: metric networks on one device, turning units of an image set into committed partials.

:class:`Scorer` is plain Python (benchmarks drive it without Ray); :class:`ScorerActor` is its Ray
actor. ``process(t)`` streams task t's unit (a tar or a list of files) sample by sample: threads
decode the next images while the networks run on the current batch, and only one batch of pixels is
held at a time. What it keeps is small: float64 feature sums (2048 + 2048x2048), the 1008 IS logits
and one CLIP cosine per sample. It commits them as the unit's partial and returns the marker.
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

from synthmill.jobs.outputs import check_node_sees
from synthmill.metrics import partials
from synthmill.metrics.frechet import UnitFeatures
from synthmill.sharding import storage
from synthmill.sharding.images import ImageSet, ImageSetError, Sample, iter_unit

log = logging.getLogger(__name__)


class BadImage(ValueError):
    """An input image that no retry can fix (mixed sizes, undecodable, no caption for CLIP)."""


@dataclass
class SetJob:
    """One image set and what to compute on it."""

    images: ImageSet
    fid: bool = False
    isc: bool = False
    clip: bool = False
    size: tuple[int, int] | None = None  # every image must have this (width, height); None: no check


@dataclass
class Work:
    """Everything a scorer needs besides the spec: the sets, the task list, where to commit."""

    sets: dict[str, SetJob]
    tasks: list[tuple[str, int]]  # task id -> (set name, unit index)
    fingerprint: str
    weights: str | None  # fid.weights as the spec gives it (None: the standard file's URL)
    weights_sha256: str | None  # its full digest, as the driver found it; every node checks against it
    output: str
    storage: dict[str, Any] = field(default_factory=dict)


class Scorer:
    """Holds the metric networks; :meth:`process` may run from several threads (one unit each)."""

    def __init__(self, spec: Any, work: Work):
        import threading

        import torch

        from synthmill.metrics import weights

        self.spec, self.work = spec, work
        self.samples_done = 0  # images scored so far (the driver's progress bar polls it)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(spec.cluster.cpus_per_actor)
        fid = any(s.fid for s in work.sets.values())
        isc = any(s.isc for s in work.sets.values())
        self.inception = None
        if fid or isc:
            from synthmill.metrics.inception import InceptionExtractor

            # Resolved on this node: a URL is downloaded into this node's cache (once, under a lock).
            path, _ = weights.resolve(work.weights, work.weights_sha256, work.storage)
            state = weights.load_state_dict(path)
            self.inception = InceptionExtractor(state, path, spec.fid.protocol, fid, isc, self.device)
        self.clip = None
        if any(s.clip for s in work.sets.values()):
            from synthmill.metrics.clipscore import ClipScorer

            self.clip = ClipScorer(spec.clip.model, spec.clip.pretrained, self.device)
        self.lock = threading.Lock()  # one batch on the device at a time
        self.decoders = ThreadPoolExecutor(max_workers=spec.cluster.decode_threads, thread_name_prefix="decode")

    def info(self) -> dict[str, Any]:
        return {"device": self.device, "host": socket.gethostname(), "pid": os.getpid()}

    def _decode(self, job: SetJob, sample: Sample) -> tuple[np.ndarray | None, Any, str | None]:
        from PIL import Image

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
        if job.clip and sample.caption is None:
            raise BadImage(f"{sample.name}: no caption (.txt) for the clip metric")
        pixels = None
        if job.fid or job.isc:
            r = self.spec.fid.resize_to
            scaled = rgb.resize((r, r), resample=Image.BICUBIC) if r else rgb
            pixels = np.asarray(scaled, dtype=np.uint8)
        return pixels, rgb if job.clip else None, sample.caption

    def _batch(self, job: SetJob, batch: list, acc: dict[str, Any]) -> None:
        pixels = [b[0] for b in batch]
        with self.lock:
            if job.fid:
                acc["fid"].add(self.inception.fid_features(pixels))
            if job.isc:
                acc["logits"].append(self.inception.is_logits(pixels))
            if job.clip:
                captions = [b[2] for b in batch]
                acc["cos"].append(self.clip.cosines([b[1] for b in batch], captions))
                acc["truncated"] += self.clip.truncated(captions)
            self.samples_done += len(batch)
        acc["n"] += len(batch)

    def process(self, t: int, attempt: int = 1) -> dict[str, Any]:
        """Score task ``t``; return its committed marker, or ``{"bad_input": message}``."""
        set_name, k = self.work.tasks[t]
        job = self.work.sets[set_name]
        unit = job.images.units[k]
        t0 = time.perf_counter()
        acc: dict[str, Any] = {"n": 0, "fid": UnitFeatures(2048), "logits": [], "cos": [], "truncated": 0}
        bs = self.spec.cluster.batch_size
        batch: list = []
        try:
            samples = iter_unit(unit, self.work.storage, captions=job.clip)
            decoded = storage.ahead(samples, lambda s: self._decode(job, s), self.decoders, 2 * bs)
            for item in decoded:
                batch.append(item)
                if len(batch) == bs:
                    self._batch(job, batch, acc)
                    batch = []
            if batch:
                self._batch(job, batch, acc)
        except (BadImage, ImageSetError) as e:  # ImageSetError: a caption that is not UTF-8, a broken tar
            return {"bad_input": str(e)}
        if unit.count is not None and acc["n"] != unit.count:
            raise RuntimeError(f"{unit.tar or unit.files[0]}: read {acc['n']} images, expected {unit.count}")
        arrays: dict[str, np.ndarray] = {"n": np.array(acc["n"])}
        if job.fid:
            arrays.update(acc["fid"].arrays())
        if job.isc:
            arrays["logits"] = np.concatenate(acc["logits"]) if acc["logits"] else np.zeros((0, 1008), np.float32)
        if job.clip:
            arrays["cos"] = np.concatenate(acc["cos"]) if acc["cos"] else np.zeros(0)
        marker = {"count": acc["n"], "fingerprint": self.work.fingerprint, "identity": unit.identity,
                  "truncated_captions": acc["truncated"], "seconds": round(time.perf_counter() - t0, 3),
                  "attempt": attempt}
        return partials.commit(self.work.output, set_name, k, arrays, marker, self.work.storage)


@ray.remote(num_cpus=1)
class ScorerActor:
    def __init__(self, spec: Any, work: Work):
        check_node_sees(spec, (*(f"{name}.path" for name in work.sets), "output.path"))  # the sets it scores
        self.scorer = Scorer(spec, work)

    def ready(self) -> dict[str, Any]:
        return self.scorer.info()

    def process(self, t: int, attempt: int = 1) -> dict[str, Any]:
        return self.scorer.process(t, attempt)

    def progress(self) -> int:
        return self.scorer.samples_done
