#!/usr/bin/env bash
# One call of the device tool on the lent GPU machine (README, "Speed"): install the wheels carried in
# .whl (python -m benchmarks.device_wheels fills it here), then run the given GPU_RUNS entries one after
# another, each recorded in benchmarks/RESULTS.md, which is copied to $OUT after every entry so a call
# cut short by its time limit still brings back what finished. Logs: $OUT/gpu_run_N.log.
#
#   run(command="bash benchmarks/gpu_session.sh 0 3", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1 \
    || { tail -20 "$OUT/pip.log"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, diffusers, ray; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'ray', ray.__version__)" | tee "$OUT/versions.txt"
status=0
for i in "$@"; do
    echo "== GPU_RUNS[$i] $(date -u +%T)"
    python3 -m benchmarks gpu "$i" > "$OUT/gpu_run_$i.log" 2>&1 || status=$?
    grep -E "^(ratios|\| \(|identical|\(c\) actor|peak)" "$OUT/gpu_run_$i.log" | tail -20
    cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
done
exit $status
