"""The training stream: image-text shards -> resized, cropped, tokenised samples, split across readers.

Readers ("consumers") are the data-loader processes of every training worker: ``world * P`` of them
for ``world`` workers with ``P`` loader processes each. Each epoch the units (tars, or slices of an
image folder) are put in a seeded order; with at least as many units as consumers each consumer reads
``order[c::N]``, otherwise every consumer reads all units and keeps every N-th sample. A seeded shuffle
buffer mixes samples across unit boundaries. Everything random follows from ``train.seed``: unit order,
buffer draws, and each sample's crop and flip (from its own name, so skipping a sample skips nothing
else).

Exact resume: ``torch.utils.data.DataLoader`` takes batch ``i`` from loader process ``i % P``. A run
that resumes at micro-batch ``m`` gives loader process ``p`` the role of process ``(p + m) % P`` of the
first run and lets it skip the batches that process had produced: the resumed run sees the same
batches in the same order as an uninterrupted run (with the same number of workers and processes).
Skipped samples are read but never decoded.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from synthmill.sharding.images import (
    MAX_IMAGE_PIXELS,
    ImageSetError,
    Sample,
    Unit,
    check_pixels,
    image_size,
    iter_unit,
)


class BadData(ValueError):
    """A sample the training stream cannot use (no caption, unreadable image); the message names it."""


def _samples(unit: Unit, opts: dict[str, Any] | None) -> Iterator[Sample]:
    """The unit's samples; a caption that is not UTF-8 or a tar that breaks off is bad data, not a crash."""
    try:
        yield from iter_unit(unit, opts)
    except ImageSetError as e:
        raise BadData(f"data.path: {e}") from None


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


@dataclass
class StreamSpec:
    units: list[Unit]
    resolution: int
    center_crop: bool
    random_flip: bool
    shuffle_buffer: int
    batch_size: int
    seed: int
    storage_options: dict[str, Any] | None = None
    max_pixels: int | None = MAX_IMAGE_PIXELS  # larger images are bad data, found from their header
    latent_factor: int | None = None  # the VAE's downsampling: read stored latents (None: always the images)
    latent_channels: int = 4


