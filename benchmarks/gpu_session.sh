#!/usr/bin/env bash
# One GPU session for issue #9 (GPU validation), in phases that each fit one device call (600 s at most).
#
#   bash benchmarks/gpu_session.sh prepare            # HERE, before the first call: fills build/gpu_session
#   bash benchmarks/gpu_session.sh build-test         # ON THE GPU: build the CUDA extension, GPU tests
#   bash benchmarks/gpu_session.sh bench-a            # ON THE GPU: soundness under cuDNN choice, IBP, attacks
#   bash benchmarks/gpu_session.sh bench-b            # ON THE GPU: randomized-smoothing certification
#   bash benchmarks/gpu_session.sh bench-c            # ON THE GPU: flatness, smoothing-based training
#   bash benchmarks/gpu_session.sh bench-d            # ON THE GPU: CROWN, fused flatness, MACER tail
#   bash benchmarks/gpu_session.sh collect DIR        # HERE, after each call: DIR = the call's files_at
#   bash benchmarks/gpu_session.sh --dry-run all      # HERE: every phase on this CPU at tiny sizes, in a copy
#   bash benchmarks/gpu_session.sh --list             # the step table with the estimates
#   GPU_SESSION_ONLY="ibp attacks" bash benchmarks/gpu_session.sh bench-a   # some steps of a phase only
#
# Device calls: run each phase with carry ["build/gpu_session"] (build/ is git-ignored: auto_LiRPA, torchattacks,
# appdirs and graphviz as plain Python packages, the commit id, and, once build-test has come back and been
# collected, the built extension, which later phases restore instead of rebuilding on a fresh machine). In one
# message after each call: `collect` that call's files_at, and `run` the next phase (a machine idle for 30 s is
# given back; the next call then starts a bare one, a minute or more).
#
# Each phase: checks the extension (restores or builds it), runs its steps in order, each under `timeout` (its
# limit below, cut to what is left of the phase budget GPU_SESSION_BUDGET, default 570 s), goes on past a failing
# step, and after every step rewrites in $OUT (default build/gpu_session_out/<phase>): <phase>.tar.gz (logs, pytest
# junit XML, summary, benchmarks/RESULTS.md and benchmarks/results/*.csv), <phase>-summary.txt and RESULTS.md,
# plus robustkern_C.so.gz and robustkern_C.stamp when it built the extension. At most 8 files come back from $OUT.
# Exit status: 0 when every step passed or was skipped by design, 1 otherwise (the summary says which).
#
# Estimates (seconds, written before any GPU run here: none of them is a measurement; conservative). Counted from
# FLOPs (torch.utils.flop_counter, forward per image: CNN-7 301 M, cifar_medium 33 M, cifar_small 3.6 M,
# ResNet-110 506 M, MNIST small 2.4 M, PreAct-ResNet-18 1.1 G, LFR SmallCNN 20 M) at an assumed 15-25 TFLOP/s
# effective for these small-image CNNs on an H100 (the card does ~67 fp32 and ~500 TF32 TFLOP/s peak); fp32
# bound computations with TF32 off; triton.testing.do_bench calls a slow function at least 8 times (1 + 5 to
# estimate + 1 warm-up + 1 timed), a fast one for about 0.3 s. Compilation: torch's C++/CUDA extension with
# MAX_JOBS=16 (about 10 translation units, the slowest one nvcc), Triton autotuning (up to 6 configurations per
# kernel variant, compiled one after the other), torch.compile. Per phase, with the extension restored or warm:
#   build-test ~390 s (the build ~150 of it)   bench-a ~385 s   bench-b ~385 s   bench-c ~275 s
#   bench-d ~345 s
# Sum ~1435 s (24 min) plus ~1-2 min for each call that finds no warm machine; a phase that must rebuild the
# extension on a fresh machine adds ~150 s (the budget guard then skips its last steps; rerun them).
set -uo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOT="$(cd "$(dirname "$SELF")/.." && pwd)"
CARRY=build/gpu_session            # carried to the device (relative to the repository root)
STATE=build/gpu_session_state      # device-local state (the stamp of the extension in place); never carried
COLLECTED=build/gpu_session_collected   # here: the phases' logs, unpacked by collect
PHASES="build-test bench-a bench-b bench-c bench-d"

