#!/usr/bin/env bash
# Before running the GPU benchmarks on an offline GPU machine (docs/speed.md): run their code paths on this
# CPU machine in a Python that holds only what the GPU machine's image holds (the versions of the NVIDIA
# H200 image of 2026-11-30: transformers 5.17.0, huggingface_hub 1.33.0, accelerate 1.15.0, tokenizers
# 0.23.2, safetensors 0.8.0), plus the wheels benchmarks/device_wheels.py carries (trimmed the same way),
# installed the way gpu_suite.sh installs them (--no-deps --target), so a package the GPU image lacks or a
# version it has that synthmill cannot use shows up here. What it cannot match: Python 3.12 (3.11 here),
# numpy 2.5 (needs 3.12; 2.4.6 here), torch 2.11 with CUDA (this disk's torch 2.14.1 with its torchvision
# 0.29.1), and anything CUDA itself does.
#
#   bash benchmarks/device_env_check.sh   # with this checkout's venv active; ~10 min; venv /tmp/devsim, wheels /tmp/devsim-site
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=/tmp/devsim SITE=/tmp/devsim-site WHL=/tmp/devsim-whl
[ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
"${PIP[@]}" transformers==5.17.0 huggingface_hub==1.33.0 accelerate==1.15.0 tokenizers==0.23.2 safetensors==0.8.0 \
    numpy==2.4.6 pyarrow pandas fsspec scipy pillow psutil pyyaml requests click filelock msgpack protobuf \
    packaging regex tqdm typer aiohttp grpcio prometheus_client jinja2 pytest
# The carried wheels, fetched and trimmed as for the GPU machine (this checkout's versions), for this Python.
rm -rf "$SITE" "$WHL"
python3 -m benchmarks.device_wheels --dest "$WHL" --python-version 3.11 > /dev/null
"${PIP[@]}" --no-index --no-deps --no-compile --target "$SITE" "$WHL"/*.whl
export PYTHONPATH="$SITE:$PWD"
PY="$VENV/bin/python"
set -x
"$PY" -m pytest -q -p no:cacheprovider tests/test_students.py           # the full-size configs, parameter counts
"$PY" -m benchmarks --no-record generate --smoke                         # (a)-(d) with the tiny pipeline
"$PY" -m benchmarks --no-record generate --arch sd15 --model-dir /tmp/devsim-sd15 --size 64 --steps 1 --prompts 4 \
    --batch-size 2 --samples-per-shard 4 --repeats 1                     # GPU_RUNS[0]'s architecture
"$PY" -m benchmarks --no-record distill --teacher sd-v1.4 --size 64 --batch 1 --images 4 --steps 3 --warmup 1 \
    --workers 1                                                          # GPU_RUNS[6]'s teacher
