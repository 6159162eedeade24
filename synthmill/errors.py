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


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or the name of its type when the message is empty."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
