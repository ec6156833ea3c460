#!/usr/bin/env bash
# One prepared check for a lent GPU machine (one H100/H200, no network needed once installed):
# a random-weight open_clip ViT-B/16 teacher -> the w768-l4-h24 image student, stage-1 image
# distillation with every intermediate term, then stage 2 at a global batch of 4,096 through
# feature-cache accumulation, both bf16 ZeRO-2 on synthetic images. Prints samples/s, peak GPU
# memory and MFU per stage as markdown rows and JSON lines for bench/RESULTS.md (also written to
# OUT/results.md). About 2-3 minutes on an H100 after installation; see bench/gpu_check.py.
#
#   bash bench/gpu_check.sh [--tiny] [--out DIR] [--set KEY=VALUE ...] [--peak-tflops X]
#
#   --tiny         the same code path on the CPU in seconds (tiny shapes, DS_ACCELERATOR=cpu);
#                  GPU-only figures are reported as n/a. The test suite runs it.
#   --out DIR      where the teacher, data, runs and results go (default runs/gpu_check[_tiny])
#   --set K=V      a recipe override for both stages (e.g. train.micro_batch=128 on a smaller card)
#   --peak-tflops  the card's peak dense bf16 TFLOP/s when its name is not in the table
#
# PYTHON names the interpreter (default python3). When it cannot import tinyclip_ds, DeepSpeed
# and open_clip, the script makes a virtual environment in runs/gpu_check_venv that sees the
# interpreter's own packages (a GPU machine's CUDA torch is reused, not downloaded again) and
# installs the project there as the README does. Any failing step stops the script non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

tiny=0
out=""
sets=()
peak=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tiny) tiny=1; shift ;;
        --out) out="$2"; shift 2 ;;
        --set) sets+=(--set "$2"); shift 2 ;;
        --peak-tflops) peak=(--peak-tflops "$2"); shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
out="${out:-runs/gpu_check$([[ $tiny == 1 ]] && echo _tiny || true)}"

python="${PYTHON:-python3}"
if ! "$python" -c "import tinyclip_ds, deepspeed, open_clip" 2>/dev/null; then
    venv=runs/gpu_check_venv
    echo "gpu_check: $python cannot import tinyclip_ds; installing it into $venv"
    "$python" -m venv --system-site-packages "$venv"
    # A venv made from a venv sees only the base interpreter's packages: add the outer one's too
    # (a GPU machine's CUDA torch often lives in such a venv).
    purelib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$python" -c 'import site; print("\n".join(site.getsitepackages()))' > "$purelib/gpu_check_outer.pth"
    # The README's install: torch first (skipped where the machine's own CUDA torch is seen), then us.
    "$venv/bin/python" -c "import torch, torchvision" 2>/dev/null || "$venv/bin/python" -m pip install torch torchvision
    "$venv/bin/python" -m pip install -e .
    python="$venv/bin/python"
fi

prepare=(prepare --out "$out")
if [[ $tiny == 1 ]]; then
    prepare+=(--tiny)
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
    "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else \
'gpu_check: torch ' + torch.__version__ + ' sees no CUDA device; use --tiny on a CPU')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

start=$SECONDS
"$python" bench/gpu_check.py "${prepare[@]}"
"$python" bench/gpu_check.py stage stage1_image --out "$out" ${sets[@]+"${sets[@]}"}
"$python" bench/gpu_check.py stage stage2 --out "$out" ${sets[@]+"${sets[@]}"}
echo
"$python" bench/gpu_check.py report --out "$out" ${peak[@]+"${peak[@]}"}
echo "gpu_check: done in $((SECONDS - start)) s; paste the table rows and JSON lines above into bench/RESULTS.md"
