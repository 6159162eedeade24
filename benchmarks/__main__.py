"""``python -m benchmarks`` runs the generate, Frechet-distance, feature-extraction, distill, driver-scale and start-up benchmarks with their defaults.

    python -m benchmarks                    # generate, fid, extract, distill, driver, startup
    python -m benchmarks fid --smoke        # one benchmark by name (generate, fid, extract, distill, chaos, driver, startup), with its own flags
    python -m benchmarks --smoke            # flags without a name: the generate benchmark alone, as before
"""

import sys
from typing import Callable


def _generate(argv: list[str]) -> int:
    from benchmarks.generate import main

    return main(argv)


def _fid(argv: list[str]) -> int:
    from benchmarks.fid import main

    return main(argv)


def _extract(argv: list[str]) -> int:
    from benchmarks.extract import main

    return main(argv)


def _distill(argv: list[str]) -> int:
    from benchmarks.distill import main

    return main(argv)


def _driver(argv: list[str]) -> int:
    from benchmarks.driver import main

    return main(argv)


def _startup(argv: list[str]) -> int:
    from benchmarks.startup import main

    return main(argv)


def _chaos(argv: list[str]) -> int:
    from benchmarks.chaos import main

    main(argv)  # returns its figures, not an exit code
    return 0


BENCHMARKS: dict[str, Callable[[list[str]], int]] = {"generate": _generate, "fid": _fid, "extract": _extract,
                                                      "distill": _distill, "startup": _startup, "chaos": _chaos, "driver": _driver}
DEFAULT = ("generate", "fid", "extract", "distill", "driver", "startup")  # what a bare ``python -m benchmarks`` runs, in this order


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in BENCHMARKS:
        return BENCHMARKS[argv[0]](argv[1:])
    if argv and not argv[0].startswith("-"):
        raise SystemExit(f"unknown benchmark {argv[0]!r}; choose from {', '.join(BENCHMARKS)}")
    if argv:
        return _generate(argv)
    for name in DEFAULT:
        print(f"== {name} ==", flush=True)
        code = BENCHMARKS[name]([])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
