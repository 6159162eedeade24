"""Wheels for an offline GPU machine: what synthmill needs there that its image lacks, small enough to carry.

The GPU machine the benchmarks ran on (an NVIDIA H200, 2026-11-30) runs Python 3.12 with PyTorch,
transformers, accelerate, pyarrow, pandas, fsspec and the like already installed, and reaches no package
index. What synthmill's GPU benchmarks need beyond that is listed in ``MISSING`` below. The checkout and
its carried folders travel to that machine in at most 64 MiB; Ray's wheel alone is 76 MiB, 31 of them its
Java jar (``ray/jars/ray_dist.jar``, for cross-language actors), which this script leaves out of the wheel
(with its RECORD line), together with the dashboard's JavaScript source map.

    python -m benchmarks.device_wheels            # on a machine with pip access: fills .whl/ (git-ignored)

then, on the GPU machine (the checkout copied there with ``.whl/``), before the benchmark::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \\
      && export PYTHONPATH=/tmp/site:$PWD && python3 -m benchmarks gpu

``benchmarks/gpu_suite.sh`` runs those two steps for the GPU_RUNS entries it is given (docs/speed.md).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import zipfile

#: Distributions the GPU image lacks (its package list, read 2026-11-23) that a generate / distill run
#: imports: Ray (core, Data, Train) and what it imports
#: (jsonschema, pydantic and their own needs), diffusers, webdataset and OmegaConf.
MISSING = (
    "ray", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py",
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
    "diffusers", "webdataset", "braceexpand", "omegaconf",
)
#: Wheel platforms the device's glibc takes.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
#: Members of Ray's wheel that nothing here uses and that would not fit: the Java jar and a source map.
DROP = ("ray/jars/", "ray/dashboard/client/build/static/js/main.")
LIMIT = 64 * 2**20


def _requirement(name: str) -> str:
    """``name==version`` of this environment's copy where there is one, so both machines run the same code."""
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def download(dest: str, python_version: str = "3.12") -> list[str]:
    """``pip download`` each missing distribution as a CPython manylinux wheel (no dependencies)."""
    os.makedirs(dest, exist_ok=True)
    for name in MISSING:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", "-d", dest, _requirement(name)]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        subprocess.run(cmd, check=True)
    return sorted(os.path.join(dest, n) for n in os.listdir(dest) if n.endswith(".whl"))


def strip_wheel(path: str) -> int:
    """Rewrite ``path`` without the members under ``DROP`` (and their RECORD lines); return bytes saved."""
    before = os.path.getsize(path)
    with zipfile.ZipFile(path) as src:
        if not any(i.filename.startswith(DROP) for i in src.infolist()):
            return 0
        tmp = path + ".tmp"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in src.infolist():
                if info.filename.startswith(DROP):
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    kept = [ln for ln in data.decode().splitlines() if not ln.startswith(DROP)]
                    data = ("\n".join(kept) + "\n").encode()
                out.writestr(info, data)
    os.replace(tmp, path)
    return before - os.path.getsize(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", default=".whl", help="folder for the wheels (default .whl, ignored by git)")
    p.add_argument("--python-version", default="3.12",
                   help="the CPython the wheels are for (default 3.12, the device's; benchmarks/device_env_check.sh "
                        "takes them for this machine's)")
    args = p.parse_args(argv)
    wheels = download(args.dest, args.python_version)
    for w in wheels:
        saved = strip_wheel(w)
        if saved:
            print(f"{os.path.basename(w)}: left out {saved / 2**20:.1f} MiB ({', '.join(DROP)})")
    total = sum(os.path.getsize(w) for w in wheels)
    for w in wheels:
        print(f"{os.path.getsize(w) / 2**20:7.2f} MiB  {os.path.basename(w)}")
    print(f"{total / 2**20:7.2f} MiB in {len(wheels)} wheels under {args.dest} (a call may carry 64 MiB with the tree)")
    if total > LIMIT - 4 * 2**20:
        print("too large to travel with the working tree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
