#!/usr/bin/env bash
# GPU checks in a few device calls, all logs under $OUT:
#   1. the GPU correctness tests of the forward and backward kernels and of the short
#      convolution's kernels (marker `gpu`);
#   2. experiments/bench_op.py on the target shapes (B=4, T=4096, H=8, K=V=128, n_h=1..3):
#      forward, forward+backward, each kernel alone with its compile time, peak memory;
#   3. the peers in the same job, each in its own process: jax-linear-attention, then FLA
#      (FLA autotunes for minutes on its first calls: it gets the longest slice);
#   4. `shapes`: the other shapes of the issues (gated n_h=2; n_h=4, K=V=64, H=16; B=1, T=32768)
#      and the state-tracking shape (B=2048, T=129, H=8, K=V=32, n_h=1, 2, 4), stages included;
#   4b. `variants`: forward+backward at the targets with other BackwardConfig fields side by side
#      with the default (BWD_VARIANTS="--bwd-variant FIELD=VALUE ... --variant FIELD=VALUE,...";
#      grad_dtype=float32 without it);
#      VARIANT_ONLY="0 1" narrows the n_h (bench_op.py --only); VARIANTS_TIMEOUT=s (240 by default);
#   4c. `conv`: the short convolution (with and without the q/k L2 norm), XLA against the Pallas
#      forward and backward kernels (experiments/bench_conv.py, the 392M models' shapes; CONV_CASES="--case 8,4096,2048");
#   4d. `tune`: only the stage variants of TUNE_STAGES ("state_pass bwd_state_pass" by default)
#      alone at TUNE_CASE (B,T,H,K,V,n_h; the n_h = 2 target by default), then the op tuned;
#   4e. `gemm`: the dense-layer GEMMs (experiments/bench_gemm.py) at the 392M MLP's shape and at
#      the 805M presets' hidden sizes (1468 against 1472 and 1536), XLA's Triton GEMMs against
#      cuBLAS side by side; GEMM_CASES="--case N,D,F ..." overrides;
#   5. `split`: the sequence split of the state passes (state_split 2, 4, 8) against the other
#      stage variants, side by side, at B=1, T=32768 and at the target shape (--tune, --bwd-tune;
#      SPLIT_CASES="4,4096,8,128,128,2" overrides the B,T,H,K,V,n_h cases);
#   6. `lm`: the 392M DN / DP2 / DP3 train steps (8 x 4096 tokens, --remat block) profiled by
#      experiments/profile_step.py: step time, tokens/s (SPEC §9 item 11's ratios), top device ops;
#      `lm_remat`: DP2 without rematerialisation and with the matmul outputs saved;
#      LM_RUNS="dp2 none;dn block" overrides either list ("preset remat [conv_backward
#      [conv_forward [gemm [norm_impl]]]]", ";"-separated; a preset without "-" means its 392M
#      size; conv_backward auto by default: the short convolution's Pallas backward, "xla" for
#      autodiff; conv_forward likewise, auto by default; gemm: profile_step.py --gemm, auto by
#      default; norm_impl: --norm_impl, xla by default),
#      each with the step's time by source file (LM_HLO=0: without the compiled HLO);
#   BASE=1 (with .base/ from `bash scripts/snapshot_base.sh REV`, carried): `bench` and `lm`
#      also run from that earlier revision's code in the same call (base_* records), for
#      before/after figures from one machine;
#   6b. `ncu`: Nsight Compute over one forward + backward of the op at NCU_CASE (B,T,H,K,V,n_h;
#      the n_h = 2 target by default; NCU_GATED=1 with a gate; NCU_BWD="FIELD=VALUE,..." with
#      BackwardConfig fields changed): every dp_ kernel's duration,
#      DRAM throughput, occupancy, stall reasons and synchronous loads in loops
#      (experiments/ncu_kernels.py: ncu_summary.md, plus ncu_details.txt and
#      ncu_source.csv.gz for reading further);
#   7. `multi`: DP2-392M training (language_model.py train, BPE-32k stdlib shards, 8 x 4096 tokens
#      per GPU, --remat block) on all GPUs data-parallel, on all GPUs with FSDP, and on one GPU:
#      tokens/s and MFU of each (needs .gpu_data/bpe32k.json: carry ".gpu_data" too).
# Device tool: carry [".whl"] (bash scripts/fetch_gpu_wheels.sh fills it); a call may run 10
# minutes, so use separate calls:
#   bash scripts/gpu_check.sh tests           # about 6 minutes (50 tests, 8 skipped by design;
#                                             # 40 took 280 s; TEST_FILES=..., TEST_K=expr, TESTS_TIMEOUT=s
#                                             # narrow it)
#   bash scripts/gpu_check.sh bench jla fla   # about 9 minutes: ours and the peers in one job
#   bash scripts/gpu_check.sh variants        # at most 4.5 minutes
#   bash scripts/gpu_check.sh shapes          # at most 6.5 minutes
#   bash scripts/gpu_check.sh conv            # at most 2.5 minutes
#   bash scripts/gpu_check.sh tune            # at most 4 minutes
#   bash scripts/gpu_check.sh gemm            # at most 4 minutes
#   bash scripts/gpu_check.sh split           # at most 7 minutes
#   bash scripts/gpu_check.sh lm              # at most 8.5 minutes
#   bash scripts/gpu_check.sh lm_remat        # at most 6 minutes
#   bash scripts/gpu_check.sh ncu             # about 1 minute (the n_h = 2 target)
#   bash scripts/gpu_check.sh multi           # at most 9.5 minutes (nvidia-h200-x2)
set -uo pipefail
cd "$(dirname "$0")/.."
STAGES=${*:-bench jla fla}
# shellcheck source=scripts/gpu_lib.sh
source scripts/gpu_lib.sh
gpu_setup || exit 1
# allocate on demand, but up to 95 % of the GPU (without preallocation JAX otherwise caps its pool
# at 75 %: 60 GB of an H100, too little for DP2-392M without remat)
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# (JAX 0.11.2's name; with the deprecated XLA_PYTHON_CLIENT_MEM_FRACTION also set, the CUDA plugin
# refuses to start and JAX runs on the CPU)
export XLA_CLIENT_MEM_FRACTION=${XLA_CLIENT_MEM_FRACTION:-.95}
require_jax_gpu || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
for stage in $STAGES; do
  case $stage in
    tests)
      # shellcheck disable=SC2086
      timeout "${TESTS_TIMEOUT:-450}" python3 -m pytest \
        ${TEST_FILES:-tests/test_pallas_forward.py tests/test_pallas_backward.py tests/test_short_conv.py tests/test_rms_norm.py} \
        ${TEST_K:+-k "$TEST_K"} -m gpu -q -rA 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    bench)
      timeout 200 python3 experiments/bench_op.py --only 0 1 2 --stages --bwd-stages --memory \
        --no-chunked --repeats 5 --out "$OUT" > "$OUT/bench_op.stdout" 2>&1
      tail -40 "$OUT/bench_op.md"
      if [ "${BASE:-0}" = 1 ]; then  # the snapshot of scripts/snapshot_base.sh, same shapes
        (cd .base && PYTHONPATH=. timeout 150 python3 experiments/bench_op.py --only 0 1 2 \
          --no-chunked --repeats 5 --out "$OUT/base_bench" > "$OUT/base_bench.stdout" 2>&1)
        echo "base $(cat .base/REVISION):"; grep -E "^\| B=" "$OUT/base_bench/bench_op.md" | head -3
      fi ;;
    jla|fla)
      peer=$stage; [ "$stage" = jla ] && peer=jla:mosaic_gpu
      limit=70; [ "$stage" = fla ] && limit=260
      (cd .whl && CFGS='[[4,4096,8,128]]' NH='[1,2,3]' GATES='[false]' OUT="$OUT" \
        timeout $limit python3 bench_peers.py "$peer") > "$OUT/peer_$stage.log" 2>&1
      grep -E '^(\{"peer"|ERR)' "$OUT/peer_$stage.log" || tail -5 "$OUT/peer_$stage.log" ;;
    variants)
      # shellcheck disable=SC2086
      timeout "${VARIANTS_TIMEOUT:-240}" python3 experiments/bench_op.py --only ${VARIANT_ONLY:-0 1 2} --no-chunked \
        --repeats 5 ${BWD_VARIANTS:---bwd-variant grad_dtype=float32} --out "$OUT/variants" \
        > "$OUT/variants.stdout" 2>&1
      sed -n '/^| case | impl/,/^$/p' "$OUT/variants/bench_op.md" ;;
    shapes)
      timeout 240 python3 experiments/bench_op.py --only 4 6 7 --stages --bwd-stages \
        --no-chunked --repeats 5 --out "$OUT/shapes" > "$OUT/shapes.stdout" 2>&1
      tail -30 "$OUT/shapes/bench_op.md"
      timeout 150 python3 experiments/bench_op.py --case 2048,129,8,32,32,1 \
        --case 2048,129,8,32,32,2 --case 2048,129,8,32,32,4 --stages --bwd-stages --repeats 5 \
        --out "$OUT/st_shape" > "$OUT/st_shape.stdout" 2>&1
      tail -30 "$OUT/st_shape/bench_op.md" ;;
    conv)
      # shellcheck disable=SC2086
      timeout 150 python3 experiments/bench_conv.py ${CONV_CASES:-} --out "$OUT/conv" \
        > "$OUT/conv.stdout" 2>&1
      tail -30 "$OUT/conv/bench_conv.md" ;;
    tune)
      # shellcheck disable=SC2086
      timeout 240 python3 experiments/bench_op.py --case ${TUNE_CASE:-4,4096,8,128,128,2} --tune \
        --bwd-tune --tune-stages ${TUNE_STAGES:-state_pass bwd_state_pass} --no-chunked \
        --repeats 5 --out "$OUT/tune" > "$OUT/tune.stdout" 2>&1
      grep -E "^\| .*state_pass" "$OUT/tune/bench_op.md" | head -30 ;;
    gemm)
      # shellcheck disable=SC2086
      timeout 200 python3 experiments/bench_gemm.py ${GEMM_CASES:---case 32768,1024,2816 --case \
        32768,1468,4096 --case 32768,1472,4096 --case 32768,1536,4096 --case 32768,1468,1536} \
        --out "$OUT/gemm" 2>&1 | grep -v "^WARNING" ;;
    split)
      for case in ${SPLIT_CASES:-1,32768,8,128,128,2 4,4096,8,128,128,2}; do
        timeout 200 python3 experiments/bench_op.py --case $case --tune --bwd-tune --no-chunked \
          --repeats 5 --out "$OUT/split_${case//,/_}" > "$OUT/split_${case//,/_}.stdout" 2>&1
        tail -12 "$OUT/split_${case//,/_}/bench_op.md"
      done ;;
    ncu)
      ncu_bin=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu \
        2>/dev/null | head -1)
      if [ -z "$ncu_bin" ]; then echo "ncu: Nsight Compute not found on this machine"; continue; fi
      timeout 300 "$ncu_bin" --clock-control none -k regex:dp_ --section SpeedOfLight \
        --section WarpStateStats --section SourceCounters --section LaunchStats \
        --section Occupancy --section MemoryWorkloadAnalysis -f -o /tmp/ncu_op \
        python3 experiments/ncu_kernels.py run --case "${NCU_CASE:-4,4096,8,128,128,2}" \
        ${NCU_GATED:+--gated} ${NCU_BWD:+--bwd-variant "$NCU_BWD"} > "$OUT/ncu_run.txt" 2>&1
      tail -4 "$OUT/ncu_run.txt"
      "$ncu_bin" -i /tmp/ncu_op.ncu-rep --page details > "$OUT/ncu_details.txt" 2>&1
      "$ncu_bin" -i /tmp/ncu_op.ncu-rep --page source --print-source sass --csv 2>&1 \
        | gzip > "$OUT/ncu_source.csv.gz"
      python3 experiments/ncu_kernels.py summarize "$OUT/ncu_details.txt" \
        "$OUT/ncu_source.csv.gz" --out "$OUT" ;;
    lm|lm_remat)
      runs=("dn block" "dp2 block" "dp3 block")
      [ "$stage" = lm_remat ] && runs=("dp2 none" "dp2 block_save_dots")
      [ -n "${LM_RUNS:-}" ] && IFS=';' read -ra runs <<< "$LM_RUNS"
      for run in "${runs[@]}"; do
        read -r p remat conv conv_fwd gemm norm <<< "$run"
        conv=${conv:-auto}
        conv_fwd=${conv_fwd:-auto}
        gemm=${gemm:-auto}
        norm=${norm:-xla}
        preset=$p
        [[ $p == *-* ]] || preset=$p-392m
        name="lm_${p}_${remat}_${conv}_${conv_fwd}_${gemm}_$norm"
        profile() {  # $1: output folder (absolute); run from the current directory's code
          timeout "${LM_TIMEOUT:-170}" python3 experiments/profile_step.py --preset "$preset" \
            --batch_size 8 --k 4095 --eval_length 0 --steps 5 --repeats 3 --remat "$remat" \
            --conv_backward "$conv" --conv_forward "$conv_fwd" --gemm "$gemm" \
            --norm_impl "$norm" --impl auto --top 30 --out "$1" 2>&1 | grep -v "^WARNING"
        }
        profile "$OUT/$name" | tail -66
        # the device tool returns at most 8 files: LM_HLO=0 keeps only profile_step.json
        [ "${LM_HLO:-1}" = 0 ] && rm -f "$OUT/$name/train_step.hlo.txt.gz"
        if [ "${BASE:-0}" = 1 ]; then  # the same run from the snapshot of scripts/snapshot_base.sh
          (cd .base && PYTHONPATH=. profile "$OUT/base_$name" | grep -E "step|MFU|dp_" | head -20)
          rm -rf "$OUT/base_$name/trace" "$OUT/base_$name/train_step.hlo.txt.gz"
        fi
      done ;;
    multi)
      python3 experiments/language_model.py prepare --corpus stdlib \
        --tokenizer .gpu_data/bpe32k.json --seq_len 4096 --out /tmp/lm4096 --quiet True
      gpus=$(nvidia-smi -L | wc -l)
      for run in "$gpus 1" "$gpus $gpus" "1 1"; do
        read -r n fsdp <<< "$run"
        name=multi_${n}gpu_fsdp$fsdp
        CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) NCCL_NVLS_ENABLE=0 timeout 150 \
          python3 experiments/language_model.py train --preset dp2-392m --data /tmp/lm4096 \
          --steps 16 --batch_size $((8 * n)) --fsdp "$fsdp" --remat block --log_every 2 \
          --eval_every 1000 --eval_rows 8 --progress False --tensorboard False \
          --out_dir "/tmp/$name" 2>&1 | grep -v "^WARNING" | tail -4
        mkdir -p "$OUT/$name"
        cp /tmp/"$name"/*.json* "$OUT/$name/" 2>/dev/null
        rm -rf "/tmp/$name"
      done ;;
    *) echo "unknown stage $stage (tests, bench, jla, fla, shapes, variants, conv, gemm, tune, split,"\
         "lm, lm_remat, multi)"; exit 2 ;;
  esac
done
