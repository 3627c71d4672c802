#!/usr/bin/env bash
# hybridat on a GPU in one call (under 5 minutes on an H100): graph == eager, end-to-end epoch times, bench.
# Needs python3 (or $PYTHON) with torch (CUDA), typer, rich, safetensors, pandas; torchattacks (for the bench) as a wheel in
# .whl/ if not installed. Writes everything under ${OUT:-gpu-check}/ and prints one table at the end.
# SECTIONS="checks epochs attack grid bench" (the default) picks what runs. SMOKE=1 DEVICE=cpu runs it all at toy
# scale (bench at its --quick size) on a CPU: CI runs that (tests/test_gpu_check.py, without bench) so that the
# script still works when a GPU session comes.
set -uo pipefail  # each section runs even if one before it failed; failures are reported
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}; mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}  # a python with torch; the device's own python3 by default
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DATA=$(mktemp -d); export HYBRIDAT_DATA_DIR=$DATA
trap 'rm -rf "$DATA"' EXIT  # the synthetic CIFAR-10 and the runs trained on it
SECTIONS=${SECTIONS:-checks epochs attack grid bench}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
DEVICE=${DEVICE:-cuda}
if [ -n "${SMOKE:-}" ]; then  # toy scale: a 1/16-width model, 2 steps of 16 per epoch, PGD-20 on 48 images
  SCALE=smoke PER_FILE=64 TRAIN=(--width 0.0625 --train-subset 32 --batch-size 16) ATTACK=(--n 48) BENCH=(--quick)
else  # the issue's scale: full CIFAR-10, ResNet-18, batch 128 per branch; PGD-20 on the 10,000 test images
  SCALE=gpu PER_FILE=10000 TRAIN=() ATTACK=() BENCH=()
fi
"$PYTHON" -c "import sys; from scripts.gpu_check import write_synthetic_cifar as w; from pathlib import Path; w(Path(sys.argv[1]), per_file=int(sys.argv[2]))" "$DATA" "$PER_FILE"
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
else
  echo "$DEVICE (smoke: ${SMOKE:-no})" | tee "$OUT/device.txt"
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"

if want checks; then
  echo "== graph == eager"; "$PYTHON" scripts/gpu_check.py "$OUT" "$DEVICE" "$SCALE" || echo "FAILED: graph == eager checks"
fi

epoch() {  # NAME EPOCHS FLAGS...: one full-CIFAR training run, its per-epoch seconds from train.csv
  local name=$1 epochs=$2; shift 2
  local start=$SECONDS
  "$PYTHON" -m hybridat train --norm dual-bn --epochs "$epochs" --device "$DEVICE" --quiet --out "$DATA/run-$name" \
    "${TRAIN[@]}" "$@"
  "$PYTHON" - "$DATA/run-$name/train.csv" "$name" "$((SECONDS - start))" <<'PY' | tee -a "$OUT/epochs.csv"
import sys, pandas as pd
rows = pd.read_csv(sys.argv[1])
for _, r in rows.iterrows():
    print(f"{sys.argv[2]},{int(r.epoch)},{r.seconds:.2f},{r.images_per_s:.0f},{sys.argv[3]}")
PY
}
if want epochs; then
  echo "run,epoch,seconds,images_per_s,process_seconds" > "$OUT/epochs.csv"
  echo "== end-to-end epochs (50,000 images, batch 128 per branch, PGD-10)"
  epoch graphs-bf16 2 --amp || echo "FAILED: graphs-bf16"
  epoch graphs-fp32 2 || echo "FAILED: graphs-fp32"
  epoch eager-bf16 1 --amp --no-graphs || echo "FAILED: eager-bf16"
fi

want grid && echo "== grid throughput (make -j): 1 run alone, then 2 at once; bf16, graphs; each run's 2nd epoch" \
  && echo "processes,epoch_seconds,aggregate_images_per_s" > "$OUT/concurrency.csv"
for n in $(want grid && echo 1 2); do
  for i in $(seq "$n"); do
    "$PYTHON" -m hybridat train --norm dual-bn --epochs 2 --amp --device "$DEVICE" --quiet \
      --out "$DATA/conc-$n-$i" "${TRAIN[@]}" > /dev/null 2>&1 &
  done
  wait
  "$PYTHON" - "$n" "$DATA"/conc-"$n"-*/train.csv <<'PY' | tee -a "$OUT/concurrency.csv"
import sys, pandas as pd
n, seconds = int(sys.argv[1]), [pd.read_csv(f).seconds.iloc[-1] for f in sys.argv[2:]]
mean = sum(seconds) / len(seconds)
print(f"{n},{mean:.2f},{n * pd.read_csv(sys.argv[2]).images.iloc[-1] / mean:.0f}")
PY
done

if want attack; then  # `hybridat attack` end to end, PGD-20 on the 10,000 test images: fp32, then --amp
  echo "== attack (PGD-20, 10,000 images): fp32 and --amp"
  model=$(ls "$DATA"/run-*/model.safetensors 2>/dev/null | head -1)
  if [ -z "$model" ]; then  # no epochs section before: a 1-epoch model of its own
    "$PYTHON" -m hybridat train --norm dual-bn --epochs 1 --amp --device "$DEVICE" --quiet \
      --out "$DATA/run-attack" "${TRAIN[@]}" \
      > /dev/null && model="$DATA/run-attack/model.safetensors"
  fi
  for flag in "" --amp; do
    "$PYTHON" -m hybridat attack "$model" --attack pgd --steps 20 --branch adv --device "$DEVICE" "${ATTACK[@]}" $flag \
      --out "$OUT/attack${flag:+-bf16}.csv" || echo "FAILED: attack $flag"
  done
fi

if want bench; then
  echo "== bench"
  "$PYTHON" -m hybridat bench --device "$DEVICE" --amp "${BENCH[@]}" --out "$OUT/bench-bf16.csv" | tee "$OUT/bench-bf16.txt" \
    || echo "FAILED: bench"
fi

echo "== summary"
"$PYTHON" - "$OUT" <<'PY'
import json, sys, pandas as pd
out = sys.argv[1]
print(open(f"{out}/device.txt").read().strip())
def show(name, read):
    try:
        read(f"{out}/{name}")
    except Exception as e:  # a section that failed left no file
        print(f"{name}: missing ({e})")
show("checks.json", lambda p: [print(" | ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in r.items())) for r in json.load(open(p))])
show("epochs.csv", lambda p: print(pd.read_csv(p).to_string(index=False)))
show("concurrency.csv", lambda p: print(pd.read_csv(p).to_string(index=False)))
show("attack.csv", lambda p: [print(f"attack {f.split('/')[-1]}: " + pd.read_csv(f)[["attack", "steps", "n",
                                     "attack_precision", "accuracy", "seconds"]].to_string(index=False, header=False))
                               for f in (p, p.replace(".csv", "-bf16.csv"))])
show("bench-bf16.csv", lambda p: print(pd.read_csv(p).to_string(index=False, float_format="%.2f")))
PY
