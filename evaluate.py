"""Evaluate a student (or teacher) with the MiniLLM/DistiLLM protocol (METHOD.md 7).

    python evaluate.py model_path=outputs/mgsr/<run>/student
    python evaluate.py model_path=outputs/mgsr/<run>/checkpoints/best.ckpt seeds=[10,20,30]

Writes results.json and results.md (mean ± std over seeds, per set and Average) to the run directory.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mgsr.config import ConfigError


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from mgsr.evaluation.entry import evaluate_from_config

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = evaluate_from_config(cfg, out_dir)
    except ConfigError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # always exactly one line
        sys.exit(2)
    print(f"\n{cfg.model_path} — mean ± std over seeds {list(cfg.seeds)}\n")
    print(results["table"])
    print(f"results: {out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
