"""What an actor or training worker checks before it loads anything: that it sees the driver's local files.

The driver checked every input a spec names and wrote ``plan.json`` in a local output before it started any
actor. A node that does not see them has its own disk, not the driver's: it would fail each unit on a
missing file, or write where the driver never looks. A local path needs a file system every node of the
cluster shares. The driver hands each actor the paths to check as :class:`NodePath` values (the job layer
knows which fields hold paths and how each is read; this layer only looks at the files).
"""

from __future__ import annotations

import glob
import os
import socket
from dataclasses import dataclass

from synthmill.sharding import storage
from synthmill.sharding.layout import PLAN


@dataclass(frozen=True)
class NodePath:
    """A local path of the spec: its field, its value, and how it is read (the kinds of path in
    :func:`synthmill.jobs.spec.resolve_paths`: ``input``, ``output``, ``name_or_path``, ``arch``, ``clip``...)."""

    field: str
    value: str
    how: str


def check_node_sees(paths: list[NodePath]) -> None:
    """RuntimeError naming the field when this node does not see one of the local ``paths``."""
    for p in paths:
        value = p.value
        path = value[len("local-dir:"):] if p.how == "clip" and value.startswith("local-dir:") else value
        if not storage.is_local(path) or (p.how == "clip" and path == value):
            continue
        path = storage.path_of(path)
        if p.how in ("name_or_path", "arch") and not os.path.isabs(path):
            continue  # a hub id or a name (the driver made every local one absolute)
        if p.how == "output":
            seen, what = os.path.isfile(os.path.join(path, PLAN)), f"the {PLAN} the driver wrote there"
        else:
            seen, what = (bool(glob.glob(path)) if glob.has_magic(path) else os.path.exists(path)), "it"
        if not seen:
            raise RuntimeError(
                f"{p.field} {value}: this node ({socket.gethostname()}) does not see {what}; a local path must be "
                "on storage every node of the cluster shares (NFS or the like), else use s3://")
