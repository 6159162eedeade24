"""The two ways a job ends badly, and the exit codes the CLI gives them (docs/design.md,
"Command line (frozen: extend, don't rename)")."""

from __future__ import annotations


class SpecError(ValueError):
    """Invalid spec or bad input: one line naming the field, file or URL, and the fix. Exit code 2.

    Raised before any model is loaded and before anything is written under ``output.path``.
    """

    exit_code = 2


class JobFailed(RuntimeError):
    """The job ran and some of its work failed (the message names the failed shards). Exit code 1."""

    exit_code = 1


class DiskFull(OSError):
    """A write found no room: no space left on the device (ENOSPC), a disk quota used up (EDQUOT), or a file larger
    than the file system or the process may write (EFBIG, ``ulimit -f``). The message names the file. Exit code 1:
    what was committed is kept, and the same command resumes once there is room."""

    exit_code = 1


#: The errors of a write that found no room (see :class:`DiskFull`), and how they read in messages that lost it.
FULL_ERRNOS = (28, 122, 27)  # ENOSPC, EDQUOT, EFBIG (Linux)
_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large")


def disk_full(exc: BaseException, path: str) -> DiskFull | None:
    """``exc`` as a :class:`DiskFull` naming ``path``, when it is an OSError of a write that found no room (pyarrow's
    carry the errno in their text only); else None."""
    if isinstance(exc, DiskFull):
        return exc
    if not isinstance(exc, OSError):
        return None
    text = str(exc)
    if exc.errno not in FULL_ERRNOS and not any(t in text for t in _FULL_TEXTS):
        return None
    why = next((t for t in _FULL_TEXTS if t in text), exc.strerror or text)
    full = DiskFull(f"{path}: cannot be written, no space left ({why})")
    full.errno = exc.errno if exc.errno in FULL_ERRNOS else FULL_ERRNOS[0]
    return full


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or the name of its type when the message is empty."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
