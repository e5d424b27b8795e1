#!/usr/bin/env bash
# One GPU check; every stage runs under `timeout`, so on one H100 it ends within ~6 minutes whatever happens
# (estimate: (a) 10 s, (b) 150 s, (c) 40 s, (d) 3 x 50 s; with bench/gpu_real_table.sh's <= 5.5 min: <= 12 min):
#   (a) CUDA present, else exit 2 with one line
#   (b) a bf16 step of random-init GPT-2 XL -> GPT-2 shapes, KD and MGSR: the ratio
#       (bench/step_cost.py --device cuda; compare with bench/cost_model.py's prediction), also with the
#       rollouts made 8 batches ahead (mgsr_k8_n1: on a CPU it saves ~7%, the cost model predicts 8.2x -> 3.1x)
#   (c) generation throughput on cuda (bench/generation.py --device cuda)
#   (d) kill/resume on CUDA: a tiny trainer=gpu run killed after its first checkpoint and resumed with
#       ckpt_path=last ends with the same results.json scores as an uninterrupted run
#   (e) a summary table, and $OUT/gpu_check.json (bench/results/gpu_check.json without $OUT)
#     bash bench/gpu_check.sh            # from the repository root
#     bash bench/gpu_check.sh --dry-run  # CPU, tiny shapes, bf16 autocast: every stage's code path (CI runs it);
#                                        # writes bench/results/gpu_check_dryrun.json (~2 min on 2 cores)
set -u
cd "$(dirname "$0")/.." || exit 1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1 WANDB_MODE=offline CUBLAS_WORKSPACE_CONFIG=:4096:8
PY=${PYTHON:-python}
DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "gpu_check: unknown argument ${1} (use --dry-run or nothing)" >&2; exit 2 ;;
esac

if [ $DRY -eq 1 ]; then
    # the same stages on CPU: tiny shapes, bf16 where the GPU run uses it, the CPU trainer; longer limits (2 cores)
    DEVICE=cpu SHAPES=tiny NAME=gpu_check_dryrun T=3
    TRAINER=(trainer=cpu trainer.precision=bf16-mixed)
    GEN=(--prompts 8 --batch-size 8 --max-new-tokens 16 --rounds 1 --threads 1)
    # one method per code path (KD; MGSR; MGSR with rollouts made ahead), not every setting: CI time
    STEP=(--threads 1 --regen-lengths 16 --regen-reps 1 --methods kd mgsr mgsr_k8_n1)
else
    if ! timeout 30 "$PY" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
        echo "gpu_check: no CUDA device (torch.cuda.is_available() is false): nothing to check here" >&2
        exit 2
    fi
    DEVICE=cuda SHAPES=gpt2_xl_to_gpt2 NAME=gpu_check T=1
    TRAINER=(trainer=gpu)
    GEN=(--rounds 2 --threads 4)
    STEP=(--threads 4 --methods kd mgsr_rounds0 mgsr mgsr_every4 mgsr_k8_n1)
fi

DEST=${OUT:-bench/results}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
CACHE="$WORK/cache"
mkdir -p "$DEST" "$CACHE"
status_b=skipped status_c=skipped status_d=skipped
stage() { echo; echo "== $1 ($(date +%T))"; }

stage "(b) bf16 step, $SHAPES shapes (random init) on $DEVICE: KD vs MGSR"
timeout $((150 * T)) "$PY" bench/step_cost.py --device $DEVICE --model $SHAPES --random-init --dtype bfloat16 \
    --rounds 1 --steps 4 "${STEP[@]}" --cache-dir "$CACHE" \
    --out "$WORK/step_cost.json"
status_b=$?

stage "(c) generation throughput on $DEVICE"
timeout $((40 * T)) "$PY" bench/generation.py --device $DEVICE "${GEN[@]}" --cache-dir "$CACHE" \
    --out "$WORK/generation.json"
status_c=$?

