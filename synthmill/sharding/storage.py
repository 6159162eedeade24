"""Storage behind string URIs: local paths and ``s3://`` (any fsspec URL) through one small API.

Commit semantics (DESIGN.md invariant 3): :func:`put_file` and :func:`write_bytes` make an object
visible only when it is complete: locally by writing a temporary sibling and renaming it over the
target (atomic on POSIX), on object stores by a single completed upload.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path inside it."""
    return url_to_fs(url, **(storage_options or {}))


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    return "://" not in url or url.startswith("file://")


def join(url: str, *parts: str) -> str:
    """Join URL path segments with '/' (also for local paths)."""
    out = url.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data`` to ``url`` so that readers see either nothing or all of it."""
    if is_local(url):
        path = _local_path(url)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    fs, path = filesystem(url, storage_options)
    fs.pipe_file(path, data)


def put_file(local_path: str, url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Move or upload a finished local file to ``url``, atomically (see module doc)."""
    if is_local(url):
        dest = _local_path(url)
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        try:
            os.replace(local_path, dest)
        except OSError:  # another device: copy next to the target, then rename
            import shutil

            tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, dest)
        return
    fs, path = filesystem(url, storage_options)
    fs.put_file(local_path, path)


def write_json(url: str, obj: Any, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``obj`` as sorted, indented JSON, atomically."""
    write_bytes(url, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), storage_options)


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """Read a JSON file; ``None`` if it does not exist."""
    fs, path = filesystem(url, storage_options)
    try:
        with fs.open(path, "rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        return None


def list_sizes(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """Names (not paths) -> sizes of the files directly in folder ``url``; empty if it does not exist."""
    fs, path = filesystem(url, storage_options)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries if e.get("type") == "file"}