# ------------------------------------------------------------------------------------------------ the steps
# phase | step | estimate s | limit s | command
# "@fn args" runs the function fn of this script; "script.py args" runs benchmarks/script.py with $PY. A benchmark
# step is skipped (status "skip") when its script does not accept one of the --options it is given (grep of the
# script's add_argument calls): that is how CPU-only scripts sit in the table until they take --device.
read -r -d '' STEPS <<'EOF'
# ---- build and GPU tests
build-test | env                   |  10 |  60 | @env_info
build-test | ext                   | 150 | 420 | @ensure_ext
build-test | test-build            |  20 | 120 | @run_pytest tests/test_build.py
build-test | test-interval-cuda    |  60 | 200 | @run_pytest tests/test_interval_cpp.py -k "cuda or mixed_devices"
build-test | test-triton-cuda      | 120 | 300 | @run_pytest_parallel tests/test_interval_triton.py
# -m gpu selects ~324 cases since the device-parametrized tests (Triton compilation dominates; unmeasured):
# last in the phase so that the budget guard cuts it, not the CUDA op tests, when the build ran long.
build-test | test-gpu-marker       | 150 | 300 | @run_pytest -m gpu tests
# ---- soundness with cuDNN free to pick Winograd/FFT; IBP (issue sizes); PGD
# The C++ interval ops call cuDNN with benchmark=false themselves; the flag reaches the torch convolutions of the
# tests' references and of the reference backend. gpu_soundness.py checks every backend with the flag off and on.
bench-a    | ext                   |   5 | 240 | @ensure_ext
bench-a    | sound-cudnn-benchmark |  40 | 150 | @run_pytest_cudnn_benchmark tests/test_interval_cpp.py -k "cuda and (sound or precision)"
bench-a    | soundness             |  90 | 240 | gpu_soundness.py --batch 32 --write-results
# 2 models x 2 modes x 5 providers; ~0.7 TFLOP per CNN-7 fwd+bwd IBP call (~0.03 s); mostly Triton autotuning.
# `compile` left out: 4 torch.compile runs (2 models x fwd/fwd+bwd; more per extra eps) of up to ~45 s each.
bench-a    | ibp                   | 150 | 360 | bench_ibp.py --device cuda --models cnn_7layer_bn,cifar_medium:padding=1 --batch 256,64 --eps 2/255 --providers plain,eager,robustkern,robustkern-unsound,auto_lirpa --write-results
# PreAct-ResNet-18 batch 128 PGD-100: 28 TFLOP a call (~1.1 s at 25 TFLOP/s) x 8 calls x 5 providers.
bench-a    | attacks               | 100 | 240 | bench_attacks.py --device cuda --models mnist_small,preact_resnet18 --batch 256,128 --steps 20,100 --write-results
# ---- randomized smoothing (picks CUDA itself: no --device option)
# ResNet-110, N0 + N = 100,100 samples an image: 51 TFLOP (~3.5 s at 15 TFLOP/s) x 8 calls x 6.5 providers
# (bf16 at half) = ~180 s, torch.compile of ResNet-110 ~120 s, cifar_small ~40 s. --images 2 adds ~180 s.
bench-b    | ext                   |   5 | 240 | @ensure_ext
bench-b    | smoothing             | 380 | 540 | bench_smoothing.py --models cifar_small,resnet110 --n 100000,100000 --images 1 --write-results
# ---- flatness (LFR-10 on PreAct-ResNet-18 batch 128: ~8 TFLOP a step) and smoothing-based training steps
bench-c    | ext                   |   5 | 240 | @ensure_ext
bench-c    | flatness              | 150 | 300 | bench_flatness.py --device cuda --models small_cnn,small_cnn_avg,preact_resnet18 --batch 128,128,128 --write-results
# ResNet-110 batch 64: SmoothAdv m=4 T=10 ~3 TFLOP a step, MACER k=16 ~1.5; launch-bound at this size.
bench-c    | smoothing-train       | 120 | 300 | bench_smoothing_train.py --models cifar_small,resnet110 --batch 64,64 --write-results
# ---- CROWN, fused flatness, MACER tail
bench-d    | ext                   |   5 | 240 | @ensure_ext
bench-d    | crown-cnn7            | 150 | 300 | bench_crown.py --device cuda --models cnn_7layer_bn --batch 256 --write-results
bench-d    | crown-medium          | 100 | 240 | bench_crown.py --device cuda --models cifar_medium:padding=1 --batch 64 --write-results
bench-d    | flatness-fused        |  60 | 180 | bench_flatness_fused.py --device cuda --models mnist_small,mnist_large --batch 128 --lfr --write-results
bench-d    | macer-tail            |  30 | 120 | bench_macer_tail.py --device cuda --write-results
EOF

