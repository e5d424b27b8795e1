"""What `evaluate.py` does: resolve the model and the evaluation sets from config, run the protocol, write files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mgsr.config import ConfigError, to_container
from mgsr.data.prompt import format_records, use_prompt_format
from mgsr.evaluation.run import EvalSettings, evaluate_sets
from mgsr.evaluation.tables import markdown_table
from mgsr.models import is_hf_dir, load_model, load_tokenizer

TABLE_METRICS = ("rougeL", "distinct_1", "distinct_2", "exact_match", "tokens_per_s")


SYNTHETIC_KEYS = ("seed", "n_train", "n_val", "n_test")
SYNTHETIC_DEFAULTS = {"seed": 0, "n_train": 4000, "n_val": 200, "n_test": 200}  # conf/data/synthetic.yaml


def run_config(model_path) -> tuple[DictConfig | None, Path | None]:
    """The config a training run saved next to its model (<run>/config.yaml, written by train.py) and that
    file's path, for model_path = <run>/student or <run>/checkpoints/<name>.ckpt; (None, None) otherwise."""
    path = Path(str(model_path))
    if not path.exists():  # a hub name
        return None, None
    f = (path.parent.parent if path.suffix == ".ckpt" else path.parent) / "config.yaml"
    return (OmegaConf.load(f), f) if f.is_file() else (None, None)


def synthetic_split_settings(spec, run_data) -> dict:
    """seed / n_train / n_val / n_test of a synthetic eval set: the set's own where given, else the run's
    (its data was synthetic), else the synthetic defaults."""
    from_run = run_data if run_data is not None and run_data.get("source") == "synthetic" else {}
    out = {}
    for k in SYNTHETIC_KEYS:
        v = spec.get(k)
        out[k] = int(v if v is not None else from_run.get(k, SYNTHETIC_DEFAULTS[k]))
    return out


def _check_disjoint_from_training(name: str, records: list[dict], run_data, source: Path) -> None:
    """A synthetic eval split must not share prompts with the run's synthetic training split (a split made
    with another seed does: the splits are disjoint only for one seed)."""
    from mgsr.data.synthetic import make_synthetic_splits

    if run_data is None or run_data.get("source") != "synthetic":
        return
    train = {r["prompt"] for r in make_synthetic_splits(int(run_data.seed), int(run_data.n_train), 0, 0)["train"]}
    shared = sum(r["prompt"] in train for r in records)
    if shared:
        raise ConfigError(f"eval set {name}: {shared} of its {len(records)} prompts are in the training split of the run "
                          f"({source}: data.seed={run_data.seed}, data.n_train={run_data.n_train}); drop the "
                          f"sets.{name}.seed / n_* overrides to evaluate on that run's own test split")


def load_eval_sets(cfg: DictConfig, run_data=None, run_source: Path | None = None
                   ) -> tuple[dict[str, list[dict]], dict[str, str], dict[str, dict]]:
    """Records per requested set, display labels, and skipped-row counts. Checked before any model loads.

    run_data: the `data` node of the evaluated run's config.yaml (None: unknown); synthetic sets take their
    unset split settings from it and must not overlap its training split."""
    from mgsr.data.jsonl import load_jsonl_records
    from mgsr.data.synthetic import make_synthetic_splits

    sets, labels, skipped = {}, {}, {}
    for name in cfg.eval_sets:
        if name not in cfg.sets:
            raise ConfigError(f"unknown eval set {name!r}; choose from {sorted(cfg.sets)} or add it under sets:")
        spec = cfg.sets[name]
        labels[name] = spec.get("label", name)
        if spec.get("source", "jsonl") == "synthetic":
            split = synthetic_split_settings(spec, run_data)
            recs = make_synthetic_splits(split["seed"], split["n_train"], split["n_val"], split["n_test"])[spec.split]
            for r in recs:
                r["references"] = r["output"] if isinstance(r["output"], list) else [r["output"]]
            _check_disjoint_from_training(name, recs, run_data, run_source)
            sets[name], skipped[name] = recs, {}
        else:
            path = Path(spec.path)
            if not path.is_file():
                raise ConfigError(f"eval set {name}: file not found: {path} (set sets.{name}.path)")
            try:
                res = load_jsonl_records(str(path), max_records=spec.get("max_records"))
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"eval set {name}: {e}") from None
            sets[name], skipped[name] = res.records, dict(res.skipped)
    return sets, labels, skipped


