"""Remote pipeline folders (``s3://...``), and the UNet folders and LoRA files of ``model.unet`` / ``model.lora``:
fetched once per node into a local cache, then loaded.

The cache key is the URL plus the listing (names, sizes, ETags), so a changed model is fetched again.
Actors on one node take a file lock: the first downloads into a temporary folder and renames it
into place; the others wait and then find it complete. A temporary folder left by a fetch that died
(its lock went with its process) is removed by the next one.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import uuid
from typing import Any

from synthmill.sharding import storage

log = logging.getLogger(__name__)


def cache_root() -> str:
    """``SYNTHMILL_CACHE`` or ``~/.cache/synthmill``; models go under ``models/``."""
    return os.path.join(os.environ.get("SYNTHMILL_CACHE") or os.path.expanduser("~/.cache/synthmill"), "models")


def local_model_path(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """A local copy of the pipeline folder at ``url`` (downloaded at most once per node and version); for a single
    file (a LoRA's weights), the path of its copy, which keeps the file's name."""
    from filelock import FileLock

    fs, path = storage.filesystem(url, storage_options)
    path = path.rstrip("/")
    listing = storage.retrying(url, "list", lambda: fs.find(path, detail=True))
    files = sorted((k[len(path):].lstrip("/"), int(v.get("size") or 0), str(v.get("ETag", "")))
                   for k, v in listing.items())
    if not files:
        raise FileNotFoundError(f"{url}: no files")
    single = [rel for rel, _, _ in files] == [""]  # url is a file: find lists it alone, under its own name
    key = hashlib.sha256(json.dumps([url, files]).encode()).hexdigest()[:20]
    root = cache_root()
    os.makedirs(root, exist_ok=True)
    dest = os.path.join(root, key)
    name = path.rsplit("/", 1)[-1]
    result = os.path.join(dest, name) if single else dest
    with FileLock(dest + ".lock"):
        if os.path.isfile(os.path.join(dest, ".complete")):
            return result
        for stale in glob.glob(glob.escape(dest) + ".tmp-*"):  # a fetch that died holding the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
        log.info("fetching %s (%d files) into %s", url, len(files), dest)
        for rel, _, _ in files:
            target = os.path.join(tmp, rel or name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            remote = storage.join(url, rel) if rel else url
            inner = f"{path}/{rel}" if rel else path
            storage.retrying(remote, "download", lambda inner=inner, target=target: fs.get_file(inner, target))
        open(os.path.join(tmp, ".complete"), "w").close()
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    return result