stage "(d) kill/resume on $DEVICE (tiny ${TRAINER[*]} run)"
RUN=("${TRAINER[@]}" data.n_train=64 data.n_val=8 data.n_test=8 model.teacher_sft.max_steps=20
     model.teacher_sft.n_train=128 model.student_init.max_steps=5 trainer.max_steps=8 trainer.val_check_interval=3
     trainer.limit_val_batches=1 val_generate=4 "eval.seeds=[10]" eval.limit=4 eval.max_new_tokens=16
     scrg.sampling.max_new_tokens=16 logger=csv trainer.enable_progress_bar=false checkpoint.every_n_train_steps=2
     trainer.log_every_n_steps=1 scrg.every_n_steps=2 trainer.deterministic=true eval.exposure_bias=false
     "cache_dir=$CACHE")
timeout $((50 * T)) "$PY" train.py "${RUN[@]}" "hydra.run.dir=$WORK/straight" >"$WORK/straight.log" 2>&1
rc_straight=$?
rc_killed=1 rc_resume=1
if [ $rc_straight -eq 0 ]; then
    # Killed from Python, polling every millisecond: a tiny run's steps take tens of ms, and a shell loop of
    # `sleep 0.05` let it run on to its last checkpoint (the resume then had nothing to do). The checkpoint's step
    # must be below max_steps for the kill to count.
    timeout $((50 * T)) "$PY" - "$WORK/killed" "$WORK/killed.log" "$PY" train.py "${RUN[@]}" "hydra.run.dir=$WORK/killed" <<'KILL'
import os, signal, subprocess, sys, time
from pathlib import Path
run, log, cmd = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
ckpt = run / "checkpoints" / "last.ckpt"
with open(log, "w") as out:
    proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.001)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
import torch
step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] if ckpt.exists() else None
print(f"killed after the checkpoint of step {step}")
sys.exit(0 if step is not None and step < 8 and not (run / "results.json").exists() else 1)
KILL
    rc_killed=$?
    timeout $((50 * T)) "$PY" train.py "${RUN[@]}" "hydra.run.dir=$WORK/killed" ckpt_path=last >"$WORK/resume.log" 2>&1
    rc_resume=$?
fi
status_d="straight=$rc_straight killed_after_ckpt=$rc_killed resume=$rc_resume"

stage "(e) summary"
timeout 30 "$PY" - "$WORK" "$DEST/$NAME.json" "$status_b" "$status_c" "$status_d" "$DEVICE" <<'EOF'
import json, sys
from pathlib import Path
work, dest, rc_b, rc_c, st_d, device = Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:]
def load(p):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return None
out = {"work_dir": str(work), "device": device, "step_cost": {"rc": int(rc_b)}, "generation": {"rc": int(rc_c)}, "resume": {"status": st_d}}
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
steps = out["step_cost"].get("steps", {})
gen = out["generation"].get("rows", [])
r = out["resume"]
print(f"gpu_check on {device}")
print("| stage | rc | result |\n| --- | --- | --- |")
print(f"| (b) bf16 step, x KD | {rc_b} | " + ", ".join(f"{m} {v['x_kd']:.2f}x ({v['step_s'] * 1e3:.0f} ms)"
                                                  for m, v in steps.items()) + " |")
print(f"| (c) generation, tok/s | {rc_c} | " + ", ".join(f"{g['model']} / {g['generator']}: {g['tokens_per_s']:.0f}"
                                                      for g in gen) + " |")
print(f"| (d) kill/resume | {st_d} | scores equal: {r.get('scores_equal')}, val equal: {r.get('val_equal')}, "
      f"restored: {r.get('restored_from_checkpoint')} |")
print(f"wrote {dest}")
EOF
echo "logs: $WORK"
case "$status_b$status_c" in 00) ;; *) exit 1 ;; esac
[ "$status_d" = "straight=0 killed_after_ckpt=0 resume=0" ] || exit 1
"$PY" -c "import json, sys; r = json.load(open(sys.argv[1]))['resume']; sys.exit(0 if r.get('scores_equal') and \
r.get('val_equal') and r.get('restored_from_checkpoint') else 1)" "$DEST/$NAME.json" || exit 1
