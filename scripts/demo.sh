#!/usr/bin/env bash
# The VPT demo, end to end on a CPU, no GPU and no downloads: a fine-detail task (read the fine pattern on the one
# coloured square of a board; round 1's global view is too coarse to show it) -> a tiny VPT model -> projector
# alignment -> VPT instruction tuning, and the same tiny model trained to answer directly (the baseline), all with
# `llamafactory-cli train` -> evaluation: VPT in two rounds, the baseline in one, VPT with the ground-truth region
# (the oracle) -> report (table, examples picture, loss and score plots). About 8 minutes on 2 cores, plus the install.
#
#   bash scripts/demo.sh [--quick] [--base BASE] [--seed N] [--out-dir DIR] [--no-install]
#
#   --quick        smallest size (a smoke run in about a minute; the models learn nothing at this size)
#   --base BASE    the base of the tiny VPT model: qwen2_vl (Qwen2-VL, the default), qwen2_5_vl (Qwen2.5-VL) or
#                  qwen3_vl (Qwen3-VL); the bases are those of transformers_vpt.models.bases, the template is the
#                  base's (its no-think variant where it has one: vpt_qwen3_vl_nothink, as the demo answers without
#                  a thinking block); the baseline trains the stock tiny base with the stock template
#   --seed N       seed of the data, the random tiny models and the training runs (default: 0)
#   --out-dir DIR  where everything goes (default: outputs/demo); its demo subfolders are replaced
#   --no-install   use the existing .venv as it is
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=outputs/demo
BASE=qwen2_vl
SEED=0
QUICK=0
INSTALL=1
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out-dir) OUT=${2:?--out-dir needs a value}; shift ;;
    --base) BASE=${2:?--base needs a value}; shift ;;
    --seed) SEED=${2:?--seed needs a value}; shift
            [[ "$SEED" =~ ^[0-9]+$ ]] || { echo "demo.sh: --seed needs a non-negative integer, got $SEED" >&2; exit 2; } ;;
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
  DATA=(--train-size 2000 --test-size 200 --alignment-size 320)
  ALIGN_STEPS=20 TRAIN_STEPS=1000 TRAIN_ARGS=()
fi
# The task (transformers_vpt.tiny.synthetic, task "detail"): 448 px boards of 8x8 cells, given to round 1 at 224 px
# (image_resolution / max_image_side of the configs), where the one-pixel lines of the target's pattern vanish; the
# crop of a region selection, cut from the 448 px original (168 px: the target's cell and a cell of margin), shows
# them. Most training records select a region: that is the skill the demo shows; re-encoding and plain records keep
# the other paths trained.
DATA+=(--task detail --image-size 448 --distractors 3 --region-ratio 0.7 --reencode-ratio 0.2 --plain-ratio 0.1)
TRAIN_ARGS+=(seed="$SEED")
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
print(base.label, template, base.templates[template], base.label.lower())' "$BASE") || exit 2
read -r LABEL TEMPLATE STOCK_TEMPLATE SOURCE <<< "$BASE_INFO"
rm -rf "$OUT"/{data,sources,vpt-init,runs,evaluation,evaluation-oracle}
mkdir -p "$OUT"

step "Synthetic data: what pattern is on the one coloured square of the board (too fine for the global view)?"
python scripts/make_synthetic_data.py --out-dir "$OUT/data" --seed "$SEED" "${DATA[@]}"

step "Tiny $LABEL VPT model from random tiny $LABEL, DINOv2 and SAM (configs/tiny/make_tiny.py)"
# rope_theta 10: with the tiny head size (16), M-RoPE's default 10000 leaves the width section's frequencies so low
# that image columns are indistinguishable, and the tiny model cannot learn where (in x) the target is.
python configs/tiny/make_tiny.py --out-dir "$OUT" --no-data --base "$BASE" --seed "$SEED" --text-config rope_theta=10

step "Stage 1: projector alignment (llamafactory-cli train configs/demo/alignment.yaml, template $TEMPLATE)"
llamafactory-cli train configs/demo/alignment.yaml \
  model_name_or_path="$OUT/vpt-init" dataset_dir="$OUT/data" output_dir="$OUT/runs/alignment" max_steps=$ALIGN_STEPS \
  template="$TEMPLATE" "${TRAIN_ARGS[@]}"

step "Stage 2: VPT instruction tuning (llamafactory-cli train configs/demo/instruction.yaml, template $TEMPLATE)"
llamafactory-cli train configs/demo/instruction.yaml \
  model_name_or_path="$OUT/runs/alignment" dataset_dir="$OUT/data" output_dir="$OUT/runs/instruction" \
  max_steps=$TRAIN_STEPS template="$TEMPLATE" "${TRAIN_ARGS[@]}"

step "Baseline: the same tiny $LABEL answering directly (llamafactory-cli train configs/demo/baseline.yaml, template $STOCK_TEMPLATE)"
llamafactory-cli train configs/demo/baseline.yaml \
  model_name_or_path="$OUT/sources/$SOURCE" dataset_dir="$OUT/data" output_dir="$OUT/runs/baseline" \
  max_steps=$TRAIN_STEPS template="$STOCK_TEMPLATE" "${TRAIN_ARGS[@]}"

step "Evaluation: VPT in two rounds, the baseline in one (evaluation/evaluation.py)"
python evaluation/evaluation.py --config configs/demo/evaluation.yaml \
  --model vpt="$OUT/runs/instruction" baseline="$OUT/runs/baseline" --data-dir "$OUT/data" \
  --region-meta "$OUT/data/synthetic_meta.json" --output-dir "$OUT/evaluation"

step "Oracle: VPT's round 2 on the ground-truth region and action (evaluation/evaluation.py --oracle)"
python evaluation/evaluation.py --config configs/demo/evaluation.yaml --oracle \
  --model vpt="$OUT/runs/instruction" --data-dir "$OUT/data" --datasets synthetic_region_test synthetic_action_test \
  --region-meta "$OUT/data/synthetic_meta.json" --output-dir "$OUT/evaluation-oracle"

step "Report"
python scripts/demo_report.py --demo-dir "$OUT" --duration-s "$SECONDS"
echo "Demo finished in $((SECONDS / 60)) min $((SECONDS % 60)) s."
