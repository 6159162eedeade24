"""``python -m benchmarks`` runs the generate, Frechet-distance, feature-extraction, distill, driver-scale and
start-up benchmarks with their defaults.

    python -m benchmarks                    # generate, fid, extract, distill, driver, startup
    python -m benchmarks fid --smoke        # one benchmark by name, with its own flags
                                            # (generate, fid, extract, evaluate-all, distill, chaos, driver, startup,
                                            # scale, filter, study, train)
    python -m benchmarks --smoke            # flags without a name: the generate benchmark alone, as before
    python -m benchmarks gpu                # on a GPU machine: generate at full size
                                            # (SD 1.5 @512, SSD-1B and SDXL @1024) and distill
    python -m benchmarks gpu 0 3            # only those entries of GPU_RUNS (0-based), in the order given

Every run but a ``--smoke`` one is recorded in ``benchmarks/RESULTS.md`` (benchmarks/record.py): its printed
output under the command and the machine. ``--no-record`` (before the name) leaves the file alone.
"""

import importlib
import sys
from collections.abc import Callable

from benchmarks.record import Tee, record


def _runner(module: str, returns_code: bool = True) -> Callable[[list[str]], int]:
    """``benchmarks.MODULE.main`` (a name's dashes as underscores), imported only when that benchmark runs."""
    module = module.replace("-", "_")

    def run(argv: list[str]) -> int:
        result = importlib.import_module(f"benchmarks.{module}").main(argv)
        return result if returns_code else 0  # chaos returns its figures, not an exit code

    return run


BENCHMARKS: dict[str, Callable[[list[str]], int]] = {
    name: _runner(name, returns_code=name != "chaos")
    for name in ("generate", "fid", "extract", "evaluate-all", "distill", "driver", "startup", "chaos", "scale",
                 "filter", "study", "train")
}
# what a bare ``python -m benchmarks`` runs, in this order
DEFAULT = ("generate", "fid", "extract", "distill", "driver", "startup")

#: ``python -m benchmarks gpu``: (name, arguments) in order; each a separate recorded run. Random full-size
#: weights (synthmill.testing.full_size), float16, the plain diffusers loop as the baseline in every row.
#: Seconds each took on an NVIDIA H200 (2026-11-30), where it ran to the end: 0: 279, 3: 199. The others are
#: sized from those rates (SD 1.5 @512 ~5 images/s at batch 16, SDXL @1024 ~1): 1 and 4 did not finish in
#: the 80 s and 165 s left to them at their earlier sizes (128 prompts, two repeats; 64 prompts from batch 1).
GPU_RUNS: tuple[tuple[str, list[str]], ...] = (
    ("generate", ["--arch", "sd15", "--size", "512", "--steps", "25", "--prompts", "128", "--batch-size", "16",
                  "--samples-per-shard", "64", "--repeats", "2"]),
    ("generate", ["--arch", "sd15", "--size", "512", "--steps", "25", "--prompts", "64", "--batch-size", "16",
                  "--samples-per-shard", "64", "--repeats", "1", "--compile", "--no-ray-data"]),
    ("generate", ["--arch", "ssd-1b", "--size", "1024", "--steps", "20", "--prompts", "32", "--batch-size", "4",
                  "--samples-per-shard", "16", "--repeats", "1"]),
    ("generate", ["--arch", "sdxl", "--size", "1024", "--steps", "20", "--prompts", "32", "--batch-size", "4",
                  "--samples-per-shard", "16", "--repeats", "1", "--no-ray-data"]),
    ("generate", ["--arch", "sd15", "--size", "512", "--steps", "25", "--prompts", "32", "--repeats", "1",
                  "--batch-sweep", "2,8,16,32"]),
    ("generate", ["--arch", "sdxl", "--size", "1024", "--steps", "20", "--prompts", "8", "--repeats", "1",
                  "--batch-sweep", "2,4,8"]),
    ("distill", ["--teacher", "sd-v1.4", "--size", "512", "--batch", "8"]),
    # SDXL with channels-last off in synthmill: entry 3's synthmill images differed from the plain loop's
    # (0/32 identical; SD 1.5's were all identical). Channels-last weights stay so when SDXL's pipeline
    # upcasts its VAE to float32 for the decode, where cuDNN may pick other kernels than for the plain
    # loop's contiguous ones; this run tells whether that is the difference.
    ("generate", ["--arch", "sdxl", "--size", "1024", "--steps", "20", "--prompts", "8", "--batch-size", "4",
                  "--samples-per-shard", "8", "--repeats", "1", "--no-ray-data", "--channels-last", "false"]),
    # finetune, LCM and LCM-LoRA at SD 1.x's full size against the plain loop of each objective
    ("train", ["--teacher", "sd-v1.4", "--size", "512", "--batch", "8", "--steps", "20", "--warmup", "5",
               "--workers", "1", "--rank", "64", "--gradient-checkpointing"]),
)


def gpu_runs(indices: list[str]) -> tuple[tuple[str, list[str]], ...]:
    """The GPU_RUNS entries at ``indices`` (0-based, in the order given); all of them when none are given."""
    if not indices:
        return GPU_RUNS
    try:
        return tuple(GPU_RUNS[int(i)] for i in indices)
    except (ValueError, IndexError):
        raise SystemExit(f"gpu takes entry numbers 0-{len(GPU_RUNS) - 1} of GPU_RUNS, "
                         f"got {' '.join(indices)}") from None


def run_recorded(name: str, argv: list[str], record_it: bool = True) -> int:
    """Run one benchmark; unless it is a smoke run (or ``record_it`` is off), record its output."""
    if not record_it or "--smoke" in argv or "-h" in argv or "--help" in argv:
        return BENCHMARKS[name](argv)
    tee, stdout = Tee(sys.stdout), sys.stdout
    sys.stdout = tee
    try:
        code = BENCHMARKS[name](argv)
    finally:
        sys.stdout = stdout
    if code == 0:
        print(f"recorded in {record(name, argv, tee.getvalue())}", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    record_it = "--no-record" not in argv[:1]
    argv = argv[1:] if not record_it else argv
    if argv and argv[0] in BENCHMARKS:
        return run_recorded(argv[0], argv[1:], record_it)
    if argv and argv[0] == "gpu":
        runs = gpu_runs(argv[1:])
    elif argv and not argv[0].startswith("-"):
        raise SystemExit(f"unknown benchmark {argv[0]!r}; choose from {', '.join(BENCHMARKS)}, gpu")
    elif argv:
        return run_recorded("generate", argv, record_it)
    else:
        runs = tuple((name, []) for name in DEFAULT)
    for name, args in runs:
        print(f"== {name} {' '.join(args)} ==", flush=True)
        code = run_recorded(name, args, record_it)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
