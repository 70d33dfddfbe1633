#!/usr/bin/env bash
# Issue 23's comparisons in one device call (one H200), results in $OUT/results.jsonl, logs and profiles in $OUT.
#
#   bash bench/issue23_call.sh final   # the trainer's defaults: real lengths 32/step (profiled), dense 8 x 1024
#   bash bench/issue23_call.sh full    # the same, TRL's best, the plain loops, the baseline script, the stall
#   bash bench/issue23_call.sh compare # the candidates of bench/issue23_candidates.patch against today's defaults
#   bash bench/issue23_call.sh against # those candidates against TRL, the padded plain loop; the stall, GPU tests
# compare and against apply bench/issue23_candidates.patch to the device's copy first (not committed code: its
# MATH_SFT_TRY switches exist only to compare in one call; the winners are then written into the code for good).
#
# Needs, carried into ignored folders: the wheels of TRL, datasets, liger-kernel and their missing dependencies in
# .whl/, sft_lengths.json and the team's baseline_qwen1p5b.py beside them (both from ../shared, never committed).
# Each run appends one JSON line; a run that fails is logged and the next one starts.
set -u
part=${1:?final, full, compare or against}
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
compare | against)
  git apply bench/issue23_candidates.patch 2>/dev/null || patch -p1 <bench/issue23_candidates.patch || exit 1
  ;;
esac
case $part in
compare)  # the candidates against today's defaults (greedy rows, static head), same call; MATH_SFT_TRY picks
  step real_before env MATH_SFT_TRY=greedy,static_head "${real[@]}"
  step real_new "${real[@]}"
  step real_addmm env MATH_SFT_TRY=addmm "${real[@]}" --profile
  step dense_before env MATH_SFT_TRY=static_head python3 -m bench.bench_train --tag fixed --recompiles
  step dense_addmm env MATH_SFT_TRY=addmm python3 -m bench.bench_train --tag fixed --recompiles --profile
  step baseline_train python3 "$wheels/baseline_qwen1p5b.py" train
  step dense_chunk4096 env MATH_SFT_TRY=addmm,chunk4096 python3 -m bench.bench_train --tag fixed --recompiles
  ;;
against)  # TRL, the padded plain loop, ours with the candidates, the stall and the trainer's GPU tests
  step trl_best python3 -m bench.bench_trl --lengths "$lengths" --variant padding_free --liger --compile
  step real_addmm env MATH_SFT_TRY=addmm "${real[@]}"
  step stall env MATH_SFT_TRY=addmm python3 -m bench.bench_train
  step plain_loop python3 -m bench.bench_trl --lengths "$lengths" --variant plain --per-device 8
  step gpu_trainer_tests env MATH_SFT_TRY=addmm python3 -m pytest -q -m gpu tests/test_gpu_trainer.py
  ;;
final)  # the defaults, on a fresh machine
  step real_defaults "${real[@]}" --profile
  step dense_defaults python3 -m bench.bench_train --tag fixed --recompiles
  ;;
full)  # everything the issue compares, for a later session
  step real_defaults "${real[@]}" --profile
  step dense_defaults python3 -m bench.bench_train --tag fixed --profile
  step trl_best python3 -m bench.bench_trl --lengths "$lengths" --variant padding_free --liger --compile
  step plain_loop python3 -m bench.bench_trl --lengths "$lengths" --variant plain --per-device 8
  step baseline_train python3 "$wheels/baseline_qwen1p5b.py" train
  step stall python3 -m bench.bench_train
  ;;
esac
cp "$OUT"/results.jsonl "$OUT"/steps.txt "$final_out"/ 2>/dev/null
tar czf "$final_out/$part.tgz" -C "$OUT" .
cat "$OUT"/results.jsonl "$OUT"/perf_*.json 2>/dev/null
