#!/usr/bin/env bash
# One device call (docs: /work/.library/device/README.md in the workplace): train the embedded
# prior on the GPU (issue 5), then measure the sampling loop's throughput (issue 9). Results go
# to $OUT: prior.tar (the diffusers folder of the snapshot jobs/pick_snapshot.py picks from the
# snapshots, one every SAVE_MIN minutes (0.5); prior-last.tar holding the last one instead when none makes faces),
# pick.log (their restore table), train.log, loss.jsonl,
# gpu_throughput.json, throughput.log, gpu.txt.
#
# Why several snapshots: on this data a sharper prior restores worse (key-only restore fell from
# 43.9 to 13.5 dB median while the face rate rose, benchmarks/README.md "Prior sharpness against
# restore"), so pick_snapshot.py ships one that makes faces (>= 90% of 64 samples, dlib HOG: the
# image's OpenCV may lack Haar cascades) and, of those, the latest that restores at 35 dB median,
# 25 dB worst face over the job's face ellipse, else the best restorer (no CPU snapshot restores so).
#
# Objective: v-prediction with zero terminal SNR (OBJECTIVE="" for epsilon): a CPU fine-tune of the
# epsilon prior of 0.1.0 to it lifted the face rate from 80.5% to 97.7% in 2,879 steps; that
# fine-tune is the shipped prior since 0.2.0 (step 16,049 of it since 0.3.0; model card).
#
# Prepare here (both folders are git-ignored, about 49 MiB together):
#   mkdir -p .gpu && cp ../shared/data/celeba64-train.parquet .gpu/
#   python -c "import pyarrow.parquet as pq; pq.write_table(pq.read_table('../shared/data/celeba-ids-dev.parquet', \
#     columns=['image']).slice(0, 16), '.gpu/faces16.parquet')"
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 cryptography==50.0.2 cffi pycparser dlib-bin==20.0.1.post1
# (not importlib_metadata, which diffusers declares but imports only on Python < 3.8: its newest
# release imports lazy_importer, which the image lacks.)
# Run (carry [".whl", ".gpu"], timeout_s 600): about 20 s install, TRAIN_MIN (3) minutes + 90 s
# at most for training and compiling, ~1 min picking (PICK_S, 150 s, at most; cut, it leaves prior-last.tar),
# BENCH_S (120) s benchmark: about 560 s at most (20 + 270 + 150 + 120), under the 600 s limit.
# gpu_throughput.json is rewritten after each row: the compiled variants may not all fit in BENCH_S.
# A second call on the still-warm machine finds /tmp/prior: training resumes it and picking measures
# its earlier snapshots too; TRAIN_MIN=0 skips both, BENCH=0 the benchmark.
#   bash jobs/gpu_session.sh
# Then: tar -xf prior.tar; prior_quality.py and restore_fidelity.py on it here.
set -uo pipefail
[ -n "${SKIP_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

if [ "${TRAIN_MIN:-3}" != 0 ]; then
  timeout $(( ${TRAIN_MIN:-3} * 60 + 90 )) python3 jobs/train_prior.py --data .gpu/celeba64-train.parquet --run /tmp/prior \
    --device "${DEVICE:-cuda}" --bf16 --compile --channels-last ${OBJECTIVE---prediction-type v_prediction --zero-snr} ${EXTRA:-} --batch-size "${BATCH:-256}" --lr "${LR:-4e-4}" --warmup-steps 300 \
    --ema-decay 0.9995 --channels "${CHANNELS:-32,64,64,128}" --layers-per-block "${LPB:-1}" --attn-levels 3 \
    --max-minutes "${TRAIN_MIN:-3}" --save-every-min "${SAVE_MIN:-0.5}" --log-every 100 2>&1 | tee "$OUT/train.log" | tail -5
  cp /tmp/prior/loss.jsonl "$OUT/" 2>/dev/null
  timeout "${PICK_S:-150}" python3 jobs/pick_snapshot.py --run /tmp/prior --faces .gpu/faces16.parquet --device "${DEVICE:-cuda}" \
    --detectors hog --tar "$OUT/prior.tar" 2>&1 | grep -v Warning | tee "$OUT/pick.log"
  if [ ! -f "$OUT/prior.tar" ] && [ -d /tmp/prior/latest ]; then  # none makes faces: bring the last back to study, not to ship
    tar -C "$(readlink -f /tmp/prior/latest)/.." -cf "$OUT/prior-last.tar" "$(basename "$(readlink -f /tmp/prior/latest)")"
  fi
  ls -la "$OUT"
fi

if [ "${BENCH:-1}" != 0 ]; then
  timeout "${BENCH_S:-120}" python3 benchmarks/gpu_throughput.py --device "${DEVICE:-cuda}" ${BENCH_EXTRA:-} --json "$OUT/gpu_throughput.json" \
    2>&1 | grep -v Warning | tee "$OUT/throughput.log"
fi
