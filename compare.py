"""Compare methods over training seeds: one train.py run per (method, seed), then a report with 95% CIs.

    python compare.py                           # conf/compare/paper.yaml -> results/compare/paper/report.md
    python compare.py compare=quick             # a smoke run (2 methods x 2 seeds, a few steps)
    python compare.py compare=incremental seeds=[0,1,2,3,4]
    python compare.py report_only=true          # re-write the report from the cells that finished

Resumable: a finished cell is skipped, a killed one resumes from its last.ckpt (mgsr/compare.py).
"""

import logging
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("mgsr.compare")


@hydra.main(version_base="1.3", config_path="conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    from mgsr.compare import Spec, run_cells, write_report

    c = cfg.compare
    methods = {str(k): [str(o) for o in v] for k, v in OmegaConf.to_container(c.methods, resolve=True).items()}
    unknown = [m for m in (cfg.get("only") or []) if m not in methods]
    if unknown:
        print(f"error: only={unknown}: not in compare.methods ({', '.join(methods)})", file=sys.stderr)
        sys.exit(2)
    if cfg.get("only"):
        methods = {m: o for m, o in methods.items() if m in cfg.only}
    spec = Spec(name=str(c.name), methods=methods, seeds=list(cfg.seeds), overrides=[str(o) for o in [*c.overrides, *cfg.overrides]],
                baselines=[str(b) for b in c.baselines], chain=[str(m) for m in c.get("chain") or [] if m in methods])
    out = Path(str(cfg.out_dir))
    t0 = time.perf_counter()
    if not cfg.report_only:
        done = run_cells(spec, out)
        log.info("compare: ran %d cells, skipped %d finished, %d failed", len(done["ran"]), len(done["skipped"]),
                 len(done["failed"]))
    res = write_report(spec, out, notes=str(c.get("notes") or ""), name=str(cfg.get("report_name") or "report"))
    print(res["markdown"])
    print(f"report: {res['paths']['md']}  (this invocation: {(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
