#!/usr/bin/env bash
# Issue 23's comparisons in one device call (one GPU), results in $OUT/results.jsonl, logs and profiles in $OUT.
#
#   bash bench/issue23_call.sh final   # the trainer's defaults: real lengths 32/step (profiled), dense 8 x 1024
#   bash bench/issue23_call.sh full    # the same, TRL's best, the plain loops, the baseline script, the stall
#
# Needs, carried into ignored folders: the wheels of TRL, datasets, liger-kernel and their missing dependencies in
# .whl/, sft_lengths.json and the team's baseline_qwen1p5b.py beside them (both from ../shared, never committed).
# Each run appends one JSON line; a run that fails is logged and the next one starts.
set -u
part=${1:?final or full}
wheels=${WHEELS:-.whl}
# .gpuwhl/ (optional): wandb, watchdog, math-verify, pytest and their missing dependencies, for the GPU tests
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$wheels"/*.whl $(ls .gpuwhl/*.whl 2>/dev/null) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
final_out=$OUT
export OUT=/tmp/issue23_out  # everything here; $OUT gets a tarball of it (a call brings back 8 files at most)
mkdir -p "$OUT"
lengths=$wheels/sft_lengths.json
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

budget_s=${BUDGET_S:-540}  # under the call's 600 s: the tarball is made after the last step
step() {  # name, command...: time it (within what is left of the budget), keep its output in $OUT/<name>.log
  local name=$1
  shift
  local t0=$SECONDS left=$((budget_s - SECONDS))
  if ((left < 30)); then
    echo "SKIPPED: $name (budget spent)" | tee -a "$OUT/steps.txt"
    return
  fi
  timeout "$left" "$@" >"$OUT/$name.log" 2>&1 || echo "FAILED: $name (rc $?)" | tee -a "$OUT/steps.txt"
  echo "$name: $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
  tail -n 1 "$OUT/$name.log"
}

real=(python3 -m bench.bench_train --lengths "$lengths" --set training.batch_size=32 --recompiles)

case $part in
final)  # the defaults, on a fresh machine
  step real_defaults "${real[@]}" --profile
  step dense_defaults python3 -m bench.bench_train --tag fixed --recompiles
  ;;
full)  # everything the issue compares, for a later session
  step real_defaults "${real[@]}" --profile
  step dense_defaults python3 -m bench.bench_train --tag fixed --recompiles --profile
  step trl_best python3 -m bench.bench_trl --lengths "$lengths" --variant padding_free --liger --compile
  step plain_loop python3 -m bench.bench_trl --lengths "$lengths" --variant plain --per-device 8
  step baseline_train python3 "$wheels/baseline_qwen1p5b.py" train
  step stall python3 -m bench.bench_train
  ;;
esac
cp "$OUT"/results.jsonl "$OUT"/steps.txt "$final_out"/ 2>/dev/null
tar czf "$final_out/$part.tgz" -C "$OUT" .
cat "$OUT"/results.jsonl "$OUT"/perf_*.json 2>/dev/null
