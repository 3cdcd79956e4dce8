#!/usr/bin/env bash
# Issue 21's GPU figures in the order the issue asks, within about 8 minutes on one H100/H200.
# Not yet run: no session so far had a GPU with this code. Run from the repository root on the GPU
# machine (finebench installed there, e.g. `pip install --no-deps -e .` beside the image's torch):
#     bash benchmarks/gpu_issue21.sh 2>&1 | tee gpu_issue21.log
# 1. jobs sweep: 1-4 concurrent WRN-28-10 runs (mnist5k, embedded and offline, at 32 px; one epoch
#    each, two seeds per job), total images/s = images trained / wall time, printed per N;
# 2. compiled vs eager A&R, and the read-out operator, at N = 10 and 100 (benchmarks/attention_readout.py);
# 3. issue 19: each peer's training-step time against the baseline beside its FLOP overhead, at the
#    peers recipes' setting (ResNet-50, 448 px, N = 200, batch 16, bf16, eager; about a minute);
# 4. issue 28: each transformer method's training step and peak memory against the plain ViT-B/16 at
#    448 px (N = 200, batch 8, bf16; benchmarks/transformer_overhead.py; about a minute);
# 5. the suite (benchmarks/gpu_suite.py) in what time is left.
set -uo pipefail
start=$(date +%s)
work=$(mktemp -d)
export FINEBENCH_DATA="$work/data"
mkdir -p "$FINEBENCH_DATA"
finebench prepare mnist5k --data-root "$FINEBENCH_DATA" -q || exit 1
for jobs in 1 2 3 4; do
  seeds=$(python -c "print(', '.join(str(s) for s in range(2 * $jobs)))")
  cat > "$work/sweep.toml" <<TOML
seeds = [$seeds]
[dataset]
name = "mnist5k"
input_size = 32
augmentation = "none"
[model]
backbone = "wrn"
options = { depth = 28, width = 10 }
[[variants]]
kind = "baseline"
[train]
epochs = 1
batch_size = 128
eval_batch_size = 500
lr = 0.1
schedule = "constant"
TOML
  t0=$(date +%s.%N)
  finebench run "$work/sweep.toml" --jobs "$jobs" --results-dir "$work/results_$jobs" -q > /dev/null || echo "jobs=$jobs: run failed"
  t1=$(date +%s.%N)
  python - "$jobs" "$t0" "$t1" <<PY
import sys
jobs, t0, t1 = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
images = 2 * jobs * 4000  # mnist5k's 4,000 training images, one epoch per run
print(f"jobs sweep: {jobs} job(s), {2 * jobs} runs, wall {t1 - t0:.1f} s, total {images / (t1 - t0):,.0f} img/s (start-up and evaluation included)")
PY
done
python benchmarks/attention_readout.py --depth 28 --width 10 --repeats 5
timeout 150 python benchmarks/peers_overhead.py --backbone resnet50 --size 448 --classes 200 --batch 16 \
  --precision bf16 --repeats 5 || echo "peers_overhead.py did not finish in 150 s"
timeout 150 python benchmarks/transformer_overhead.py --backbone timm:vit_base_patch16_224 --size 448 \
  --classes 200 --batch 8 --precision bf16 --repeats 5 || echo "transformer_overhead.py did not finish in 150 s"
left=$(( 480 - ($(date +%s) - start) ))
if [ "$left" -gt 60 ]; then python benchmarks/gpu_suite.py --budget-s "$left"; else echo "no time left for gpu_suite.py"; fi
