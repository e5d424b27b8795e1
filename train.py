"""Distil a teacher into a student (MGSR by default). `python train.py` runs the embedded default end to end.

    python train.py                                   # tiny teacher -> student with MGSR, offline, CPU
    python train.py +experiment=ablation_fixed_clip   # a named experiment (conf/experiment/)
    python train.py -m +experiment=ablation_loss_weights   # a sweep; then python -m mgsr.report multirun/...
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mgsr.config import ConfigError, renamed_override


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from mgsr.build.trainer import tidy_lightning_logging  # here: --help and config errors stay fast
    from mgsr.pipeline import run

    tidy_lightning_logging()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = run(cfg, run_dir)
    except ConfigError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # always exactly one line
        sys.exit(2)
    if "table" in results:
        sets = ", ".join(results["eval"]["per_seed"])
        print(f"\n{cfg.name} — {sets}: mean ± std over evaluation seeds {results['eval']['seeds']}\n")
        print(results["table"])
    print(f"run directory: {run_dir}")
    return results.get("val", {}).get("val/rougeL")  # the value an Optuna sweep maximises


if __name__ == "__main__":
    if (moved := renamed_override(sys.argv[1:])) is not None:  # Hydra would only say "no match in the defaults list"
        print("error: " + moved, file=sys.stderr)
        sys.exit(2)
    main()
