#!/usr/bin/env bash
# One GPU visit as a few back-to-back device calls, each under the 10-minute limit. Every call packs its logs
# and results into $OUT/<stage>.tar.gz (the device returns a few files only), even when its work times out.
#   bash bench/gpu_visit.sh install          # after the staged parts: install vLLM, TRL, the project
#   bash bench/gpu_visit.sh long+vllm        # bench_long_run.py's five parts beside the vLLM tests that share the GPU
#   bash bench/gpu_visit.sh rest [FILE...]   # the vLLM tests that need the GPU alone, then the other GPU tests
#                                            # (those of the named files only, when given); about 600 s in all:
#   bash bench/gpu_visit.sh exclusive        # only its first part (the vLLM tests that need the GPU alone)
#   bash bench/gpu_visit.sh nonvllm [FILE...]  # only its second part, failures printed as they happen (~500 s)
#   bash bench/gpu_visit.sh nonvllm2         # the same in two processes at once, half the files each
#   bash bench/gpu_visit.sh gpu TEST_FILE...  # those files' non-vLLM GPU tests in one process, full log
#   bash bench/gpu_visit.sh rerun TEST_FILE...  # the 200-step GRPO long run beside those GPU tests
#   PAR=N bash bench/gpu_visit.sh tests TEST...  # GPU test files or test ids, each test in its own process, N at once
#                                                # (those that read the device's memory alone, after); none
#                                                # starts or runs past BUDGET_S from the call's start
#   PAR=N bash bench/gpu_visit.sh tests+resume TEST...  # the same beside bench_long_run.py's fail-and-resume parts
#   bash bench/gpu_visit.sh memory           # TRL alone, then SmolLM2 full at 3 GiB beside the Qwen2.5-1.5B LoRA shape
#                                            # at 5 GiB, twice (~480 s; SKIP_TRL=1 leaves TRL out)
#   bash bench/gpu_visit.sh probe            # probe_context_memory.py: each stage apart, the log-prob kernel's tiles
#   bash bench/gpu_visit.sh offload-memory   # probe_offload_memory.py: memory outside PyTorch per update phase,
#                                            # compiled or eager layers, offloaded or plain checkpoints (~3 min)
#   bash bench/gpu_visit.sh host-step        # probe_host_step.py: one optimizer step of host masters three ways
#                                            # (WAYS=... names others, SKIP_SMOLLM2=1 runs the 0.5B shape only,
#                                            # STEPS=N timed steps per way, 3 by default)
#   STEPS=N bash bench/gpu_visit.sh bench CASES RUNNERS [EXTRA...]  # bench_vs_trl.py (EXTRA: LABEL=JSON variants);
#                                                            # PROFILE=1 adds a profile of one step per run,
#                                                            # PROFILE_STACKS=1 its CPU time by Python function,
#                                                            # TRL_UTIL=F TRL's vllm_gpu_memory_utilization (default:
#                                                            # the smallest it ran at, bench_vs_trl.py);
#                                                            # an older lightning_rl: bench/ab_copies.sh
#   bash bench/gpu_visit.sh contention       # probe_engine_contention.py: the engine's decode step beside a training
#                                            # loop, busy cores, long GPU kernels (LOADS=... picks them)
#   bash bench/gpu_visit.sh mps              # VLLMRollout(mps=True)'s GPU test, then the defaults against the callback's
#                                            # MPS daemon, its trainer below normal priority and both at normal
#                                            # (PROBE=1: probe_mps.py first; SKIP_TEST=1: no test; CASES=...;
#                                            # NOYIELD=1: also under MPS with yield_gpu=False)
#   UTILS="0.02 0.03" bash bench/gpu_visit.sh trl-util CASE  # TRL alone at each vLLM fraction (STEPS=4 each;
#                                                            # STOP_AT_FIRST=1: up to the first that runs):
#                                                            # the smallest at which it runs, its peak and step
#                                                            # (RUNNERS=trl,trl-sleep: with vLLM's sleep mode too)
set -uo pipefail
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false
FINAL=${OUT:-/tmp/out}
stage=${1:?stage}
WORK=/tmp/visit_$stage; rm -rf "$WORK"; mkdir -p "$WORK"
export OUT=$WORK
budget=${BUDGET_S:-560}
pack() { tar czf "$FINAL/${stage//+/_}.tar.gz" -C "$WORK" . ; }
trap pack EXIT
one_test() {  # one test in its own process, never past DEADLINE (epoch seconds): the call's budget
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 30 ]; then echo "[$(date +%T)] not started (budget spent) $1"; return; fi
  timeout $((left < 300 ? left : 300)) python3 -m pytest "$1" -q -s -p no:cacheprovider -rA \
    > "$WORK/test_${1##*::}.log" 2>&1
  local rc=$?  # before the date's command substitution resets $?
  echo "[$(date +%T)] rc=$rc $1"
}
DEADLINE=$(($(date +%s) + ${BUDGET_S:-560}))
export -f one_test; export WORK DEADLINE
probe_run() {  # SCRIPT PREFIX SECONDS NAME ARGS...: one variant of bench/SCRIPT in a fresh process, JSON and log in $WORK
  timeout "$3" python3 "bench/$1" --out "$WORK/$2_$4.json" "${@:5}" > "$WORK/$2_$4.log" 2>&1
  local rc=$?
  echo "[$(date +%T)] rc=$rc $4"
}
ran_steps() {  # JSON: whether a bench_vs_trl.py result file holds a run with a step time (it ran, not failed)
  python3 -c "import json, sys; runs = json.load(open(sys.argv[1])).get('runs', [])
sys.exit(0 if any(r.get('s_per_step') for r in runs) else 1)" "$1" 2>/dev/null
}
run_bench() {  # NAME SECONDS ARGS...: one bench_vs_trl.py call, its JSON and log in $WORK named after NAME
  local name=$1 secs=$2; shift 2
  timeout "$secs" python3 bench/bench_vs_trl.py --out "$WORK/vs_trl_$name.json" "$@" 2>&1 \
    | grep -vE "^(INFO|DEBUG)" > "$WORK/bench_$name.log"
}
non_vllm() {  # SECONDS TEST_PATHS...: the non-vLLM GPU tests in one process (-v, failures printed as they happen;
              # LOG=name names its log, gpu_non_vllm by default)
  local secs=$1 log="$WORK/${LOG:-gpu_non_vllm}.log"; shift
  PYTHONPATH=bench timeout "$secs" python3 -m pytest -p pytest_instafail -m "gpu and not vllm" "$@" -v \
    -p no:cacheprovider -rA --tb=short > "$log" 2>&1
  grep -E "(PASSED|FAILED|ERROR) *\[|passed|failed" "$log" | grep -vE "PASSED *\[" | tail -20
  grep -c "PASSED *\[" "$log" | sed 's/$/ passed so far/'
  grep -A25 "^FAILED AT ONCE" "$log" | cut -c1-300 | tail -80
}
# Tests that read the device's memory or compare two runs' peaks: beside another test process they fail (2026-12-06:
# four non-vLLM ones, then the vLLM sleep test with PAR=2), so 'tests' runs them one at a time after the others
ALONE_RE='sleep_frees_memory|base_weights_shared|test_precision_gpu\.py|test_host_step_gpu\.py'
each_test() {  # every test of the named files or ids in its own process (one vLLM sleep-mode engine per process),
               # PAR of them at a time (default 1), those matching ALONE_RE alone afterwards; none past BUDGET_S
  local ids
  ids=$(python3 -m pytest "$@" -q --collect-only -p no:cacheprovider 2>/dev/null | grep "::")
  grep -vE "$ALONE_RE" <<< "$ids" | xargs -r -P "${PAR:-1}" -I{} bash -c 'one_test "$1"' _ {}
  grep -E "$ALONE_RE" <<< "$ids" | xargs -r -I{} bash -c 'one_test "$1"' _ {}
  leftover
}
leftover() {  # what still holds the device 5 s after the tests ended (a test's engine outliving it would show here;
              # the 1.83 GiB that bench calls began with on 2026-12-06 was bench_vs_trl.py's own model build)
  sleep 5
  { date +%T; timeout 20 nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
    ps -eo pid,ppid,etimes,rss,args --sort=-rss | grep -E "python|VLLM|Engine" | grep -v grep | cut -c1-200 | head -20
  } > "$WORK/leftover.txt" 2>&1
  echo "on the device after the tests (in 'rerun' and 'tests+resume' the long run's own processes too):"
  sed -n 2,25p "$WORK/leftover.txt"
}
case "$stage" in
  install)
    mkdir -p /tmp/parts; for d in .gpu/part_*; do cp "$d"/* /tmp/parts/; done 2>/dev/null  # the last part, carried here
    bash .gpu/install/device-install.sh > "$WORK/install.log" 2>&1; tail -8 "$WORK/install.log" ;;
  long+vllm)
    timeout "$budget" bash bench/gpu_run.sh long-parallel > "$WORK/long.txt" 2>&1 &
    long=$!
    timeout "$budget" bash bench/gpu_run.sh vllm-shared "${2:-3}" > "$WORK/vllm_shared.txt" 2>&1
    wait $long
    cat "$WORK/long.txt" "$WORK/vllm_shared.txt" | grep -E "PASSED|FAILED|ERROR|rc=|growth|ok" | tail -60 ;;
  rest)  # the vLLM tests that read the device's free memory, then the non-vLLM ones (together about 600 s as of
        # 2026-12-05: a 580 s call reached 61 of 78 non-vLLM tests; 'exclusive' and 'nonvllm' run them in two calls)
    [ $# -gt 1 ] || set -- rest tests/gpu
    timeout 240 bash bench/gpu_run.sh vllm-exclusive > "$WORK/vllm_exclusive.txt" 2>&1
    cat "$WORK/vllm_exclusive.txt"
    non_vllm $((budget - 250)) "${@:2}" ;;
  exclusive)
    timeout "$budget" bash bench/gpu_run.sh vllm-exclusive > "$WORK/vllm_exclusive.txt" 2>&1
    cat "$WORK/vllm_exclusive.txt" ;;
  nonvllm)  # the non-vLLM GPU tests in one process, each named as it ends and each failure's report printed at once
    [ $# -gt 1 ] || set -- nonvllm tests/gpu
    non_vllm "$budget" "${@:2}" ;;
  nonvllm2)  # the same tests in two processes at once, the files dealt out alternately, then the two files whose
             # tests read the device's memory or compare two runs' peaks, alone (beside another test process, four
             # of them failed on 2026-12-06 and passed alone: 90 s); about 350 s in all
    alone=(tests/gpu/test_precision_gpu.py tests/gpu/test_host_step_gpu.py)
    files=(); for f in tests/gpu/test_*.py; do [[ " ${alone[*]} " == *" $f "* ]] || files+=("$f"); done
    a=(); b=()
    for i in "${!files[@]}"; do if (( i % 2 )); then b+=("${files[$i]}"); else a+=("${files[$i]}"); fi; done
    LOG=gpu_non_vllm_a non_vllm $((budget - 120)) "${a[@]}" > "$WORK/summary_a.txt" 2>&1 &
    first=$!
    LOG=gpu_non_vllm_b non_vllm $((budget - 120)) "${b[@]}" > "$WORK/summary_b.txt" 2>&1
    wait $first
    LOG=gpu_non_vllm_alone non_vllm 115 "${alone[@]}" > "$WORK/summary_alone.txt" 2>&1
    cat "$WORK/summary_a.txt" "$WORK/summary_b.txt" "$WORK/summary_alone.txt" ;;
  gpu)  # the named GPU test files' non-vLLM tests, all in one process (what one test leaves, the next meets)
    # -v names each test as it ends; a test still running near the limit gets its threads' stacks dumped
    timeout "$budget" python3 -m pytest -m "gpu and not vllm" "${@:2}" -v -p no:cacheprovider -rA \
      -o faulthandler_timeout=$((budget - 20)) > "$WORK/gpu_one_process.log" 2>&1
    grep -E "^(PASSED|FAILED|ERROR)|passed|failed|Error:|^E " "$WORK/gpu_one_process.log" | tail -40 ;;
  rerun)  # the 200-step GRPO long run beside the named GPU test files, each test in its own process
    timeout "$budget" bash bench/gpu_run.sh long grpo > "$WORK/long.txt" 2>&1 &
    long=$!
    each_test "${@:2}"
    wait $long
    grep -hE "^(PASSED|FAILED|ERROR)|Error:|assert |compiled graphs" "$WORK"/test_*.log | tail -30
    tail -5 "$WORK/long.txt" ;;
  tests+resume)  # bench_long_run.py's two fail-and-resume parts (about 150 s each) beside the named GPU tests, each
                 # test in its own process (PAR=N at once)
    timeout "$budget" bash bench/gpu_run.sh long-parallel fail-reward fail-engine > "$WORK/long.txt" 2>&1 &
    long=$!
    each_test "${@:2}"
    wait $long
    grep -hE "^(PASSED|FAILED|ERROR)|Error:|assert " "$WORK"/test_*.log | cut -c1-300 | tail -30
    cut -c1-600 "$WORK/long.txt" | tail -8 ;;
  tests)
    each_test "${@:2}"
    grep -hE "^(PASSED|FAILED|ERROR)|Error:|assert |^(process engine|overlapped|readme|engine process|grpo|streamed step|step peak|full FT|kv)" "$WORK"/test_*.log | tail -40 ;;
  bench)
    extras=(); for e in "${@:4}"; do extras+=(--extra "$e"); done
    timeout "$budget" python3 bench/bench_vs_trl.py --out "$WORK/vs_trl.json" --cases "${2:?cases}" \
      --runners "${3:?runners}" "${extras[@]}" --steps "${STEPS:-12}" --timeout 300 ${PROFILE:+--profile-dir "$WORK"} ${TRL_UTIL:+--trl-util "$TRL_UTIL"} 2>&1 | grep -vE "^(INFO|WARNING|DEBUG)" \
      | tee "$WORK/bench.log" | grep -E "^\[|s/step|FAILED|speedup|peak_vs|reward_last" | tail -40 ;;
  contention)  # probe_engine_contention.py: the engine's decode step beside each load in a side process (~4 min;
               # LOADS=none,train,... picks them)
    timeout 90 python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); import bench_vs_trl as b; \
b.prepare_models(Path('/tmp/bench_models'), {'smollm2'})" > "$WORK/models.log" 2>&1
    timeout "$budget" python3 bench/probe_engine_contention.py --model /tmp/bench_models/smollm2 \
      --out "$WORK/contention.json" ${LOADS:+--loads "$LOADS"} > "$WORK/contention.log" 2>&1
    grep -vE "^(INFO|DEBUG|WARNING)|^\(EngineCore" "$WORK/contention.log" | tail -15 ;;
  mps)  # VLLMRollout(mps=True)'s GPU test (the README configuration in a fresh process; its start, clients, their
        # priorities and watchdog; SKIP_TEST=1 leaves it out), then the defaults against 'ours:mps_lib' (the
        # callback's own daemon, the trainer a below-normal client) and 'ours:mps_eq' (both clients normal, as on
        # the forty-third visit, when it gave no gain; a daemon the bench started gave 13-15% the visit before).
        # PROBE=1 first runs probe_mps.py (memory of one and two clients, IPC, co-running; ~2 min)
    if [ -n "${PROBE:-}" ]; then
      timeout 240 python3 bench/probe_mps.py --out "$WORK/probe_mps.json" > "$WORK/probe_mps.log" 2>&1
      grep -E "^(plain|mps):" "$WORK/probe_mps.log" | cut -c1-1200
    fi
    reserve=10
    if [ -z "${SKIP_TEST:-}" ]; then
      reserve=310
      timeout 300 python3 -m pytest tests/gpu/test_mps_gpu.py -q -s -p no:cacheprovider -rA > "$WORK/test_mps.log" 2>&1
      echo "[$(date +%T)] rc=$? tests/gpu/test_mps_gpu.py"; grep -E "^(PASSED|FAILED|ERROR)|MPS fit|Error" "$WORK/test_mps.log" | cut -c1-600
    fi
    more=()  # NOYIELD=1: also the daemon with the update not yielding the GPU (its waits serve time-slicing)
    [ -z "${NOYIELD:-}" ] || more=(--extra 'mps_noyield={"callback":{"mps":true,"yield_gpu":false}}')
    run_bench mps $((budget - reserve)) --cases "${CASES:-smollm2-full}" --runners "${RUNNERS:-ours}" \
      --extra 'mps_lib={"callback":{"mps":true}}' \
      --extra 'mps_eq={"callback":{"mps":true},"env":{"CUDA_MPS_CLIENT_PRIORITY":"0"}}' "${more[@]}" \
      --steps "${STEPS:-10}" --timeout 200
    grep -E "^\[|s/step|FAILED|using_mps" "$WORK/bench_mps.log" | cut -c1-400 ;;
  trl-util)  # TRL's GRPOTrainer alone at each vLLM fraction, smallest first: which fractions run, and at what peak
    for u in ${UTILS:-0.02 0.03 0.04}; do  # RUNNERS=trl,trl-sleep adds TRL's vLLM sleep mode at each fraction
      run_bench "util_$u" 200 --cases "${2:?case}" --runners "${RUNNERS:-trl}" --trl-util "$u" \
        --steps "${STEPS:-4}" --timeout 190
      echo "== vllm_gpu_memory_utilization=$u"; grep -E "^\[|s/step|FAILED|Error" "$WORK/bench_util_$u.log" | cut -c1-300 | tail -6
      if [ -n "${STOP_AT_FIRST:-}" ] && ran_steps "$WORK/vs_trl_util_$u.json"; then echo "== $u ran: stopping"; break; fi
    done ;;
  memory)  # budgeted runs (fp8 KV cache, vLLM's profile run capped at 2,048 tokens); a budget is the process's
           # whole NVML figure. TRL first and alone: vLLM sizes its KV cache from the device's free memory. Then
           # ours side by side (each process's NVML figure is its own; their times are not clean): SmolLM2 full
           # at 3 GiB, and the Qwen2.5-1.5B LoRA shape at 5 GiB with a 512 MiB and the default 1 GiB engine
           # workspace (the first step compiles the LoRA layers for 90 s)
    timeout 240 python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); import bench_vs_trl as b; \
b.prepare_models(Path('/tmp/bench_models'), {'smollm2', 'qwen15'})" > "$WORK/models.log" 2>&1
    kw='"engine_kwargs":{"kv_cache_dtype":"fp8","max_num_batched_tokens":2048}'
    b300='{"plugin":{"memory_budget":3221225472,"engine_overhead_bytes":402653184},"rollout":{'$kw'}}'
    b500='{"plugin":{"memory_budget":5368709120,"engine_overhead_bytes":536870912},"rollout":{'$kw'}}'
    [ -n "${SKIP_TRL:-}" ] || run_bench trl 200 --cases smollm2-full --runners trl --steps 10 --timeout 190
    run_bench smollm2 200 --cases smollm2-full --runners , --extra "b300=$b300" --steps 10 --timeout 190 &
    run_bench b500 280 --cases qwen15-lora --runners , --extra "b500=$b500" --steps 6 --timeout 270 &
    # the default 1 GiB engine workspace (close to the real one here): the plan generates the rollout in waves
    run_bench b500w 280 --cases qwen15-lora --runners , --extra "b500w={\"plugin\":{\"memory_budget\":5368709120},\"rollout\":{$kw}}" \
      --steps 6 --timeout 270 &
    wait
    grep -hE "^\[|s/step|FAILED|Error" "$WORK"/bench_*.log | cut -c1-400 | tail -30 ;;
  probe)  # what each stage leaves outside PyTorch, each variant in a fresh process; the log-prob kernel's tiles
          # against its registers, spills, the memory outside PyTorch and its time (SmolLM2 LoRA and full shapes)
    probe() { probe_run probe_context_memory.py probe 90 "$@"; }
    lora=(--stages triton --shape 16384,576,49152 --frozen-weight)
    full=(--stages triton --shape 16384,576,49152)
    probe cublas --stages cublas
    probe lora_default "${lora[@]}"
    probe lora_bv128 "${lora[@]}" --triton-config '{"BLOCK_V":128}'
    probe lora_bn64 "${lora[@]}" --triton-config '{"BLOCK_N":64}'
    probe lora_w16 "${lora[@]}" --triton-config '{"num_warps":16}'
    probe lora_bv128_w4 "${lora[@]}" --triton-config '{"BLOCK_V":128,"num_warps":4}'
    probe full_default "${full[@]}"
    probe full_bv128 "${full[@]}" --triton-config '{"BLOCK_V":128}'
    probe full_bn64 "${full[@]}" --triton-config '{"BLOCK_N":64}'
    python3 - "$WORK" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + "/probe_*.json")):
    d = json.load(open(path))
    grow = [(s["stage"][:24], round(s["outside_torch_mib"] or 0)) for s in d["stages"]]
    k = d.get("triton") or {}
    print(path.rsplit("/", 1)[1], grow, k.get("fwd_bwd_ms"), [(x["kernel"], x["n_regs"], x["n_spills"]) for x in k.get("kernels", [])])
PY
    ;;
  host-step)  # the host masters' optimizer step streamed, overlapped or run by the CPU, each shape in its own process
    ways=${WAYS:-streamed,overlapped,host}
    probe_run probe_host_step.py host_step 240 qwen05 --shape qwen05 --ways "$ways" --steps "${STEPS:-3}"
    [ -n "${SKIP_SMOLLM2:-}" ] || probe_run probe_host_step.py host_step 120 smollm2 --shape smollm2 --ways "$ways" \
      --steps "${STEPS:-3}"
    cat "$WORK"/host_step_*.log ;;
  offload-memory)  # each variant in a fresh process: what one loads stays loaded
    variant() { probe_run probe_offload_memory.py offload 150 "$@"; }
    variant compiled_offloaded --layers compiled --checkpoints offloaded
    variant compiled_plain --layers compiled --checkpoints plain
    variant eager_offloaded --layers eager --checkpoints offloaded
    variant eager_plain --layers eager --checkpoints plain
    variant compiled_offloaded_no_static_launcher --layers compiled --checkpoints offloaded \
      --inductor '{"use_static_cuda_launcher": false}'
    python3 - "$WORK" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + "/offload_*.json")):
    d = json.load(open(path))
    print(path.rsplit("/", 1)[1], [(s["stage"], round(s["outside_torch_mib"] or 0), s["stack_limit_bytes"])
                                   for s in d["stages"]], [round(t, 3) for t in d["update_s"]])
PY
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
