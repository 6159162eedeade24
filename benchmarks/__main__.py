"""``python -m benchmarks`` runs the generate, Frechet-distance, feature-extraction, distill, driver-scale and start-up benchmarks with their defaults.

    python -m benchmarks                    # generate, fid, extract, distill, driver, startup
    python -m benchmarks fid --smoke        # one benchmark by name (generate, fid, extract, distill, chaos, driver, startup), with its own flags
    python -m benchmarks --smoke            # flags without a name: the generate benchmark alone, as before
"""

import importlib
import sys
from typing import Callable


def _runner(module: str, returns_code: bool = True) -> Callable[[list[str]], int]:
    """``benchmarks.MODULE.main``, imported only when that benchmark runs."""

    def run(argv: list[str]) -> int:
        result = importlib.import_module(f"benchmarks.{module}").main(argv)
        return result if returns_code else 0  # chaos returns its figures, not an exit code

    return run


BENCHMARKS: dict[str, Callable[[list[str]], int]] = {
    name: _runner(name, returns_code=name != "chaos")
    for name in ("generate", "fid", "extract", "distill", "driver", "startup", "chaos")
}
DEFAULT = ("generate", "fid", "extract", "distill", "driver", "startup")  # what a bare ``python -m benchmarks`` runs, in this order


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in BENCHMARKS:
        return BENCHMARKS[argv[0]](argv[1:])
    if argv and not argv[0].startswith("-"):
        raise SystemExit(f"unknown benchmark {argv[0]!r}; choose from {', '.join(BENCHMARKS)}")
    if argv:
        return BENCHMARKS["generate"](argv)
    for name in DEFAULT:
        print(f"== {name} ==", flush=True)
        code = BENCHMARKS[name]([])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
