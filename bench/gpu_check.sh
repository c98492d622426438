#!/usr/bin/env bash
# mom's GPU paths, run for real on one CUDA machine, with the figures they give.
#
#   bash bench/gpu_check.sh tests    # the grouped dispatch and segment matmul on CUDA (float32 and bfloat16)
#   bash bench/gpu_check.sh bench    # bench_routed and profile_routed (bf16), heal (two rows and one step), train-routers (bf16), torchrun (NCCL)
#   bash bench/gpu_check.sh routed   # the segment-matmul kernel, bench_routed with CUDA graphs, then with torch.compile too (H=15,K=1 forward),
#                                    # and the kernels of a replayed H=15,K=1 training step
#   bash bench/gpu_check.sh          # tests and bench, in about 9 minutes on an H100/H200
#
# Run from the repository root, with bench/.cache filled by `python bench/fetch.py` (the SmolLM2
# GGUF and the Python docs). Every step has its own time limit, so one slow step cannot starve
# the others. The whole output goes to $OUT/gpu_check.log (default /tmp/mom-gpu); the important
# lines of each step are printed.
set -uo pipefail
what=${1:-all}
out=${OUT:-/tmp/mom-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
cache=bench/.cache
log=$out/gpu_check.log
work=$(mktemp -d)

step() { # step NAME SECONDS LINES CMD...: run CMD under a time limit; all of it to the log, its last LINES to stdout
    local name=$1 limit=$2 lines=$3 t0=$SECONDS rc
    shift 3
    echo "=== $name: $*" | tee -a "$log"
    timeout --kill-after 10 "$limit" "$@" >"$work/$name.txt" 2>&1
    rc=$?
    cat "$work/$name.txt" >>"$log"
    grep -v -E "━|it/s|^\s*$" "$work/$name.txt" | tail -n "$lines"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
}

step env 30 20 sh -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader;
    $py -c 'import torch, transformers; print(\"torch\", torch.__version__, \"transformers\", transformers.__version__,
    torch.cuda.get_device_name(), \"bf16\", torch.cuda.is_bf16_supported(), \"_grouped_mm\", hasattr(torch, \"_grouped_mm\"))'"

if [ "$what" = tests ] || [ "$what" = all ]; then
    step tests 130 25 "$py" -m pytest tests/test_dispatch.py tests/test_device.py -p no:cacheprovider --device cuda -rA
fi

if [ "$what" = bench ] || [ "$what" = all ]; then
    step routed 220 30 "$py" bench/bench_routed.py --device cuda --dtype bfloat16
    step profile 60 30 "$py" bench/profile_routed.py --device cuda --dtype bfloat16
    # 60-second heals (budget scale 1/30 of the CPU rows' 30 minutes) after two real surgeries
    step heal 300 30 "$py" bench/bench_heal.py --device cuda --rows prune8,peer50 --budget-scale 0.0334
    step heal_step 90 14 "$py" bench/bench_heal_step.py --device cuda
    ckpt=$cache/smollm2-135m-mom-h15k2
    train=(train-routers "$ckpt" --data "$cache/pydocs-calib.txt" --eval-data "$cache/pydocs-heldout.txt"
        --eval-tokens 16384 --distill --train all --seq-len 512 --batch-size 8 --device cuda --dtype bf16 --force)
    step train 90 12 "$py" -m mom_cli "${train[@]}" --steps 60 -o "$work/trained" --json
    step torchrun 80 12 "$py" -m torch.distributed.run --standalone --nproc-per-node 1 -m mom_cli "${train[@]}" \
        --steps 20 -o "$work/trained-ddp" --json
fi
if [ "$what" = routed ]; then
    step segment_mm 60 12 "$py" bench/bench_segment_mm.py
    step routed 280 40 "$py" bench/bench_routed.py --device cuda --dtype bfloat16 --graphs
    step compiled 130 20 "$py" bench/bench_routed.py --device cuda --dtype bfloat16 --graphs --compile \
        --parts forward --plans 15x1
    step graphed_profile 90 90 "$py" bench/profile_routed.py --device cuda --dtype bfloat16 --part train --graphs --rows 40
fi
rm -rf "$work"
