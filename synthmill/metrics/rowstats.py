"""Per-image features that a statistics file keeps, so that it can stand in for a set of images.

KID, precision/recall and CMMD need every image's features, not a mean and covariance. Their feature totals
(:class:`StoredRows`) hand their rows to the set's statistics file (``fid_stats.npz``, ``reference_stats.npz``:
:func:`synthmill.metrics.fid.write_set_stats`), under the feature's name, with the settings that made them;
:func:`load_rows` reads them back from a file given as ``reference.path`` and refuses rows made otherwise.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from synthmill.errors import SpecError
from synthmill.metrics.base import Finish, RowsTotal
from synthmill.metrics.fid import read_reference
from synthmill.sharding import storage


@dataclass
class ReferenceRows:
    """A reference given as a statistics file: the per-image rows of one feature, and how they were made."""

    path: str
    rows: np.ndarray
    meta: dict[str, Any]


class StoredRows(RowsTotal):
    """A set's per-image rows of one feature (every unit's, in unit order), written to the set's statistics file
    with ``made_by(spec)``: the settings that made them, as 0-d arrays."""

    def __init__(self, key: str, made_by: Callable[[Any], dict[str, Any]]):
        super().__init__(key)
        self.made_by = made_by

    def stats_arrays(self, spec: Any) -> dict[str, np.ndarray]:
        return {self.key: self.values, **{k: np.array(v) for k, v in self.made_by(spec).items()}}


def load_rows(path: str, opts: dict[str, Any] | None, key: str, dim: int | None, want: Mapping[str, Any],
              metric: str) -> ReferenceRows:
    """The rows ``key`` of the statistics file ``path``, checked: real numbers, ``dim`` columns (None: any), and
    each setting of ``want`` (name -> value, as the file stores it) equal to this job's."""
    data = read_reference(path, opts)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if key not in z.files:
                raise SpecError(f"reference.path {path}: {metric} needs the per-image array '{key}' (has: "
                                f"{', '.join(z.files) or 'none'}); a statistics file written by an evaluate job that "
                                f"computed {metric} with reference images holds it")
            rows = z[key]
            meta = {k: z[k].item() for k in want if k in z.files and z[k].ndim == 0}
    except SpecError:
        raise
    except Exception as e:
        raise SpecError(f"reference.path {path}: not a readable .npz ({type(e).__name__}: {e})") from None
    if rows.dtype.kind != "f" or rows.ndim != 2 or (dim is not None and rows.shape[1] != dim):
        raise SpecError(f"reference.path {path}: '{key}' is {rows.dtype.name} of shape {rows.shape}, not real rows of "
                        f"{dim if dim is not None else 'equal'} columns")
    if not np.isfinite(rows).all():
        raise SpecError(f"reference.path {path}: '{key}' holds NaN or infinite values")
    for name, value in want.items():
        if name not in meta:
            raise SpecError(f"reference.path {path}: does not say which {name} made '{key}'; {metric} across "
                            "networks or preprocessing is not comparable")
        if meta[name] != value:
            raise SpecError(f"reference.path {path}: its '{key}' was made with {name}={meta[name]!r}, this job uses "
                            f"{value!r}; {metric} across networks or preprocessing is not comparable")
    return ReferenceRows(path, rows, meta)


def reference_rows(f: Finish, metric: str, feature: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The reference's rows of ``feature`` (from the stats file ``metric`` loaded, else from the merged images),
    and how metrics.json describes the reference. A reference of images gets its statistics file written."""
    from synthmill.metrics.fid import write_set_stats

    loaded = f.references.get(metric)
    if loaded is not None:
        return loaded.rows, {"kind": "stats", "path": storage.redact_url(loaded.path), "samples": len(loaded.rows)}
    written, _, _ = write_set_stats(f, "reference")
    return f.totals["reference"][feature].values, {
        "kind": f.reference_kind, "path": storage.redact_url(f.spec.reference.path),
        "stats_written": storage.redact_url(written)}