def resolve_model(cfg: DictConfig):
    path = Path(str(cfg.model_path))
    tok_path = cfg.get("tokenizer_path")
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise ConfigError(f"model_path={path}: checkpoint not found")
        tok_path = tok_path or str(path.parent.parent / "student")
        if not Path(tok_path).exists():
            raise ConfigError(f"no tokenizer next to {path}: set tokenizer_path=<dir with tokenizer.json>")
        from transformers import AutoConfig, AutoModelForCausalLM

        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        conf = dict(ckpt["student_config"])
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**conf))
        model.load_state_dict({k[len("student."):]: v for k, v in ckpt["state_dict"].items()
                               if k.startswith("student.")})
        return model, load_tokenizer(tok_path)
    if (str(cfg.model_path).startswith(("/", ".")) or path.exists()) and not is_hf_dir(path):
        raise ConfigError(f"model_path={path}: not a model directory (no config.json) nor a .ckpt file")
    model = load_model(str(cfg.model_path), dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    return model, load_tokenizer(tok_path or str(cfg.model_path), trust_remote_code=cfg.trust_remote_code)


_FROM_CFG = object()  # settings_from: read the value from the config node itself


def settings_from(cfg: DictConfig, *, max_prompt_len=_FROM_CFG, limit=_FROM_CFG) -> EvalSettings:
    """The evaluation settings of a config node: evaluate.py's config (conf/evaluate.yaml), or a training run's
    `eval` node (conf/train.yaml; mgsr.build.evaluate.eval_settings), which has no max_length, length_budget
    or exact_match (so: max_new_tokens, padded, minillm) and whose prompt bound and limit come from elsewhere in
    the run's config (`data.max_prompt_len`, `eval_limit`): pass them as `max_prompt_len` and `limit`."""
    from mgsr.evaluation.metrics import EXACT_MATCH_NORMALIZATIONS
    from mgsr.evaluation.run import LENGTH_BUDGETS

    max_prompt_len = cfg.max_prompt_len if max_prompt_len is _FROM_CFG else max_prompt_len
    limit = cfg.limit if limit is _FROM_CFG else limit
    new, total = cfg.get("max_new_tokens"), cfg.get("max_length")
    if (new is None) == (total is None):
        raise ConfigError(f"max_new_tokens={new}, max_length={total}: set exactly one of them (the other null)")
    if new is not None and int(new) <= 0:
        raise ConfigError(f"max_new_tokens={new}: must be > 0")
    budget = cfg.get("length_budget", "padded")
    if budget not in LENGTH_BUDGETS:
        raise ConfigError(f"length_budget={budget!r}: choose one of {', '.join(LENGTH_BUDGETS)}")
    if total is not None and int(total) <= int(max_prompt_len):
        raise ConfigError(f"max_length={total}: must exceed max_prompt_len={max_prompt_len} (it counts prompt "
                          "and response tokens)")
    em = cfg.get("exact_match", "minillm")
    if em not in EXACT_MATCH_NORMALIZATIONS:
        raise ConfigError(f"exact_match={em!r}: choose one of {', '.join(EXACT_MATCH_NORMALIZATIONS)}")
    return EvalSettings(seeds=tuple(cfg.seeds), batch_size=cfg.batch_size, max_new_tokens=new, max_length=total,
                        length_budget=budget, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                        no_repeat_ngram_size=cfg.no_repeat_ngram_size, max_prompt_len=max_prompt_len,
                        limit=limit, exact_match=em)


def evaluate_from_config(cfg: DictConfig, out_dir: Path, log=print) -> dict:
    settings = settings_from(cfg)
    run_cfg, run_source = run_config(cfg.model_path)  # the evaluated run's own data settings, if it has them
    run_data = run_cfg.get("data") if run_cfg is not None else None
    sets, labels, skipped = load_eval_sets(cfg, run_data, run_source)  # bad paths fail here, before the model loads
    model, tokenizer = resolve_model(cfg)
    fmt = cfg.get("prompt_format", "alpaca")
    try:  # chat: the tokenizer's template and end-of-turn EOS, as the model was trained (mgsr.data.prompt)
        use_prompt_format(tokenizer, fmt)
        sets = {name: format_records(records, tokenizer, fmt) for name, records in sets.items()}
    except ValueError as e:
        raise ConfigError(str(e)) from None
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto"
                                                                                 else cfg.device)
    model.to(device)
    results = evaluate_sets(model, tokenizer, sets, settings, log=log)
    results["skipped_rows"] = skipped
    results["labels"] = labels
    results["model_path"] = str(cfg.model_path)
    results["run_config"] = str(run_source) if run_source else None
    results["synthetic_splits"] = {n: synthetic_split_settings(cfg.sets[n], run_data) for n in sets
                                   if cfg.sets[n].get("source", "jsonl") == "synthetic"}
    results["settings"] = to_container(cfg)
    results["table"] = markdown_table(results["summary"], metrics=TABLE_METRICS, set_order=list(sets),
                                      label_overrides=labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (out_dir / "results.md").write_text(results["table"])
    return results
