#!/usr/bin/env bash
# One GPU check, <= 8 minutes on one GPU (every stage under `timeout`):
#   (a) CUDA present, else exit 2 with one line                                      <= 30 s
#   (b) a bf16 step of random-init GPT-2 XL -> GPT-2 shapes, KD and MGSR: the ratio   <= 200 s
#       (bench/step_cost.py --device cuda; compare with bench/cost_model.py's prediction), also with the
#       rollouts made 8 batches ahead (mgsr_k8_n1: on a CPU it saves ~7%, the cost model predicts 8.2x -> 3.1x)
#   (c) generation throughput on cuda (bench/generation.py --device cuda)            <= 60 s
#   (d) kill/resume on CUDA: a tiny trainer=gpu run killed after its first checkpoint and resumed with
#       ckpt_path=last ends with the same results.json scores as an uninterrupted run  <= 80 + 60 + 80 s
#   (e) a summary, and $OUT/gpu_check.json (bench/results/gpu_check.json without $OUT)
#     bash bench/gpu_check.sh            # from the repository root
set -u
cd "$(dirname "$0")/.." || exit 1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1 WANDB_MODE=offline CUBLAS_WORKSPACE_CONFIG=:4096:8
PY=${PYTHON:-python}

if ! timeout 30 "$PY" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is false): nothing to check here" >&2
    exit 2
fi

DEST=${OUT:-bench/results}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
CACHE="$WORK/cache"
mkdir -p "$DEST" "$CACHE"
status_b=skipped status_c=skipped status_d=skipped
stage() { echo; echo "== $1 ($(date +%T))"; }

stage "(b) bf16 step, GPT-2 XL -> GPT-2 shapes (random init): KD vs MGSR"
timeout 200 "$PY" bench/step_cost.py --device cuda --model gpt2_xl_to_gpt2 --random-init --dtype bfloat16 \
    --methods kd mgsr_rounds0 mgsr mgsr_every4 mgsr_k8_n1 --rounds 1 --steps 4 --threads 4 --cache-dir "$CACHE" \
    --out "$WORK/step_cost.json"
status_b=$?

stage "(c) generation throughput on cuda"
timeout 60 "$PY" bench/generation.py --device cuda --rounds 2 --threads 4 --cache-dir "$CACHE" \
    --out "$WORK/generation.json"
status_c=$?

stage "(d) kill/resume on CUDA (tiny trainer=gpu run)"
RUN=(trainer=gpu data.n_train=64 data.n_val=8 data.n_test=8 model.teacher_sft.max_steps=20
     model.teacher_sft.n_train=128 model.student_init.max_steps=5 trainer.max_steps=8 trainer.val_check_interval=3
     trainer.limit_val_batches=1 val_generate=4 "eval.seeds=[10]" eval.limit=4 eval.max_new_tokens=16
     scrg.sampling.max_new_tokens=16 logger=csv trainer.enable_progress_bar=false checkpoint.every_n_train_steps=2
     trainer.log_every_n_steps=1 scrg.every_n_steps=2 trainer.deterministic=true eval.exposure_bias=false
     "cache_dir=$CACHE")
timeout 80 "$PY" train.py "${RUN[@]}" "hydra.run.dir=$WORK/straight" >"$WORK/straight.log" 2>&1
rc_straight=$?
rc_killed=1 rc_resume=1
if [ $rc_straight -eq 0 ]; then
    timeout 60 "$PY" train.py "${RUN[@]}" "hydra.run.dir=$WORK/killed" >"$WORK/killed.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 1200); do  # up to 60 s: kill as soon as the first checkpoint exists
        [ -f "$WORK/killed/checkpoints/last.ckpt" ] && break
        kill -0 $pid 2>/dev/null || break
        sleep 0.05
    done
    kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
    if [ -f "$WORK/killed/checkpoints/last.ckpt" ] && [ ! -f "$WORK/killed/results.json" ]; then rc_killed=0; fi
    timeout 80 "$PY" train.py "${RUN[@]}" "hydra.run.dir=$WORK/killed" ckpt_path=last >"$WORK/resume.log" 2>&1
    rc_resume=$?
fi
status_d="straight=$rc_straight killed_after_ckpt=$rc_killed resume=$rc_resume"

stage "(e) summary"
timeout 30 "$PY" - "$WORK" "$DEST/gpu_check.json" "$status_b" "$status_c" "$status_d" <<'EOF'
import json, sys
from pathlib import Path
work, dest, rc_b, rc_c, st_d = Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:]
def load(p):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return None
out = {"work_dir": str(work), "step_cost": {"rc": int(rc_b)}, "generation": {"rc": int(rc_c)}, "resume": {"status": st_d}}
sc = load(work / "step_cost.json")
if sc:
    out["step_cost"]["steps"] = {r["method"]: {"step_s": r["step_s"], "x_kd": r["x_kd"], "peak_mb": r["peak_mb"]}
                                 for r in sc["steps"]}
    out["machine"] = sc["machine"]
gen = load(work / "generation.json")
if gen:
    out["generation"]["rows"] = [{k: r[k] for k in ("model", "generator", "tokens_per_s", "x_hf")} for r in gen["rows"]]
a, b = load(work / "straight" / "results.json"), load(work / "killed" / "results.json")
if a and b:
    strip = lambda r: {s: {k: v for k, v in m.items() if k != "tokens_per_s"}
                       for s, m in r["eval"]["per_seed"]["test"].items()}
    out["resume"].update(scores_equal=strip(a) == strip(b), val_equal=a.get("val") == b.get("val"),
                         scrg_equal=a.get("scrg") == b.get("scrg"), straight=strip(a), resumed=strip(b))
    log = (work / "resume.log").read_text(errors="replace")
    out["resume"]["restored_from_checkpoint"] = "Restored all states from the checkpoint" in log
dest.parent.mkdir(parents=True, exist_ok=True)
dest.write_text(json.dumps(out, indent=2, default=str))
print(f"(b) step, GPT-2 XL -> GPT-2 shapes, bf16, rc {rc_b}:",
      ", ".join(f"{m} {v['x_kd']:.2f}x KD ({v['step_s'] * 1e3:.0f} ms)" for m, v in out["step_cost"].get("steps", {}).items()))
print(f"(c) generation, rc {rc_c}:",
      ", ".join(f"{r['model']} / {r['generator']}: {r['tokens_per_s']:.0f} tok/s" for r in out["generation"].get("rows", [])))
r = out["resume"]
print(f"(d) kill/resume: {st_d}; scores equal: {r.get('scores_equal')}, val equal: {r.get('val_equal')}, "
      f"restored: {r.get('restored_from_checkpoint')}")
print(f"wrote {dest}")
EOF
echo "logs: $WORK"
case "$status_b$status_c" in 00) ;; *) exit 1 ;; esac
[ "$status_d" = "straight=0 killed_after_ckpt=0 resume=0" ] || exit 1
