"""Writing one shard: a deterministic WebDataset tar in a local temporary file, hashed as it is written.

Members are written in sample order, each sample's members sorted by extension (``json``, image,
``txt``), with a fixed mtime, owner and mode, so the same samples always give the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import BinaryIO

from synthmill.errors import disk_full

#: mtime of every member (2000-01-01T00:00:00Z): fixed so tars are reproducible.
FIXED_MTIME = 946684800
TMP_SUFFIX = ".tar.tmp"


class _HashingFile:
    """A write-only file wrapper that keeps a running sha256 and byte count."""

    def __init__(self, fh: BinaryIO):
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0
        self.dropped = False  # after a failure: what tarfile still writes (its end blocks, at collection) goes nowhere

    def write(self, data) -> int:
        if self.dropped:
            return len(data)
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()

    def tell(self) -> int:
        return self.size


class ShardTarWriter:
    """Write samples (dicts of extension -> bytes, plus ``__key__``) to a temporary tar; then :meth:`close`."""

    def __init__(self, tmp_dir: str | None = None, prefix: str = "shard-"):
        # ".tmp", not ".tar": no reader's "*.tar" glob may ever pick up an unfinished shard.
        fd, self.path = tempfile.mkstemp(prefix=prefix, suffix=TMP_SUFFIX, dir=tmp_dir)
        self._fh = os.fdopen(fd, "wb")
        self._hashing = _HashingFile(self._fh)
        from webdataset import TarWriter  # here, not at import: webdataset imports torch (seconds)

        self._tar = TarWriter(self._hashing, encoder=False, mtime=FIXED_MTIME, user="synthmill", group="synthmill")

    def write(self, sample: dict[str, bytes | str]) -> None:
        try:
            self._tar.write(sample)
            self._tar.tarstream.members.clear()  # tarfile keeps each header written; none is read again
        except OSError as e:
            raise disk_full(e, self.path) or e from None

    def close(self) -> tuple[str, int, str]:
        """Finish the tar; return (local path, size in bytes, sha256 hex)."""
        try:
            self._tar.close()
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        except OSError as e:
            raise disk_full(e, self.path) or e from None
        return self.path, self._hashing.size, self._hashing.sha.hexdigest()

    def discard(self) -> None:
        """Drop the temporary file (after a failure). Nothing more is written to it, the tar's end blocks included:
        tarfile writes those when the tar is collected, into a file already closed ('Exception ignored ...')."""
        self._hashing.dropped = True
        try:
            self._fh.close()
        except OSError:
            pass  # the buffered rest could not be written either (no space left): the file goes anyway
        finally:
            if os.path.exists(self.path):
                os.unlink(self.path)