# Dry run (this CPU machine, tiny sizes): step | limit s | command. The same functions; the build step prints
# its command and checks the CPU extension instead (no CUDA here), the CUDA test selections become CPU ones.
read -r -d '' DRY_STEPS <<'EOF'
env                   |  60 | @env_info
ext                   | 120 | @ensure_ext
test-build            | 300 | @run_pytest tests/test_build.py
test-gpu-marker       | 300 | @run_pytest -m gpu tests
test-interval-cuda    | 300 | @run_pytest tests/test_interval_cpp.py -k "cpu and float32 and sound and wide"
test-triton-cuda      | 300 | @run_pytest_parallel tests/test_interval_triton.py -k "input_box"
sound-cudnn-benchmark | 300 | @run_pytest_cudnn_benchmark tests/test_interval_cpp.py -k "cpu and sound and point"
soundness             | 300 | gpu_soundness.py --batch 2 --op-batch 1 --models cifar_medium:padding=1 --eps 2/255 --points 2 --write-results
ibp                   | 600 | bench_ibp.py --device cpu --threads 1 --quick --models cifar_medium:padding=1 --providers plain,eager,robustkern,robustkern-unsound,auto_lirpa --write-results
attacks               | 300 | bench_attacks.py --device cpu --threads 1 --quick --write-results
smoothing             | 300 | bench_smoothing.py --models cifar_small --n 200 --n0 10 --images 1 --batch 100 --threads 1 --rounds 1 --no-compiled --write-results
flatness              | 300 | bench_flatness.py --device cpu --threads 1 --quick --models small_cnn,small_cnn_avg --write-results
smoothing-train       | 300 | bench_smoothing_train.py --models cifar_small --batch 2 --rounds 1 --smoothadv-steps 1 --trades-steps 1 --write-results
crown-cnn7            | 300 | bench_crown.py --device cpu --models cnn_7layer_bn --batch 2 --rounds 1 --write-results
crown-medium          | 300 | bench_crown.py --device cpu --models cifar_medium:padding=1 --batch 2 --rounds 1 --write-results
flatness-fused        | 300 | bench_flatness_fused.py --device cpu --models mnist_small --batch 8 --rounds 1 --no-save
macer-tail            | 300 | bench_macer_tail.py --device cpu --rounds 10 --repeats 1 --no-save
EOF

