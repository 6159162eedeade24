"""Every file of a synthmill output, named in one place (docs/design.md, "Output layout").

An output is a folder (a local path, ``file://`` URL, or an object-store prefix) that one job owns:

``plan.json`` (written first: it makes the folder the job's), ``job.yaml`` (the resolved spec), the units
of work (``shards/K.tar`` with ``index/K.parquet`` and the marker ``shards/K.json`` for generate;
``partials/SET/K.npz`` with ``partials/SET/K.json`` for evaluate), ``failures.json`` while some units have
failed, ``logs/`` once an actor has failed (a file per failure, its whole error; never a unit), and the job's
own commit, written last: ``summary.json`` (generate, distill) or ``metrics.json`` (evaluate). Generate adds
``index.parquet``; evaluate ``fid_stats.npz`` and ``reference_stats.npz``; distill ``metrics.jsonl``,
``checkpoints/`` and ``pipeline/``.

A ``file://`` URL is the local folder it names: :class:`OutputLayout` keeps it as that plain path, so code
that works on local files (temporaries, Ray Train's storage, the pipeline export) never sees the scheme.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from synthmill.sharding import storage
from synthmill.sharding.units import CommittedUnits

PLAN = "plan.json"
JOB_YAML = "job.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.json"
SCORES = "scores.parquet"  # an evaluation's per-sample numbers
FAILURES = "failures.json"
INDEX = "index.parquet"
FID_STATS = "fid_stats.npz"
REFERENCE_STATS = "reference_stats.npz"
TRAIN_LOG = "metrics.jsonl"
PIPELINE = "pipeline"
CHECKPOINTS = "checkpoints"
SHARDS = "shards"
INDEX_PARTS = "index"
PARTIALS = "partials"
LOGS = "logs"  # the full text of each failure of the actors, a file each (cluster.pool.FailureLog)


def normal_url(url: str) -> str:
    """``url`` with a ``file://`` scheme taken off (the same local folder); other URLs and paths as given."""
    return storage.path_of(url) if url.startswith("file://") else url


@dataclass(frozen=True)
class OutputLayout:
    """The files of the output at ``url`` (its storage options beside it)."""

    url: str
    storage_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", normal_url(self.url))

    @property
    def is_local(self) -> bool:
        return storage.is_local(self.url)

    @property
    def opts(self) -> dict[str, Any] | None:
        return dict(self.storage_options) if self.storage_options is not None else None

    def file(self, *parts: str) -> str:
        """The URL of a file or folder of the output, e.g. ``layout.file(SUMMARY)``."""
        return storage.join(self.url, *parts)

    def local_path(self, *parts: str) -> str:
        """The absolute path of a file of a local output (the output must be local)."""
        if not self.is_local:
            raise ValueError(f"{self.url} is not a local folder")
        return os.path.abspath(storage.path_of(self.file(*parts)))

    @property
    def shards(self) -> CommittedUnits:
        """Generate's shards: ``shards/K.tar``, then ``index/K.parquet``, then the marker ``shards/K.json``."""
        return CommittedUnits(self.file(SHARDS), ".tar", "shard", ((self.file(INDEX_PARTS), ".parquet"),),
                              self.storage_options)

    def partials(self, set_name: str) -> CommittedUnits:
        """Evaluate's partial results of one image set: ``partials/SET/K.npz``, then ``partials/SET/K.json``."""
        return CommittedUnits(self.file(PARTIALS, set_name), ".npz", "unit", (), self.storage_options)

    # The few reads and writes every job makes of its own files.
    def read_json(self, name: str) -> Any:
        """A JSON file of the output; a damaged one (a run killed mid-write of an older version) as absent."""
        return storage.read_json(self.file(name), self.opts, damaged_as_missing=True)

    def write_json(self, name: str, obj: Any) -> None:
        storage.write_json(self.file(name), obj, self.opts)

    def remove(self, name: str) -> None:
        storage.remove(self.file(name), self.opts)
