"""Image sets to score: a synthmill output, a glob of WebDataset tars, or a folder of image files.

A set is cut into units, the evaluate job's shards: one unit per tar, or ``samples_per_unit`` files
of a folder in sorted order. Units are what actors score and what partial results are committed
for, so an interrupted evaluation resumes unit by unit. Each unit carries an ``identity`` (the tar's
commit sha256, or its size and modification stamp, or the names, sizes and modification stamps of its
files and of their captions): a partial result counts only for the input it was computed from.

Reading is a stream: a tar is read front to back through fsspec (local or ``s3://``) with
webdataset's own tar iterator and key grouping; a folder unit reads its files one by one. A
sample's caption is its ``.txt`` member (tars) or the ``.txt`` file beside the image (folders).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from synthmill.sharding import storage
from synthmill.sharding.encoders import LATENTS

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "ppm", "pgm")

#: Default largest image, in pixels, that a job decodes: 4096 x 4096, which covers 4K images (3840 x 2160, 4096 x
#: 2160) in any orientation. An image's pixels cost ~3 bytes each once decoded (48 MiB here) and ~4x that as float32,
#: so a batch's memory is bounded by the batch size times this, whatever the file's size on disk.
MAX_IMAGE_PIXELS = 4096 * 4096


class ImageSetError(ValueError):
    """The set cannot be read as images (missing, empty, incomplete, unreadable)."""


@dataclass
class Unit:
    index: int
    identity: str | None  # None: a shard of a generate job still running, not committed yet (``growing``)
    count: int | None  # None: not known before reading (a remote tar with no marker)
    tar: str | None = None  # URL of the tar, for tar units
    files: list[str] = field(default_factory=list)  # URLs of the images, for folder units


@dataclass
class Sample:
    key: str
    name: str  # where it came from, for messages: tar URL + key, or the file
    image: bytes
    caption: str | None
    latents: bytes | None = None  # its KEY.latents.npy member, in a tar that has one (output.save_latents)


@dataclass
class ImageSet:
    kind: str  # synthmill | tars | folder
    path: str
    units: list[Unit]
    image_size: tuple[int, int] | None = None  # (width, height) when every image is known to share it
    plan: dict[str, Any] | None = field(default=None, repr=False)  # a synthmill output's plan.json

    @property
    def num_samples(self) -> int | None:
        counts = [u.count for u in self.units]
        return None if any(c is None for c in counts) else sum(counts)

    @property
    def waiting(self) -> list[int]:
        """The units whose shards are not committed yet (a set opened ``growing``), in order."""
        return [u.index for u in self.units if u.identity is None]

    @property
    def first_unit(self) -> Unit:
        """The first unit that can be read: a growing set's first committed shard (it has one: see
        :func:`open_image_set`)."""
        return next(u for u in self.units if u.identity is not None)

    def committed_since(self, opts: dict[str, Any] | None = None) -> list[Unit]:
        """The units of a growing set whose shards were committed since it was opened or last asked, in order;
        each takes its place in ``units``. Verified as every evaluation verifies a shard (:func:`committed_shards`)."""
        waiting = self.waiting
        if not waiting:
            return []
        found = committed_shards(self.path, self.plan or {}, opts, waiting)
        for k, unit in found.items():
            self.units[k] = unit
        return [found[k] for k in sorted(found)]


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _read_plan(path: str, opts: dict[str, Any] | None) -> dict[str, Any] | None:
    """The folder's ``plan.json`` (None if it has none): a synthmill output has one."""
    from synthmill.errors import SpecError

    try:
        return storage.read_plan(path, opts)
    except SpecError as e:  # damaged: named under the set's field by the caller
        raise ImageSetError(str(e)) from None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _job_size(path: str, opts: dict[str, Any] | None) -> tuple[int, int] | None:
    """(width, height) of every image of a generate output, from its ``job.yaml``; None if it does not say."""
    import yaml

    url = storage.join(path, "job.yaml")
    try:
        job = yaml.safe_load(storage.read_bytes(url, opts))
    except FileNotFoundError:
        return None  # then the first image's header says
    except yaml.YAMLError as e:
        raise ImageSetError(f"{url}: not valid YAML ({type(e).__name__})") from None
    s = job.get("sampling") if isinstance(job, dict) else None
    prompts = job.get("prompts") if isinstance(job, dict) else None
    per_row = prompts.get("per_row") if isinstance(prompts, dict) else None
    if isinstance(s, dict) and (s.get("sizes") or (isinstance(per_row, dict) and per_row.get("size"))):
        return None  # images of several sizes: each image's header says
    if not isinstance(s, dict) or "width" not in s or "height" not in s:
        return None
    if not (_is_count(s["width"]) and _is_count(s["height"])):
        raise ImageSetError(f"{url}: sampling.width {s['width']!r} and sampling.height {s['height']!r} must be "
                            "positive whole numbers")
    return s["width"], s["height"]


