#!/usr/bin/env bash
# Issue 7 on a lent GPU machine (H100/H200: Python 3.12, torch preinstalled, no network): the fast path's CUDA
# tests and `gan-ray bench --device cuda` for the issue's configurations, plus a short real `gan-ray train` with
# one GPU worker (and a resume). Everything it prints also lands in $OUT (at most 8 files come back).
#
# Prepare once, here (not on the GPU machine), from the repository root:
#   bash ../shared/device/ray-kit.sh          # builds .raykit/ (git-ignored): Ray 2.60 wheels for Python 3.12
# Then one device call (about 4-7 minutes; every step has its own time limit so the script ends within ~8):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".raykit"], timeout_s=540)
# Results: $OUT/summary.txt (the README table), bench.jsonl (one JSON object per configuration), pytest.txt,
# train.txt, env.txt.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset RAY_ADDRESS
t_start=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - t_start ))s] $*" | tee -a "$OUT/summary.txt"; }

# --- Ray kit (the image has torch, numpy, scikit-learn, pyyaml, safetensors, filelock, pillow, pytest) --------
if ls .raykit/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .raykit/*.whl || { stamp "ray kit install failed"; exit 1; }
else
  stamp "no .raykit/ carried: run 'bash ../shared/device/ray-kit.sh' here and carry [\".raykit\"]"; exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import sys, torch, ray; print('python', sys.version.split()[0], 'torch', torch.__version__, 'ray', ray.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'bf16', torch.cuda.is_bf16_supported())"
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
stamp "environment ready"

# --- the benchmark: plain DataLoader loop | best plain loop (whole-step CUDA graph) | gan-ray in Ray Train -----
bench() {  # args: label, time limit, bench flags...
  local label=$1 limit=$2; shift 2
  stamp "bench $label"
  timeout "$limit" python3 -m gan_ray.cli bench --device cuda --json --steps 200 --repeats 3 "$@" \
    > "$OUT/.bench_$label.jsonl" 2>> "$OUT/bench_stderr.txt"
  local rc=$?
  cat "$OUT/.bench_$label.jsonl" >> "$OUT/bench.jsonl"
  [[ $rc == 0 ]] || stamp "bench $label exited $rc (see bench_stderr.txt)"
}
bench mlp 150 --arch mlp --batch-size 64,1024,4096
bench dcgan64 150 --arch dcgan --image-size 64 --batch-size 512
rm -f "$OUT"/.bench_*.jsonl
python3 benchmarks/gpu_summary.py "$OUT/bench.jsonl" | tee -a "$OUT/summary.txt"

# What a step costs per image size on the GPU (docs/benchmarks.md's table gets its GPU rows from this).
stamp "bench_scale (resnet 32..256, dcgan 32/64; batch 64)"
timeout 150 python3 benchmarks/bench_scale.py --device cuda --batch-size 64 --steps 8 > "$OUT/bench_scale.txt" 2>&1
stamp "bench_scale exited $?"; tail -8 "$OUT/bench_scale.txt" | tee -a "$OUT/summary.txt"

# --- correctness on the GPU: graph vs eager, bf16/dcgan graphs, checkpoints, compile + graph --------------------
stamp "pytest tests/test_fast_path.py (CUDA tests included)"
timeout 170 python3 -m pytest tests/test_fast_path.py -q -rs -p no:cacheprovider --timeout 150 -s > "$OUT/pytest.txt" 2>&1
stamp "pytest exited $? ($(tail -1 "$OUT/pytest.txt"))"

# --- a real run: gan-ray train, one GPU worker, auto fast path; then a resume (capturable Adam from a file) ------
stamp "gan-ray train (1 GPU worker) and resume"
run_dir=$(mktemp -d)
{
  timeout 100 python3 -m gan_ray.cli train --workers 1 --gpus-per-worker 1 --cpus-per-worker 4 --epochs 4 --r1-gamma 0 \
    --checkpoint-every 2 --sample-every 0 --storage "$run_dir" --name gpu
  echo "first run exited $?"
  timeout 60 python3 -m gan_ray.cli train --workers 1 --gpus-per-worker 1 --cpus-per-worker 4 --epochs 6 --r1-gamma 0 \
    --checkpoint-every 2 --sample-every 0 --storage "$run_dir" --name gpu
  echo "resume exited $?"
  echo "metrics.jsonl (images_per_s per epoch):"
  python3 -c "import json,sys; [print(r['epoch'], round(r['images_per_s']), r.get('restored_from', '')) for r in map(json.loads, open(sys.argv[1]))]" "$run_dir/gpu/metrics.jsonl"
} > "$OUT/train.txt" 2>&1
tail -12 "$OUT/train.txt" | tee -a "$OUT/summary.txt"
stamp "done"
