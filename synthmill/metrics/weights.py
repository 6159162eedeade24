"""The FID Inception weights: the standard file from its URL (sha256-checked, cached), or a given file.

The standard file is ``pt_inception-2015-12-05-6726825d.pth``: TensorFlow's 2015-12-05 Inception graph
ported to PyTorch, the file pytorch-fid and torch-fidelity both load (not torchvision's ImageNet
weights). Like ``torch.hub``, which both libraries use, it is checked against the sha256 prefix in
its name (``6726825d``); ``fid.weights_sha256`` asks for a full (or any other) digest instead.

A remote file (``https://``, ``s3://``, any fsspec URL) is downloaded once per node into
``SYNTHMILL_CACHE/weights/`` under a file lock and checked before it is renamed into place, so a
damaged or wrong download never enters the cache. A local path is used where it lies.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from typing import Any

from synthmill.errors import first_line
from synthmill.sharding import storage

log = logging.getLogger(__name__)

STANDARD_SHA256_PREFIX = "6726825d"


class WeightsError(ValueError):
    """The weights file is missing, unreadable, or not the file the spec asks for."""


def standard_url() -> str:
    """Where pytorch-fid downloads the standard file from (its own constant, not a copy)."""
    from pytorch_fid.inception import FID_WEIGHTS_URL

    return FID_WEIGHTS_URL


def cache_dir() -> str:
    root = os.environ.get("SYNTHMILL_CACHE") or os.path.expanduser("~/.cache/synthmill")
    return os.path.join(root, "weights")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _check(where: str, digest: str, expected: str | None) -> None:
    if expected and not digest.startswith(expected.lower()):
        raise WeightsError(f"{where}: sha256 is {digest}, expected {expected}; not the weights file asked for")


def resolve(weights: str | None, sha256: str | None = None,
            storage_options: dict[str, Any] | None = None) -> tuple[str, str]:
    """(local path, sha256) of the Inception weights; ``weights=None`` means the standard file."""
    url = weights or standard_url()
    expected = sha256 or (STANDARD_SHA256_PREFIX if weights is None else None)
    if storage.is_local(url):
        path = os.path.abspath(os.path.expanduser(url))
        if not os.path.isfile(path):
            raise WeightsError(f"{url}: weights file not found")
        digest = sha256_file(path)
        _check(url, digest, expected)
        return path, digest
    from filelock import FileLock

    folder = cache_dir()
    os.makedirs(folder, exist_ok=True)
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    path = os.path.join(folder, f"{key}-{os.path.basename(url.rstrip('/')) or 'weights.pth'}")
    with FileLock(path + ".lock"):
        if os.path.isfile(path):
            digest = sha256_file(path)
            try:
                _check(f"{url} (cached at {path})", digest, expected)
                return path, digest
            except WeightsError:
                log.warning("cached %s does not match; downloading again", path)
                os.unlink(path)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs, inner = storage.filesystem(url, storage_options)
        log.info("downloading %s", url)
        try:
            storage.retrying(url, "download", lambda: fs.get_file(inner, tmp))
        except FileNotFoundError:
            raise WeightsError(f"{url}: weights file not found") from None
        try:
            digest = sha256_file(tmp)
            _check(url, digest, expected)
        except BaseException:
            os.unlink(tmp)
            raise
        os.replace(tmp, path)
    return path, digest


def load_state_dict(path: str) -> dict[str, Any]:
    """The file's tensors, loaded without running pickled code (``weights_only``)."""
    import torch

    if os.path.getsize(path) == 0:
        raise WeightsError(f"{path}: an empty file, not a PyTorch state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: not a PyTorch state dict of plain tensors ({type(e).__name__}: "
                           f"{first_line(e)[:200]})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state