# ------------------------------------------------------------------------------------------------ helpers
log() { printf '[gpu_session %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
trim() { local s="$1"; s="${s#"${s%%[![:space:]]*}"}"; printf '%s' "${s%"${s##*[![:space:]]}"}"; }
is_dry() { [ "${GPU_SESSION_DRY_RUN:-0}" = 1 ]; }

pick_python() {
  local p
  for p in "${GPU_SESSION_PYTHON:-}" python3 python; do
    [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch" 2>/dev/null && { echo "$p"; return; }
  done
  echo python3
}

# rows of a table for a phase (STEPS) or a step (DRY_STEPS): prints the fields separated by a tab
table_rows() { # $1 table text, $2 column to match (1-based), $3 value
  local line
  while IFS= read -r line; do
    [[ -z "$(trim "$line")" || "$(trim "$line")" == \#* ]] && continue
    local IFS='|'; read -r -a f <<<"$line"
    [ "$(trim "${f[$(($2 - 1))]}")" = "$3" ] || continue
    local out="" i
    for ((i = 0; i < ${#f[@]}; i++)); do out+="$(trim "${f[$i]}")"$'\t'; done
    printf '%s\n' "${out%$'\t'}"
  done <<<"$1"
}

# ------------------------------------------------------------------------------------------------ step functions
env_info() {
  date -u; uname -srm; echo "cores: $(nproc)"; free -g 2>/dev/null | head -2
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  else echo "nvidia-smi: absent"; fi
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -2 || echo "nvcc: absent"
  "$PY" - <<'PYEOF'
import importlib, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, cc {p.major}.{p.minor}; "
          f"cudnn {torch.backends.cudnn.version()}; cudnn.allow_tf32 {torch.backends.cudnn.allow_tf32}, "
          f"matmul.allow_tf32 {torch.backends.cuda.matmul.allow_tf32}")
for m in ("triton", "numpy", "scipy", "pytest", "xdist", "torchattacks", "auto_LiRPA"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')} ({getattr(mod, '__file__', '?')})")
    except Exception as e:  # noqa: BLE001
        print(f"{m}: not importable ({type(e).__name__})")
PYEOF
}

ext_stamp() { # what the extension in place must have been built from: sources, torch, python, mode
  "$PY" - "$(is_dry && echo cpu || echo cuda-${TORCH_CUDA_ARCH_LIST:-9.0})" <<'PYEOF'
import hashlib, pathlib, sys, torch
h = hashlib.sha256()
for p in sorted(pathlib.Path("csrc").rglob("*")) + [pathlib.Path("setup.py")]:
    if p.is_file():
        h.update(str(p).encode()); h.update(p.read_bytes())
h.update(f"{torch.__version__} {sys.version_info[:2]} {sys.argv[1]}".encode())
print(h.hexdigest()[:16])
PYEOF
}

ext_loads() { # the prebuilt robustkern._C loads (no JIT), with CUDA kernels on a GPU run
  "$PY" - "$(is_dry && echo 0 || echo 1)" <<'PYEOF'
import sys
import torch
from robustkern import _ext
ok = _ext.load() and _ext.status() == "prebuilt"
if ok and sys.argv[1] == "1":
    ok = _ext.has_cuda_kernels()
info = torch.ops.robustkern.build_info() if ok else _ext.status()
print(f"robustkern._C: {'loads' if ok else 'NOT usable'} ({info})")
sys.exit(0 if ok else 1)
PYEOF
}

ensure_ext() {
  local stamp so
  stamp="$(ext_stamp)"
  mkdir -p "$STATE"
  if [ "$(cat "$STATE/ext.stamp" 2>/dev/null)" = "$stamp" ] && ext_loads; then
    log "extension in place and built from these sources (stamp $stamp)"; return 0
  fi
  if [ -f "$CARRY/ext/robustkern_C.so.gz" ] && [ "$(head -1 "$CARRY/ext/robustkern_C.stamp" 2>/dev/null)" = "$stamp" ]; then
    so="$(sed -n 2p "$CARRY/ext/robustkern_C.stamp")"
    log "restoring the carried extension robustkern/$so (stamp $stamp)"
    gunzip -c "$CARRY/ext/robustkern_C.so.gz" >"robustkern/$so" && echo "$stamp" >"$STATE/ext.stamp"
    ext_loads && return 0
    log "the carried extension does not load: building"
  elif [ -f "$CARRY/ext/robustkern_C.stamp" ]; then
    log "carried extension stamp $(head -1 "$CARRY/ext/robustkern_C.stamp") != $stamp (sources or torch changed): building"
  fi
  local build=(env ROBUSTKERN_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="$(nproc)"
               "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .)
  if is_dry; then
    log "dry run: would build with: ${build[*]}"
    ext_loads || { log "dry run: no usable prebuilt CPU extension in this copy"; return 1; }
  else
    log "building: ${build[*]}"
    "${build[@]}" || return 1
    ext_loads || return 1
  fi
  echo "$stamp" >"$STATE/ext.stamp"
  so="$(cd robustkern && ls _C*.so 2>/dev/null | head -1)"
  [ -n "$so" ] || return 1
  gzip -c "robustkern/$so" >"$OUT/robustkern_C.so.gz" && printf '%s\n%s\n' "$stamp" "$so" >"$OUT/robustkern_C.stamp"
  log "packed robustkern/$so ($(du -h "$OUT/robustkern_C.so.gz" | cut -f1) gzipped) into \$OUT for later phases"
}

run_pytest() {
  local extra=()
  is_dry || export TRITON_INTERPRET=0     # three test files setdefault TRITON_INTERPRET=1 at import
  [ -n "${STEP_JUNIT:-}" ] && extra+=(--junitxml="$STEP_JUNIT")
  "$PY" -m pytest -q -p no:cacheprovider -rfEs "${extra[@]}" "$@"
}

run_pytest_parallel() { # pytest-xdist when present (the GPU image has it): Triton compiles in parallel
  if ! is_dry && "$PY" -c "import xdist" 2>/dev/null; then run_pytest -n 8 "$@"; else run_pytest "$@"; fi
}

run_pytest_cudnn_benchmark() {
  local extra=()
  is_dry || export TRITON_INTERPRET=0
  [ -n "${STEP_JUNIT:-}" ] && extra+=(--junitxml="$STEP_JUNIT")
  "$PY" -c 'import sys, torch, pytest
torch.backends.cudnn.benchmark = True
print("torch.backends.cudnn.benchmark =", torch.backends.cudnn.benchmark, flush=True)
sys.exit(pytest.main(sys.argv[1:]))' -q -p no:cacheprovider -rfEs "${extra[@]}" "$@"
}

# ------------------------------------------------------------------------------------------------ phase runner
bundle() { # rewrite the phase's files in $OUT (after every step, so that a killed command still returns them)
  local dir="$STAGE/$PHASE"
  mkdir -p "$dir/benchmarks/results"
  cp -f benchmarks/RESULTS.md "$dir/benchmarks/" 2>/dev/null
  cp -f benchmarks/results/*.csv "$dir/benchmarks/results/" 2>/dev/null
  tar -czf "$OUT/$PHASE.tar.gz.part" -C "$STAGE" "$PHASE" && mv -f "$OUT/$PHASE.tar.gz.part" "$OUT/$PHASE.tar.gz"
  cp -f "$dir/summary.txt" "$OUT/$PHASE-summary.txt"
  cp -f benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null
}

missing_option() { # prints the first --option of a benchmark command that its script does not define
  local script="benchmarks/$1" w; shift
  for w in "$@"; do
    [[ "$w" == --* ]] || continue
    grep -q -- "\"${w%%=*}\"" "$script" || { echo "${w%%=*}"; return; }
  done
}

run_phase() {
  PHASE="$1"
  local rows; rows="$(table_rows "$STEPS" 1 "$PHASE")"
  [ -n "$rows" ] || { echo "unknown phase '$PHASE' (phases: $PHASES)" >&2; exit 2; }
  OUT="${OUT:-$ROOT/build/gpu_session_out/$PHASE}"
  STAGE="$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX")"
  mkdir -p "$OUT" "$STAGE/$PHASE/logs"
  export OUT STAGE PHASE
  local budget="${GPU_SESSION_BUDGET:-$(is_dry && echo 3600 || echo 570)}"
  local t0=$SECONDS n=0 failed=0 summary="$STAGE/$PHASE/summary.txt"
  printf '%-10s %-22s %-8s %6s %6s %6s  %s\n' phase step status wall_s est_s limit_s note >"$summary"
  log "phase $PHASE ($(is_dry && echo 'DRY RUN on the CPU' || echo GPU)), budget ${budget} s, OUT=$OUT"
  if ! is_dry && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA device here: run with --dry-run on a CPU machine"; exit 2
  fi
  local step est limit cmd status note rc started wall left
  while IFS=$'\t' read -r _ step est limit cmd; do
    n=$((n + 1))
    note=""
    if [ -n "${GPU_SESSION_ONLY:-}" ] && [ "$step" != ext ] && [[ " $GPU_SESSION_ONLY " != *" $step "* ]]; then
      continue                                                 # not selected (the extension check always runs)
    fi
    if is_dry; then
      local dry; dry="$(table_rows "$DRY_STEPS" 1 "$step")"
      [ -n "$dry" ] || { echo "no dry-run row for step $step" >&2; exit 2; }
      IFS=$'\t' read -r _ limit cmd <<<"$dry"
    fi
    local logf; logf="$(printf '%02d-%s.log' "$n" "$step")"
    export STEP_JUNIT=""
    [[ "$cmd" == @run_pytest* ]] && STEP_JUNIT="$STAGE/$PHASE/logs/${logf%.log}.xml"
    local full shown
    if [[ "$cmd" == @* ]]; then
      full="${cmd#@}"; shown="$full"
    else
      local words; read -r -a words <<<"$cmd"
      local miss; miss="$(missing_option "${words[@]}")"
      if [ -n "$miss" ]; then
        printf '%-10s %-22s %-8s %6s %6s %6s  %s\n' "$PHASE" "$step" skip 0 "$est" "$limit" \
          "${words[0]} has no $miss option: not run" >>"$summary"
        log "step $step: SKIP (${words[0]} has no $miss option)"; bundle; continue
      fi
      full="\"\$PY\" benchmarks/$cmd"; shown="$PY benchmarks/$cmd"
    fi
    left=$((budget - (SECONDS - t0) - 10))
    if [ "$left" -lt 20 ]; then
      printf '%-10s %-22s %-8s %6s %6s %6s  %s\n' "$PHASE" "$step" NOT-RUN 0 "$est" "$limit" \
        "phase budget spent: run it again in another call" >>"$summary"
      log "step $step: NOT RUN (phase budget spent)"; failed=1; bundle; continue
    fi
    [ "$limit" -gt "$left" ] && { limit=$left; note="limit cut to the phase budget; "; }
    log "step $step (estimate ${est} s, limit ${limit} s): $shown"
    started=$SECONDS
    {
      echo "# step $step of phase $PHASE: $shown"
      echo "# PYTHONPATH=$PYTHONPATH AUTO_LIRPA_PATH=${AUTO_LIRPA_PATH:-} PY=$PY"
    } >"$STAGE/$PHASE/logs/$logf"
    timeout -k 15 "$limit" bash "$SELF" __exec "$full" >>"$STAGE/$PHASE/logs/$logf" 2>&1 </dev/null
    rc=$?
    wall=$((SECONDS - started))
    case $rc in
      0) status=ok ;;
      124|137) status=TIMEOUT; failed=1 ;;
      5) if [[ "$cmd" == @run_pytest* ]]; then status="no-tests"; failed=1; else status="FAIL($rc)"; failed=1; fi ;;
      *) status="FAIL($rc)"; failed=1 ;;
    esac
    note+="log logs/$logf"
    printf '%-10s %-22s %-8s %6s %6s %6s  %s\n' "$PHASE" "$step" "$status" "$wall" "$est" "$limit" "$note" >>"$summary"
    log "step $step: $status in ${wall} s"
    if [ "$status" != ok ]; then tail -n 15 "$STAGE/$PHASE/logs/$logf" | sed 's/^/    | /'; fi
    bundle
  done <<<"$rows"
  log "phase $PHASE done in $((SECONDS - t0)) s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
  echo; cat "$summary"; echo
  echo "next: collect this call's files (bash benchmarks/gpu_session.sh collect <files_at>) and run the next phase" \
       "with carry [\"$CARRY\"]"
  rm -rf "$STAGE"
  return $failed
}

# ------------------------------------------------------------------------------------------------ local commands
prepare() { # here, before a device call: the packages the device lacks and the commit, into build/gpu_session
  local site="$CARRY/site" lirpa="${USER_AUTO_LIRPA_PATH:-/work/scratch/lirpa}" m src
  mkdir -p "$site" "$CARRY/ext"
  if [ -d "$lirpa/auto_LiRPA" ]; then
    rm -rf "$site/auto_LiRPA"
    tar -C "$lirpa" --exclude=__pycache__ -cf - auto_LiRPA | tar -C "$site" -xf -
    log "auto_LiRPA from $lirpa -> $site"
  else
    log "auto_LiRPA not found at $lirpa (set AUTO_LIRPA_PATH): the auto_lirpa rows will say unavailable"
  fi
  for m in torchattacks appdirs graphviz; do
    src="$(PYTHONPATH= "$PY" -c "import $m, os; f = $m.__file__; print(os.path.dirname(f) if f.endswith('__init__.py') else f)" 2>/dev/null)"
    if [ -n "$src" ]; then
      rm -rf "$site/$(basename "$src")"
      tar -C "$(dirname "$src")" --exclude=__pycache__ -cf - "$(basename "$src")" | tar -C "$site" -xf -
      log "$m ($src) -> $site"
    else
      log "$m is not installed here: left out"
    fi
  done
  local commit="${GPU_SESSION_COMMIT:-}"
  if [ -z "$commit" ] && commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)"; then
    [ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ] && commit+="+dirty"
  fi
  echo "${commit:-none}" >"$CARRY/COMMIT"
  log "commit recorded for the device's results: $(cat "$CARRY/COMMIT")"
  log "$CARRY holds $(du -sh "$CARRY" | cut -f1); device calls: carry [\"$CARRY\"], command e.g." \
      "'bash benchmarks/gpu_session.sh build-test'"
}

collect() { # here, after a device call: merge its results into this checkout, keep its logs and extension
  local dir="${1:?collect needs the folder of a call (files_at)}" tgz phase found=0
  mkdir -p "$COLLECTED" "$CARRY/ext"
  for tgz in "$dir"/*.tar.gz; do
    [ -f "$tgz" ] || continue
    found=1
    phase="$(basename "$tgz" .tar.gz)"
    rm -rf "${COLLECTED:?}/$phase"
    tar -xzf "$tgz" -C "$COLLECTED"
    log "phase $phase: logs in $COLLECTED/$phase/logs"
    cat "$COLLECTED/$phase/summary.txt"
    "$PY" benchmarks/gpu_session_merge.py "$COLLECTED/$phase/benchmarks" benchmarks
  done
  [ "$found" = 1 ] || { log "no <phase>.tar.gz in $dir"; return 1; }
  if [ -f "$dir/robustkern_C.so.gz" ] && [ -f "$dir/robustkern_C.stamp" ]; then
    cp -f "$dir/robustkern_C.so.gz" "$dir/robustkern_C.stamp" "$CARRY/ext/"
    log "extension (stamp $(head -1 "$CARRY/ext/robustkern_C.stamp")) kept in $CARRY/ext: later calls restore it"
  fi
}

list_steps() {
  printf '%-10s %-22s %6s %6s  %s\n' phase step est_s limit_s command
  local p; for p in $PHASES; do
    table_rows "$STEPS" 1 "$p" | while IFS=$'\t' read -r ph st es li cm; do
      printf '%-10s %-22s %6s %6s  %s\n' "$ph" "$st" "$es" "$li" "$cm"; done
  done
}

dry_copy() { # what a device call would get: the work tree (tracked and untracked files that git does not
             # ignore) plus, for the dry run, the CPU extension (which the build step cannot make here)
  local dest="$1"
  rm -rf "$dest"; mkdir -p "$dest"
  (cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -C "$dest" -xf -
  cp -p "$ROOT"/robustkern/_C*.so "$dest/robustkern/" 2>/dev/null
  log "dry run: copied the work tree to $dest ($(du -sh "$dest" | cut -f1))"
}

dry_device_copy() { # $1 lead copy, $2 device copy, $3 phase: a fresh device machine gets the tree and the carried
                    # folder, not the ignored build outputs (the extension comes back only in build-test here)
  local lead="$1" dev="$2" phase="$3" ex=(--exclude=./build --exclude=__pycache__ --exclude=./robustkern.egg-info)
  [ "$phase" != build-test ] && ex+=(--exclude='./robustkern/_C*.so')
  rm -rf "$dev"; mkdir -p "$dev/build"
  (cd "$lead" && tar "${ex[@]}" -cf - .) | tar -C "$dev" -xf -
  cp -a "$lead/$CARRY" "$dev/$CARRY"
}

dry_main() { # --dry-run PHASE|all, never in this checkout: a copy acts as the lead's checkout, and each phase
             # runs in a fresh copy of it (the device), then is collected into the lead's copy
  local what="$1" base="${GPU_SESSION_DRY_DIR:-${TMPDIR:-/tmp}/gpu_session_dry}" commit rc=0 p
  local lead="$base/lead" dev="$base/device"
  commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)"
  [ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ] && commit+="+dirty"
  if [ "$what" = all ] || [ ! -d "$lead" ]; then
    dry_copy "$lead"
    rm -rf "$base/out"
    (cd "$lead" && GPU_SESSION_COMMIT="$commit-dryrun" bash benchmarks/gpu_session.sh prepare) || return 1
  fi
  local phases="$what"; [ "$what" = all ] && phases="$PHASES"
  for p in $phases; do
    dry_device_copy "$lead" "$dev" "$p"
    rm -rf "$base/out/$p"; mkdir -p "$base/out/$p"
    (cd "$dev" && OUT="$base/out/$p" GPU_SESSION_DRY_RUN=1 GPU_SESSION_IN_COPY=1 bash benchmarks/gpu_session.sh "$p") || rc=1
    (cd "$lead" && bash benchmarks/gpu_session.sh collect "$base/out/$p") || rc=1
  done
  log "dry run finished (status $rc); what collect changed in the lead's copy $lead against this checkout:"
  diff <(grep -o 'BEGIN .* -->' "$ROOT/benchmarks/RESULTS.md") <(grep -o 'BEGIN .* -->' "$lead/benchmarks/RESULTS.md") \
    | sed -n 's/^> /  new RESULTS.md block: /p'
  diff -q "$ROOT/benchmarks/RESULTS.md" "$lead/benchmarks/RESULTS.md" >/dev/null && echo "  RESULTS.md: unchanged"
  local f; for f in "$lead"/benchmarks/results/*.csv; do
    local a b; a=$(cat "$ROOT/benchmarks/results/$(basename "$f")" 2>/dev/null | wc -l); b=$(wc -l <"$f")
    [ "$a" != "$b" ] && echo "  results/$(basename "$f"): $a -> $b lines"
  done
  return $rc
}

# ------------------------------------------------------------------------------------------------ main
cd "$ROOT" || exit 2
USER_AUTO_LIRPA_PATH="${USER_AUTO_LIRPA_PATH-${AUTO_LIRPA_PATH:-}}"   # before it is pointed at the carried copy
export USER_AUTO_LIRPA_PATH
PY="${PY:-$(pick_python)}"
export PY ROBUSTKERN_JIT=0 PYTHONUNBUFFERED=1
PYTHONPATH="python:."
if [ -d "$CARRY/site" ]; then
  PYTHONPATH+=":$CARRY/site"
  [ -d "$CARRY/site/auto_LiRPA" ] && export AUTO_LIRPA_PATH="$CARRY/site"
fi
export PYTHONPATH
if ! git rev-parse --git-dir >/dev/null 2>&1 && [ -f "$CARRY/COMMIT" ]; then
  export ROBUSTKERN_GIT_COMMIT="$(cat "$CARRY/COMMIT")"     # the device's copy has no .git
fi

case "${1:-}" in
  __exec) shift; eval "$1" ;;                                  # one step, under timeout (internal)
  --dry-run)
    shift
    if [ "${GPU_SESSION_IN_COPY:-0}" = 1 ]; then export GPU_SESSION_DRY_RUN=1; run_phase "${1:?phase}"
    else dry_main "${1:-all}"; fi ;;
  prepare) prepare ;;
  collect) shift; collect "$@" ;;
  --list) list_steps ;;
  ""|-h|--help) sed -n '2,20p' "$SELF" ;;
  all) is_dry && { dry_main all; exit; }
       rc=0; for p in $PHASES; do run_phase "$p" || rc=1; done; exit $rc ;;
  *)
    if is_dry && [ "${GPU_SESSION_IN_COPY:-0}" != 1 ]; then dry_main "$1"; exit; fi
    run_phase "$1" ;;
esac
