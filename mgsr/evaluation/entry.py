"""What `evaluate.py` does: resolve the model and the evaluation sets from config, run the protocol, write files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from mgsr.config import ConfigError, to_container
from mgsr.data.prompt import format_records, use_prompt_format
from mgsr.evaluation.run import EvalSettings, evaluate_sets
from mgsr.evaluation.tables import markdown_table
from mgsr.models import is_hf_dir, load_model, load_tokenizer

TABLE_METRICS = ("rougeL", "distinct_1", "distinct_2", "exact_match", "tokens_per_s")


def load_eval_sets(cfg: DictConfig) -> tuple[dict[str, list[dict]], dict[str, str], dict[str, dict]]:
    """Records per requested set, display labels, and skipped-row counts. Checked before any model loads."""
    from mgsr.data.jsonl import load_jsonl_records
    from mgsr.data.synthetic import make_synthetic_splits

    sets, labels, skipped = {}, {}, {}
    for name in cfg.eval_sets:
        if name not in cfg.sets:
            raise ConfigError(f"unknown eval set {name!r}; choose from {sorted(cfg.sets)} or add it under sets:")
        spec = cfg.sets[name]
        labels[name] = spec.get("label", name)
        if spec.get("source", "jsonl") == "synthetic":
            splits = make_synthetic_splits(spec.seed, spec.n_train, spec.n_val, spec.n_test)
            recs = splits[spec.split]
            for r in recs:
                r["references"] = r["output"] if isinstance(r["output"], list) else [r["output"]]
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


def settings_from(cfg: DictConfig) -> EvalSettings:
    if int(cfg.max_new_tokens) <= 0:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens}: must be > 0")
    return EvalSettings(seeds=tuple(cfg.seeds), batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                        no_repeat_ngram_size=cfg.no_repeat_ngram_size, max_prompt_len=cfg.max_prompt_len,
                        limit=cfg.limit)


def evaluate_from_config(cfg: DictConfig, out_dir: Path, log=print) -> dict:
    settings = settings_from(cfg)
    sets, labels, skipped = load_eval_sets(cfg)  # bad paths fail here, before the model loads
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
    results["settings"] = to_container(cfg)
    results["table"] = markdown_table(results["summary"], metrics=TABLE_METRICS, set_order=list(sets),
                                      label_overrides=labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (out_dir / "results.md").write_text(results["table"])
    return results