def skipped_batches(start: int, role: int, procs: int) -> int:
    """Batches with index < ``start`` that loader process ``role`` (of ``procs``) produced."""
    return max(0, -(-(start - role) // procs))


def crop_box(width: int, height: int, resolution: int, center: bool, rng: random.Random) -> tuple[int, int, int, int]:
    """(new_w, new_h, top, left): resize the short side to ``resolution``, then where the square crop starts."""
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if center:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top, left = rng.randint(0, new_h - resolution), rng.randint(0, new_w - resolution)
    return new_w, new_h, top, left


class ShardStream:
    """An iterable of training samples for one training worker (``rank`` of ``world``).

    Made an ``IterableDataset`` by :func:`make_loader`; iterating outside a DataLoader reads as loader
    process 0 of 1. ``tokenizers`` are the teacher pipeline's (one, or two for SDXL).
    """

    def __init__(self, spec: StreamSpec, tokenizers: list[Any], rank: int, world: int, start_batch: int = 0):
        self.spec, self.tokenizers, self.rank, self.world, self.start_batch = spec, tokenizers, rank, world, start_batch

    # -- which raw samples this reader sees ------------------------------------------------------------
    def _raw(self, consumer: int, consumers: int) -> Iterator[tuple[int, Sample]]:
        s = self.spec
        epoch = 0
        while True:
            order = list(s.units)
            random.Random(_seed(s.seed, "units", epoch)).shuffle(order)
            got = 0
            buffer: list[Sample] = []
            rng = random.Random(_seed(s.seed, "buffer", consumer, epoch))

            def mine(order: list[Unit] = order) -> Iterator[Sample]:  # consumed below, in this same epoch
                if len(order) >= consumers:
                    for unit in order[consumer::consumers]:
                        yield from _samples(unit, s.storage_options)
                else:
                    k = 0
                    for unit in order:
                        for sample in _samples(unit, s.storage_options):
                            if k % consumers == consumer:
                                yield sample
                            k += 1

            for sample in mine():
                got += 1
                if s.shuffle_buffer <= 1:
                    yield epoch, sample
                    continue
                if len(buffer) < s.shuffle_buffer:
                    buffer.append(sample)
                    continue
                i = rng.randrange(len(buffer))
                buffer[i], sample = sample, buffer[i]
                yield epoch, sample
            rng.shuffle(buffer)
            for sample in buffer:
                yield epoch, sample
            if got == 0:
                total = sum(u.count or 0 for u in s.units)
                raise BadData(f"data.path: {total} samples in {len(s.units)} units leave reader {consumer} of "
                              f"{consumers} ({self.world} workers x loader processes) with nothing to read; "
                              "use fewer workers or data.loader_workers, or more data")
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        p, procs = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.iter_as(p, procs)

    def iter_as(self, p: int, procs: int) -> Iterator[dict[str, Any]]:
        """The samples of loader process ``p`` of ``procs`` (what ``__iter__`` gives inside a DataLoader)."""
        role = (p + self.start_batch) % procs
        skip = skipped_batches(self.start_batch, role, procs) * self.spec.batch_size
        consumer, consumers = self.rank * procs + role, self.world * procs
        for epoch, sample in self._raw(consumer, consumers):
            if skip:
                skip -= 1
                continue
            yield self.decode(sample, epoch)

    # -- one sample ----------------------------------------------------------------------------------------
    def decode(self, sample: Sample, epoch: int) -> dict[str, Any]:
        import numpy as np
        import torch
        from PIL import Image

        s = self.spec
        if sample.caption is None:
            raise BadData(f"data.path: {sample.name} has no caption (a .txt beside the image); "
                          "distillation trains on image-text pairs")
        try:  # the header first: an image over the limit is never decoded
            check_pixels(image_size(sample.image, sample.name), s.max_pixels, sample.name, "data.max_image_pixels")
        except ImageSetError as e:
            raise BadData(f"data.path: {e}") from None
        stored = stored_latents(sample, epoch, s) if s.latent_factor else None
        if stored is not None:
            return self._with_text(sample, stored)
        try:
            with Image.open(io.BytesIO(sample.image)) as im:
                im = im.convert("RGB")
        except Exception as e:
            raise BadData(f"data.path: {sample.name}: not a readable image ({type(e).__name__}: {e})") from None
        rng = random.Random(_seed(s.seed, "sample", sample.name, epoch))
        w, h = im.size
        new_w, new_h, top, left = crop_box(w, h, s.resolution, s.center_crop, rng)
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), Image.Resampling.BILINEAR)
        im = im.crop((left, top, left + s.resolution, top + s.resolution))
        if s.random_flip and rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
        out: dict[str, Any] = {
            "pixel_values": pixels.float().div(127.5).sub(1.0),
            # SDXL micro-conditioning: original size, crop top-left, target size (as its training script)
            "time_ids": torch.tensor([h, w, top, left, s.resolution, s.resolution], dtype=torch.float32),
        }
        if s.latent_factor:  # in a batch with stored latents: this sample's come from the VAE
            side = s.resolution // s.latent_factor
            out.update(latents=torch.zeros(s.latent_channels, side, side), has_latents=torch.tensor(False))
        return self._with_text(sample, out)

    def _with_text(self, sample: Sample, out: dict[str, Any]) -> dict[str, Any]:
        """``out`` with the caption's token ids for each tokenizer."""
        for i, tok in enumerate(self.tokenizers):
            ids = tok(sample.caption, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids[0]
            out["input_ids" if i == 0 else f"input_ids_{i + 1}"] = ids
        return out


def stored_latents(sample: Sample, epoch: int, s: StreamSpec) -> dict[str, Any] | None:
    """A sample's stored latents (``KEY.latents.npy``, from ``output.save_latents``) as a training sample without
    pixels, when they are what the VAE would be given: latents of ``resolution / latent_factor`` per side, an
    image of exactly ``resolution`` per side (no resize, no crop) and no flip drawn for it. None otherwise (the
    image is encoded)."""
    import numpy as np
    import torch

    r = s.resolution
    if sample.latents is None or r % s.latent_factor or image_size(sample.image, sample.name) != (r, r):
        return None
    try:
        arr = np.load(io.BytesIO(sample.latents), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise BadData(f"data.path: {sample.name}: unreadable latents.npy ({e})") from None
    if arr.shape != (s.latent_channels, r // s.latent_factor, r // s.latent_factor):
        return None
    rng = random.Random(_seed(s.seed, "sample", sample.name, epoch))
    crop_box(r, r, r, s.center_crop, rng)  # the draws the image path takes, then its flip
    if s.random_flip and rng.random() < 0.5:
        return None
    return {"pixel_values": torch.zeros(3, r, r),
            "time_ids": torch.tensor([r, r, 0, 0, r, r], dtype=torch.float32),
            "latents": torch.from_numpy(arr.astype(np.float32)), "has_latents": torch.tensor(True)}


def batch_latents(batch: dict[str, Any], vae: Any, gen: Any, device: Any, dtype: Any, shift: float,
                  scale: float) -> tuple[Any, int]:
    """The batch's latents in the UNet's space (float32): the stored ones where its samples carry them, the VAE's
    samples of the others; and how many samples the VAE encoded. With stored latents, the VAE's sampling draws are
    taken anyway, so the noise and timesteps drawn next from ``gen`` are those of a run that encodes them all."""
    import torch

    pixels, stored = batch["pixel_values"], batch.get("has_latents")
    if stored is None or not bool(stored.any()):
        latents = vae.encode(pixels.to(device, dtype)).latent_dist.sample(generator=gen)
        return ((latents - shift) * scale).float(), len(pixels)
    latents = batch["latents"].to(device, torch.float32)
    torch.randn(latents.shape, generator=gen, device=device, dtype=dtype)  # DiagonalGaussianDistribution.sample's
    need = ~stored
    if need.any():
        encoded = vae.encode(pixels[need].to(device, dtype)).latent_dist.sample(generator=gen)
        latents[need.to(device)] = ((encoded - shift) * scale).float()
    return latents, int(need.sum())


def make_loader(stream: ShardStream, batch_size: int, loader_workers: int):
    """A DataLoader over ``stream``: ``loader_workers`` processes (0: in this process), batches in order."""
    import torch.utils.data

    class _Iterable(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(stream)

    return torch.utils.data.DataLoader(
        _Iterable(), batch_size=batch_size, num_workers=loader_workers, drop_last=False,
        persistent_workers=False, prefetch_factor=2 if loader_workers else None,
    )