def committed_shards(path: str, plan: dict[str, Any], opts: dict[str, Any] | None, ids: Any) -> dict[int, Unit]:
    """The units of the committed shards among ``ids`` of the generate output at ``path`` (``plan``: its plan.json):
    a shard's marker must hold the job's fingerprint and its tar's size (synthmill.sharding.units); its identity
    is the tar's sha256."""
    from synthmill.sharding.layout import OutputLayout
    from synthmill.sharding.plan import shard_fingerprint

    shards = OutputLayout(path, opts).shards
    fingerprint = shard_fingerprint(plan)  # a shard made before the prompts grew holds its part's
    done = shards.done(ids, lambda k: {"fingerprint": fingerprint(k)})
    return {k: Unit(k, f"sha256:{m['sha256']}", int(m["count"]), tar=shards.payload_url(k)) for k, m in done.items()}


def _planned_count(plan: dict[str, Any]) -> Callable[[int], int | None]:
    """``k ->`` the samples the plan gives shard k (None where the plan lacks the counts, an output of old code)."""
    from synthmill.sharding.plan import ShardPlan, earlier_parts

    prompts, samples, per = plan.get("prompts"), plan.get("samples"), plan.get("samples_per_shard")
    if not (prompts and samples and per):
        return lambda k: None
    shard_plan = ShardPlan(prompts, samples // prompts, per, 0, tuple(p["prompts"] for p in earlier_parts(plan)))
    return lambda k: len(shard_plan.samples(k))


def _synthmill_set(path: str, plan: dict[str, Any], opts: dict[str, Any] | None,
                   check_plan: Callable[[str, dict[str, Any]], None] | None, growing: bool) -> ImageSet:
    from synthmill.sharding.layout import OutputLayout
    from synthmill.sharding.plan import plan_problem

    problem = plan_problem(plan)
    if problem:
        raise ImageSetError(f"{storage.join(path, 'plan.json')}: {problem}; not the plan of a synthmill generate job")
    if check_plan is not None:
        check_plan(path, plan)
    n = plan["shards"]
    done = committed_shards(path, plan, opts, range(n))
    if len(done) < n and not (growing and done):
        raise ImageSetError(
            f"{path}: the generate job there is not complete ({len(done)} of {n} shards committed); "
            "run it to the end first (the same synthmill run command resumes it)")
    shards, planned = OutputLayout(path, opts).shards, _planned_count(plan)
    units = [done.get(k) or Unit(k, None, planned(k), tar=shards.payload_url(k)) for k in range(n)]
    return ImageSet("synthmill", path, units, _job_size(path, opts), plan)


def _count_tar(url: str, opts: dict[str, Any] | None) -> int | None:
    """Samples in a local tar (headers only); None for remote tars (counted while scoring)."""
    if not storage.is_local(url):
        return None
    keys = set()
    try:
        with tarfile.open(url, "r") as tf:
            for m in tf:
                if m.isreg():
                    stem, _, ext = os.path.basename(m.name).partition(".")
                    if ext.lower() in IMAGE_EXTS:
                        keys.add(os.path.join(os.path.dirname(m.name), stem))
    except (tarfile.TarError, EOFError) as e:
        raise ImageSetError(f"{url}: not a readable tar file ({type(e).__name__})") from None
    return len(keys)


def _tar_set(path: str, opts: dict[str, Any] | None) -> ImageSet:
    fs, inner = storage.filesystem(path, opts)
    if _has_glob(path):
        found = storage.retrying(path, "list", lambda: fs.glob(inner, detail=True))
    else:
        found = {inner: storage.retrying(path, "check", lambda: fs.info(inner))}
    tars = sorted((k, v) for k, v in found.items() if k.endswith(".tar") and v.get("type") != "directory")
    if not tars:
        raise ImageSetError(f"{path}: no .tar files match")
    units = []
    for i, (name, info) in enumerate(tars):
        url = name if storage.is_local(path) else f"{fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]}://{name}"
        units.append(Unit(i, f"size:{info.get('size')}:{storage.modified_stamp(info)}", _count_tar(url, opts), tar=url))
    return ImageSet("tars", path, units)


def _folder_set(path: str, opts: dict[str, Any] | None, per_unit: int) -> ImageSet:
    fs, inner = storage.filesystem(path, opts)
    listing = storage.retrying(path, "list", lambda: fs.find(inner, detail=True))

    def stamp(name: str) -> list:
        """What says a file changed: its size and modification time or ETag (an image rewritten at the same
        size, a BMP of other colours, is then scored again), or None for a file that is not there."""
        info = listing.get(name)
        if info is None:
            return None
        return [int(info.get("size") or 0), storage.modified_stamp(info)]

    images = sorted(
        (k, stamp(k), stamp(k.rsplit(".", 1)[0] + ".txt")) for k in listing
        if k.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and not os.path.basename(k).startswith(".")
    )
    if not images:
        raise ImageSetError(f"{path}: no image files ({', '.join(IMAGE_EXTS)}) in this folder")
    if not storage.is_local(path):
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        images = [(f"{proto}://{k}", *rest) for k, *rest in images]
    units = []
    for i in range(0, len(images), per_unit):
        chunk = images[i:i + per_unit]  # each image with its caption's stamp: a changed caption changes CLIP
        ident = hashlib.sha256(json.dumps(chunk).encode()).hexdigest()[:32]
        units.append(Unit(len(units), f"files:{ident}", len(chunk), files=[k for k, *_ in chunk]))
    return ImageSet("folder", path, units)


def open_image_set(path: str, opts: dict[str, Any] | None = None, samples_per_unit: int = 1000,
                   check_plan: Callable[[str, dict[str, Any]], None] | None = None,
                   growing: bool = False) -> ImageSet:
    """Plan the units of the set at ``path``. Raises ImageSetError or storage.StorageError.

    ``check_plan(path, plan)`` is given the plan.json of a synthmill output, once its counts are sound and
    before its shards are read, to check it against the output's job.yaml (which this layer cannot load).

    ``growing``: a synthmill output whose generate job is still running, with at least one shard committed: every
    shard of its plan is a unit (one per shard, as when it is complete), those not committed yet without an
    identity and with the plan's sample count; :meth:`ImageSet.committed_since` fills them in."""
    if storage.is_local(path):
        path = os.path.expanduser(path)
        if not _has_glob(path) and not os.path.exists(path):
            raise ImageSetError(f"{path}: not found")
        if _has_glob(path) and not globlib.glob(path):
            raise ImageSetError(f"{path}: no files match")
    if _has_glob(path) or path.endswith(".tar"):
        return _tar_set(path, opts)
    fs, inner = storage.filesystem(path, opts)
    if not storage.retrying(path, "check", lambda: fs.isdir(inner)):
        raise ImageSetError(f"{path}: not a folder, a .tar or a glob of tars")
    plan = _read_plan(path, opts)
    if isinstance(plan, dict) and plan.get("kind") == "generate":
        return _synthmill_set(path, plan, opts, check_plan, growing)
    return _folder_set(path, opts, samples_per_unit)


def _text(data: bytes | None, name: str) -> str | None:
    """A caption's text; ImageSetError naming the sample when it is not UTF-8."""
    try:
        return None if data is None else data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ImageSetError(f"{name}: its caption (.txt) is not UTF-8 text ({e.reason} at byte {e.start})") from None


def iter_unit(unit: Unit, opts: dict[str, Any] | None = None, captions: bool = True) -> Iterator[Sample]:
    """The unit's samples in order, streamed (one sample's bytes at a time); ``captions=False``: without
    their captions (None), which are then neither read from a folder nor decoded."""
    if unit.tar is not None:
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        fs, inner = storage.filesystem(unit.tar, opts)
        with fs.open(inner, "rb") as fh:
            try:
                for s in group_by_keys(dict(f, __url__=unit.tar) for f in tar_file_iterator(fh)):
                    ext = next((e for e in IMAGE_EXTS if e in s), None)
                    if ext is None:
                        continue  # a sample without an image (say, metadata only)
                    name = f"{unit.tar}:{s['__key__']}"
                    yield Sample(s["__key__"], name, s[ext], _text(s.get("txt"), name) if captions else None,
                                 s.get(LATENTS))
            except tarfile.TarError as e:
                raise ImageSetError(f"{unit.tar}: not a readable tar file ({type(e).__name__})") from None
        return
    for url in unit.files:
        fs, inner = storage.filesystem(url, opts)
        data = storage.retrying(url, "read", lambda fs=fs, inner=inner: fs.cat_file(inner))
        caption = None
        try:
            caption = fs.cat_file(inner.rsplit(".", 1)[0] + ".txt") if captions else None
        except FileNotFoundError:
            pass
        yield Sample(os.path.basename(inner.rsplit(".", 1)[0]), url, data, _text(caption, url))


def check_pixels(size: tuple[int, int], limit: int | None, name: str, field: str) -> None:
    """ImageSetError naming ``name`` when an image of ``size`` (from its header) has more than ``limit`` pixels
    (``field`` sets the limit); None: no limit."""
    w, h = size
    if limit is not None and w * h > limit:
        raise ImageSetError(f"{name}: image is {w}x{h} ({w * h:,} pixels), more than {field} allows ({limit:,}); "
                            "it is not decoded (raise the limit to read it, at ~3 bytes per pixel decoded)")


def check_first_sample(images: ImageSet, opts: dict[str, Any] | None, why: str,
                       max_pixels: int | None = None, field: str = "max_image_pixels") -> None:
    """The set's first sample (a growing set's: its first committed shard's) must be a readable image with a
    caption, of at most ``max_pixels`` pixels (the rest are checked as they stream).

    Reads that one sample only. ``why`` says what needs the caption. Raises ImageSetError naming the sample.
    """
    from PIL import Image

    first = images.first_unit
    samples = iter_unit(first, opts)
    try:
        sample = next(samples, None)
    finally:
        samples.close()  # the unit's tar, if any
    if sample is None:
        raise ImageSetError(f"{images.path}: {first.tar or first.files[0]} holds no images")
    if sample.caption is None:
        raise ImageSetError(f"{images.path}: {sample.name} has no caption (a .txt beside the image); {why}")
    check_pixels(image_size(sample.image, f"{images.path}: {sample.name}"), max_pixels,
                 f"{images.path}: {sample.name}", field)
    try:
        with Image.open(io.BytesIO(sample.image)) as im:
            im.verify()
    except Exception as e:
        raise ImageSetError(f"{images.path}: {sample.name}: not a readable image ({type(e).__name__})") from None


def image_size(image: bytes | str, name: str) -> tuple[int, int]:
    """(width, height) from the header of an image (its bytes, or a local file); ImageSetError naming ``name``
    when it is not a readable image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            return im.size
    except Image.DecompressionBombError:  # PIL's own limit, from the header too: twice Image.MAX_IMAGE_PIXELS
        raise ImageSetError(f"{name}: image has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, which PIL refuses "
                            "to open; it is not decoded") from None
    except (OSError, SyntaxError, ValueError) as e:
        # UnidentifiedImageError is an OSError
        raise ImageSetError(f"{name}: not a readable image ({type(e).__name__})") from None


def first_image_size(unit: Unit, opts: dict[str, Any] | None = None, max_pixels: int | None = None,
                     field: str = "max_image_pixels") -> tuple[int, int]:
    """(width, height) of the unit's first image, reading only that image's header; at most ``max_pixels``
    pixels (see :func:`check_pixels`)."""
    for s in iter_unit(unit, opts):
        size = image_size(s.image, s.name)
        check_pixels(size, max_pixels, s.name, field)
        return size
    raise ImageSetError(f"{unit.tar or unit.files[0]}: holds no images")
