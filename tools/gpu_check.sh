#!/usr/bin/env bash
# The prepared GPU check: about 8 minutes on one GPU, nothing downloaded (networks from their real configurations with
# random weights). It needs the project's requirements and one CUDA GPU. Each section is one command in its own process
# with a time limit, most important first; their output goes to OUT/sections.log, the numbers to OUT/gpu_check.json
# and the table of docs/performance.md to OUT/gpu_check.md.
#   bash tools/gpu_check.sh [OUT]                        # OUT: the argument, else $OUT, else gpu_check/
#   SECTIONS="sdxl cifar10" bash tools/gpu_check.sh out/  # some sections (BUDGET=seconds: another time budget)
#   SMOKE=1 bash tools/gpu_check.sh out/                 # the same commands, tiny networks, on the CPU (a test)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check}}
nets=${TMPDIR:-/tmp}/dmd2_gpu_check${SMOKE:+_smoke}  # pickles, tiny pipelines and each section's JSON (not in OUT)
mkdir -p "$out" "$nets" && rm -f "$nets"/*.json "$out/sections.log"
export PYTHONPATH=.:tests${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
budget=${BUDGET:-480} sections=${SECTIONS:-matmul adm sdxl sd35m cifar10 adm_compiled adm_batch80}

if [ -n "${SMOKE:-}" ]; then  # tiny stand-ins: EDM's test configurations, the tests' tiny pipelines
  cpu=(--device cpu) adm=(--channels 8 --batch 2) t2i=(--resolution 32 --lora-rank 4 --device cpu) n=256
  python3 -c "from tiny_pipelines import *; tiny_sdxl('$nets/sdxl'); tiny_sd3('$nets/sd35m')"
  python3 -c "from edm_pickles import *; edm_pickle('$nets/adm.pkl', *EDM_CONFIGS['adm'][0:1], 10, 16, 3,
    **EDM_CONFIGS['adm'][1]); edm_pickle('$nets/cifar10.pkl', 'SongUNet', 10, 16, 3, **EDM_CONFIGS['ddpmpp'][1])"
else  # EDM's ImageNet-64 ADM (296M) and CIFAR-10 DDPM++ (55.7M with its augmentation input), pickled in EDM's format
  cpu=() adm=() t2i=(--resolution 1024) n=8192
  python3 -c "from edm_pickles import edm_pickle; edm_pickle('$nets/adm.pkl', 'DhariwalUNet', 1000, 64, 3);
edm_pickle('$nets/cifar10.pkl', 'SongUNet', 10, 32, 3, model_channels=128, channel_mult=[2, 2, 2], augment_dim=9,
    embedding_type='positional', encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
    resample_filter=[1, 1])"
fi
model() { [ -n "${SMOKE:-}" ] && echo "--model $nets/$1" || echo "--arch $1"; }

declare -A limit=([matmul]=40 [adm]=150 [sdxl]=120 [sd35m]=130 [cifar10]=90 [adm_compiled]=240 [adm_batch80]=100)
declare -A command=(
  [matmul]="python3 -c 'import torch, time, json
d = \"cuda\" if torch.cuda.is_available() else \"cpu\"; a, b = (torch.randn($n, $n, device=d,
    dtype=torch.bfloat16 if d == \"cuda\" else torch.float32) for _ in range(2)); ts = []
for _ in range(13):
    torch.cuda.synchronize() if d == \"cuda\" else None; t = time.perf_counter(); a @ b
    torch.cuda.synchronize() if d == \"cuda\" else None; ts.append(time.perf_counter() - t)
print(json.dumps({\"n\": $n, \"tflop_per_s\": round(2 * $n ** 3 / sorted(ts[3:])[5] / 1e12, 1)}))'"
  [adm]="python3 train_imagenet.py --benchmark --teacher $nets/adm.pkl ${cpu[*]} ${adm[*]}"
  [sdxl]="python3 train_t2i.py --benchmark $(model sdxl) --preset sdxl-4step-lora --mode shared-lora --batch 1 ${t2i[*]}"
  [sd35m]="python3 train_t2i.py --benchmark $(model sd35m) --preset sd35m-4step --mode shared-lora --batch 1 ${t2i[*]}"
  [cifar10]="python3 train_imagenet.py --benchmark --teacher $nets/cifar10.pkl --batch 64 ${cpu[*]} ${adm[*]}"
  [adm_compiled]="python3 train_imagenet.py --benchmark --compile ${cpu[*]} ${adm[*]}"  # our ADMUNet: no pickle
  [adm_batch80]="python3 train_imagenet.py --benchmark --teacher $nets/adm.pkl --batch 80 ${cpu[*]} ${adm[*]}"
)
for name in $sections; do
  left=$((budget - SECONDS))
  if (( left < 20 )); then echo "$name: skipped, the time budget is spent"; continue; fi
  echo "==== $name: ${command[$name]}" >> "$out/sections.log"
  timeout $(( limit[$name] < left ? limit[$name] : left )) bash -c "${command[$name]}" > "$nets/$name.json" \
    2>> "$out/sections.log"
  echo "$name: exit $? at $SECONDS s"
done
python3 -c "from support.benchmark import gpu_table; print(gpu_table('$nets', '$out'))"
