#!/usr/bin/env bash
# The VPT demo, end to end on a CPU, no GPU and no downloads: synthetic data -> a tiny VPT model -> projector
# alignment -> VPT instruction tuning (both with `llamafactory-cli train`) -> two-round evaluation of the untrained
# and the trained model -> report (table, loss plot, bar chart). About 5 minutes on 2 cores, plus the install.
#
#   bash scripts/demo.sh [--quick] [--base BASE] [--out-dir DIR] [--no-install]
#
#   --quick        smallest size (a smoke run in a minute or two; the model learns nothing at this size)
#   --base BASE    the base of the tiny VPT model: qwen2_vl (Qwen2-VL, the default), qwen2_5_vl (Qwen2.5-VL) or
#                  qwen3_vl (Qwen3-VL); the bases are those of transformers_vpt.models.bases, the template is the
#                  base's (its no-think variant where it has one: vpt_qwen3_vl_nothink, as the demo answers without
#                  a thinking block)
#   --out-dir DIR  where everything goes (default: outputs/demo); its demo subfolders are replaced
#   --no-install   use the existing .venv as it is
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=outputs/demo
BASE=qwen2_vl
QUICK=0
INSTALL=1
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out-dir) OUT=${2:?--out-dir needs a value}; shift ;;
    --base) BASE=${2:?--base needs a value}; shift ;;
    --no-install) INSTALL=0 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$QUICK" = 1 ]; then
  DATA=(--train-size 24 --test-size 4 --alignment-size 8)
  ALIGN_STEPS=2 TRAIN_STEPS=3 TRAIN_ARGS=(logging_steps=1)
else
  DATA=(--train-size 3000 --test-size 200 --alignment-size 320)
  ALIGN_STEPS=20 TRAIN_STEPS=1000 TRAIN_ARGS=()
fi

step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
SECONDS=0
[ "$INSTALL" = 1 ] && { step "Installing (scripts/install.sh)"; bash scripts/install.sh train,eval; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PATH="$PWD/.venv/bin:$PATH" PYTHONWARNINGS=ignore DISABLE_VERSION_CHECK=1
# The base's label and LLaMA-Factory template, from the one list of bases (an unknown --base stops here). A base
# with a no-think template (Qwen3-VL) trains with it: the evaluation prompts without a thinking block, and the
# reasoning template would teach the model to open every answer with an empty <think></think>.
BASE_INFO=$(python -c '
import sys
from transformers_vpt.models.bases import VPT_BASES
base = VPT_BASES.get(sys.argv[1])
names = ", ".join(VPT_BASES)
if base is None:
    sys.exit(f"demo.sh: unknown --base {sys.argv[1]!r}; choose from {names}")
template = next((name for name in base.templates if name.endswith("_nothink")), base.template)
print(base.label, template)' "$BASE") || exit 2
read -r LABEL TEMPLATE <<< "$BASE_INFO"
rm -rf "$OUT"/{data,sources,vpt-init,runs,evaluation}
mkdir -p "$OUT"

step "Synthetic data: what colour is the one coloured shape among gray ones (a small part of the image)?"
python scripts/make_synthetic_data.py --out-dir "$OUT/data" "${DATA[@]}" --image-size 112 --distractors 2 --object-size 3 --questions color

step "Tiny $LABEL VPT model from random tiny $LABEL, DINOv2 and SAM (scripts/prepare_weights.py)"
python configs/tiny/make_tiny.py --out-dir "$OUT" --no-data --base "$BASE"

step "Stage 1: projector alignment (llamafactory-cli train configs/demo/alignment.yaml, template $TEMPLATE)"
llamafactory-cli train configs/demo/alignment.yaml \
  model_name_or_path="$OUT/vpt-init" dataset_dir="$OUT/data" output_dir="$OUT/runs/alignment" max_steps=$ALIGN_STEPS \
  template="$TEMPLATE" "${TRAIN_ARGS[@]}"

step "Stage 2: VPT instruction tuning (llamafactory-cli train configs/demo/instruction.yaml, template $TEMPLATE)"
llamafactory-cli train configs/demo/instruction.yaml \
  model_name_or_path="$OUT/runs/alignment" dataset_dir="$OUT/data" output_dir="$OUT/runs/instruction" \
  max_steps=$TRAIN_STEPS template="$TEMPLATE" "${TRAIN_ARGS[@]}"

step "Two-round evaluation before and after training (evaluation/evaluation.py)"
python evaluation/evaluation.py --config configs/demo/evaluation.yaml \
  --model before="$OUT/vpt-init" after="$OUT/runs/instruction" --data-dir "$OUT/data" \
  --region-meta "$OUT/data/synthetic_meta.json" --output-dir "$OUT/evaluation"

step "Report"
python scripts/demo_report.py --demo-dir "$OUT"
echo "Demo finished in $((SECONDS / 60)) min $((SECONDS % 60)) s."
