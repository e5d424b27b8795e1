"""The training recipe, top to bottom: tokenizer -> data -> teacher (fine-tuned and cached if needed) ->
student -> losses -> Lightning fit -> evaluation of the selected checkpoint -> results on disk.

`train.py` is a thin Hydra wrapper around `run(cfg)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mgsr.baselines import build_sequence_callback
from mgsr.callbacks import CostCallback
from mgsr.config import ConfigError, to_container, validate
from mgsr.data.datamodule import DOLLY_FILES, DistillDataModule
from mgsr.data.prompt import format_records, use_prompt_format
from mgsr.data.synthetic import SYNTHETIC_VERSION, make_synthetic_splits, synthetic_corpus
from mgsr.data.tokenizer import load_or_build_tokenizer
from mgsr.evaluation.run import EvalSettings, evaluate_sets
from mgsr.evaluation.tables import markdown_table
from mgsr.generation import SamplingConfig
from mgsr.models import (
    build_from_config,
    check_tokenizers,
    freeze,
    load_model,
    load_tokenizer,
    merge_lora,
    trim_vocab,
)
from mgsr.module import DistillModule
from mgsr.prune import check_prune_depth, prune_layers
from mgsr.scrg import ScrgConfig
from mgsr.sft_stage import fine_tune_cached, stable_hash, tokenizer_digest
from mgsr.sources import resolve_model_sources

log = logging.getLogger("mgsr")


# -- tokenizer and data ------------------------------------------------------------------------------------------
def build_tokenizer(cfg: DictConfig):
    spec = cfg.model.tokenizer
    if spec.get("name_or_path"):
        return load_tokenizer(spec.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.student.get("name_or_path"):
        return load_tokenizer(cfg.model.student.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    # Offline: a BPE trained on the run's training text (the synthetic corpus, or the train split's prompt +
    # output for JSONL data such as Dolly), cached by what determines it.
    vocab = int(cfg.data.get("tokenizer_vocab_size") or spec.vocab_size)
    if cfg.data.source == "jsonl":
        train_file = _train_file(cfg)
        key = stable_hash({"vocab": vocab, "source": "jsonl", "train": _file_digest(train_file)})
        texts = lambda: _jsonl_corpus(train_file)  # noqa: E731
    else:  # the teacher's corpus is a superset of the run's split: one tokenizer covers both
        n = max(int(cfg.data.n_train), _teacher_corpus_size(cfg) or 0)
        key = stable_hash({"vocab": vocab, "data_seed": cfg.data.seed, "n_train": n, "generator": SYNTHETIC_VERSION})
        texts = lambda: synthetic_corpus(make_synthetic_splits(cfg.data.seed, n, 0, 0)["train"])  # noqa: E731
    return load_or_build_tokenizer(str(Path(cfg.cache_dir) / f"tokenizer-{key}"), texts, vocab)


def _train_file(cfg: DictConfig) -> str:
    name = cfg.data.get("train_file") or DOLLY_FILES["train"]
    return name if os.path.isabs(name) or not cfg.data.get("path") else os.path.join(cfg.data.path, name)


def _teacher_corpus_size(cfg: DictConfig) -> int | None:
    """Synthetic data only: the size of the teacher's own training corpus (its "pretraining", a longer draw of
    the same train prompt space whose first `data.n_train` records are the run's split); None: the run's split."""
    n = (cfg.model.get("teacher_sft") or {}).get("n_train")
    return int(n) if n and cfg.data.source != "jsonl" else None


def data_identity(cfg: DictConfig, n_train: int | None = None, label_noise: float | None = None) -> dict:
    """What determines the training split's token sequences: the key part of every cached SFT stage. Batch
    size, workers and the eval splits do not change the training data, so they are not in it."""
    d = cfg.data
    label_noise = float(d.get("label_noise") or 0.0) if label_noise is None else float(label_noise)
    ident = {"source": d.source, "max_len": int(d.max_len), "max_prompt_len": int(d.max_prompt_len),
             "prompt_format": d.get("prompt_format")}
    if d.source == "jsonl":
        ident |= {"train": _file_digest(_train_file(cfg)), "max_train_records": d.get("max_train_records")}
    else:
        ident |= {"seed": int(d.seed), "n_train": int(n_train or d.n_train), "generator": SYNTHETIC_VERSION,
                  "max_train_records": d.get("max_train_records"), "label_noise": label_noise}
    return ident


def _file_digest(path: str) -> str:
    if not os.path.isfile(path):
        raise ConfigError(f"training data file not found: {path} (set data.path / data.train_file)")
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def _jsonl_corpus(path: str):
    """Prompt + output texts of every usable training row (all of them, whatever max_train_records says,
    so one cached tokenizer serves runs of any length)."""
    from mgsr.data.jsonl import load_jsonl_records

    for rec in load_jsonl_records(path).records:
        yield rec["prompt"] + rec["references"][0]


# data-config keys that describe the run rather than the datamodule (see conf/data/dolly.yaml)
DATA_RUN_KEYS = ("tokenizer_vocab_size", "eval_sets", "hub")


def resolve_data_path(cfg: DictConfig) -> None:
    """JSONL data with `data.hub` set and no local copy at `data.path`: download MiniLLM's split from the hub
    into the cache (mgsr/data/hub.py) and point `data.path` there. A local copy always wins."""
    d = cfg.data
    if d.source != "jsonl" or not d.get("hub") or (d.get("path") and Path(d.path).is_dir()):
        return
    from omegaconf import open_dict

    from mgsr.data.hub import fetch_minillm_dolly

    try:
        path = fetch_minillm_dolly(d.hub, cfg.cache_dir)
    except Exception as e:  # noqa: BLE001 - offline, no such repo, ...: one line saying what to set
        raise ConfigError(f"data.path={d.get('path')} not found and fetching {d.hub} from the hub failed "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "point data.path at a local copy") from None
    log.info("data: no local copy at %s, using %s from the hub (%s)", d.get("path"), d.hub, path)
    with open_dict(cfg):
        cfg.data.path = str(path)
        dolly = cfg.get("sets", {}).get("dolly")
        if dolly is not None and not Path(dolly.path).is_file():  # the Dolly eval set is that split's test file
            dolly.path = str(path / DOLLY_FILES["test"])


def build_datamodule(cfg: DictConfig, tokenizer, **overrides) -> DistillDataModule:
    d = {k: v for k, v in to_container(cfg.data).items() if not k.startswith("_") and k not in DATA_RUN_KEYS}
    d.update(overrides)
    return DistillDataModule(tokenizer=tokenizer, **d)


def eval_sets(dm: DistillDataModule, cfg: DictConfig | None = None) -> tuple[dict[str, list[dict]], dict, dict]:
    """The final evaluation's sets: (records per set, display labels, skipped-row counts).

    Names come from `eval.sets`, else the data config's `eval_sets` (data=dolly: the paper's five), and are
    looked up in the `sets` registry shared with evaluate.py (conf/sets/); "test" (the default) is the
    datamodule's test split. Missing files fail here, which `run` calls before training."""
    names = (cfg.eval.get("sets") or cfg.data.get("eval_sets")) if cfg is not None else None
    names = list(names or ["test"])
    sets, labels, skipped = {}, {}, {}
    others = [n for n in names if n != "test"]
    if others:
        from mgsr.evaluation.entry import load_eval_sets

        registry = cfg.get("sets") or {}
        loaded = load_eval_sets(OmegaConf.create({"eval_sets": others, "sets": to_container(registry)}))
        sets, labels, skipped = (dict(x) for x in loaded)
        sets = {k: format_records(v, dm.tokenizer, dm.prompt_format) for k, v in sets.items()}
    out = ({}, {}, {})
    for name in names:  # keep the requested order
        if name == "test":
            if "test" not in dm.records:
                dm.setup("test")
            out[0]["test"], out[1]["test"], out[2]["test"] = dm.records["test"], "test", dm.stats.get("test", {})
        else:
            out[0][name], out[1][name], out[2][name] = sets[name], labels[name], skipped[name]
    return out


# -- models -----------------------------------------------------------------------------------------------------
def build_student(cfg: DictConfig, tokenizer):
    spec = cfg.model.student
    if spec.get("init") == "prune":  # the teacher's (pre-fine-tuning) source with fewer blocks
        source = load_model(cfg.model.teacher.name_or_path, dtype=spec.dtype,
                            trust_remote_code=cfg.model.trust_remote_code)
        keep = spec.keep_layers
        model = prune_layers(trim_vocab(source, len(tokenizer)),
                             OmegaConf.to_container(keep) if OmegaConf.is_config(keep) else keep)
    elif spec.get("name_or_path"):
        model = load_model(spec.name_or_path, dtype=spec.dtype, trust_remote_code=cfg.model.trust_remote_code)
        model = trim_vocab(model, len(tokenizer))
    elif student_init_enabled(cfg):  # the paper's protocol: every method starts from one SFT checkpoint
        model = load_model(str(ensure_student_init(cfg, tokenizer)), dtype=spec.dtype)
    else:  # from scratch
        model = build_from_config(to_container(spec.arch), tokenizer, seed=cfg.seed).to(_dtype(spec.dtype))
    if cfg.model.get("gradient_checkpointing"):  # transformers 5 renamed it activation checkpointing
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if cfg.model.get("lora") and cfg.model.lora.get("enabled"):
        from peft import LoraConfig, get_peft_model

        lora = {k: v for k, v in to_container(cfg.model.lora).items() if k != "enabled"}
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    return model


def _dtype(name):
    from mgsr.models import torch_dtype

    return torch_dtype(name)


def check_teacher_tokenizer(name_or_path: str, tokenizer, *, trust_remote_code: bool = False) -> None:
    """Token-level distillation needs the teacher's vocabulary to be the run's (padding rows past it are
    fine, see `shared_vocab_size`); a real mismatch is one ConfigError line, raised before any weights load."""
    try:
        teacher_tok = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # a weights-only directory: nothing to compare against
        log.warning("teacher %s has no loadable tokenizer (%s); assuming it shares the run's", name_or_path, e)
        return
    try:
        check_tokenizers(teacher_tok, tokenizer)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _pretrained_teacher(cfg: DictConfig, tokenizer, dtype: str):
    spec = cfg.model.teacher
    teacher = load_model(spec.name_or_path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    if spec.get("lora_path"):  # a LoRA-fine-tuned teacher: merge once, then it is a plain model
        teacher = merge_lora(teacher, spec.lora_path)
    return trim_vocab(teacher, len(tokenizer))


def _source_key(name: str):
    """What identifies a pretrained source in a cache key: a hub name as is; a local directory by its files'
    names, sizes and mtimes (a GGUF conversion's directory name already holds the file's hash)."""
    path = Path(os.path.expanduser(name))
    if not path.is_dir():
        return name
    return {"path": str(path.resolve()), "files": sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                                         for f in path.iterdir() if f.is_file())}


def ensure_teacher(cfg: DictConfig, tokenizer, dm: DistillDataModule):
    """The frozen teacher. With no `name_or_path`, fine-tune `arch` on the training split with SFT first; a
    pretrained teacher is fine-tuned the same way when `teacher_sft.max_steps > 0` (the MiniLLM protocol).
    The result is cached by what determines it (a second run with the same settings skips that stage)."""
    spec = cfg.model.teacher
    sft = to_container(cfg.model.teacher_sft)
    pretrained = bool(spec.get("name_or_path"))
    if pretrained:
        check_teacher_tokenizer(spec.name_or_path, tokenizer, trust_remote_code=cfg.model.trust_remote_code)
        if int(sft.get("max_steps") or 0) <= 0:  # used as given
            return freeze(_pretrained_teacher(cfg, tokenizer, spec.dtype))
        build = lambda: _pretrained_teacher(cfg, tokenizer, "float32")  # noqa: E731 - trained in float32
    else:
        build = lambda: build_from_config(to_container(spec.arch), tokenizer, seed=sft["seed"])  # noqa: E731
    overrides = {"batch_size": sft["batch_size"]}
    if cfg.data.source != "jsonl":  # the teacher's own corpus: longer, and as clean as teacher_sft says
        overrides |= {"n_train": _teacher_corpus_size(cfg) or cfg.data.n_train,
                      "label_noise": float(sft.get("label_noise") or 0.0)}
    path = fine_tune_cached(
        teacher_cache_path(cfg, tokenizer), build, tokenizer, build_datamodule(cfg, tokenizer, **overrides),
        max_steps=sft["max_steps"], lr=sft["lr"], seed=sft["seed"], accelerator=cfg.trainer.accelerator,
        what="teacher", progress=bool(cfg.trainer.get("enable_progress_bar", True)))
    return freeze(load_model(str(path), dtype=spec.dtype))


def teacher_cache_path(cfg: DictConfig, tokenizer) -> Path:
    """Where the fine-tuned tiny teacher lives: keyed on its architecture, its SFT settings, the identity of its
    corpus and the tokenizer, and on nothing else (not the run's batch size, workers or the student's split)."""
    sft, spec = to_container(cfg.model.teacher_sft), cfg.model.teacher
    data = data_identity(cfg, _teacher_corpus_size(cfg), float(sft.get("label_noise") or 0.0))
    origin = ({"source": _source_key(spec.name_or_path), "lora": spec.get("lora_path")} if spec.get("name_or_path")
              else {"arch": to_container(spec.arch)})
    key = stable_hash({**origin, "sft": sft, "data": data, "tok": tokenizer_digest(tokenizer)})
    return Path(cfg.cache_dir) / f"teacher-{key}"


def student_init_enabled(cfg: DictConfig) -> bool:
    init = cfg.model.get("student_init")
    return bool(init is not None and init.get("enabled") and not cfg.model.student.get("name_or_path"))


def student_init_path(cfg: DictConfig, tokenizer) -> Path:
    init = to_container(cfg.model.student_init)
    key = stable_hash({"arch": to_container(cfg.model.student.arch), "init": {k: v for k, v in init.items() if k != "enabled"},
                 "data": data_identity(cfg), "tok": tokenizer_digest(tokenizer)})
    return Path(cfg.cache_dir) / f"student-sft-{key}"


def ensure_student_init(cfg: DictConfig, tokenizer) -> Path:
    """The SFT checkpoint every method of a run starts from (`model.student_init`): `arch` fine-tuned on the
    run's training split, cached by what determines it. Its seed defaults to the run's, so each training seed
    of a comparison has its own start, shared by all methods at that seed (a paired design)."""
    init = cfg.model.student_init
    return fine_tune_cached(
        student_init_path(cfg, tokenizer),
        lambda: build_from_config(to_container(cfg.model.student.arch), tokenizer, seed=int(init.seed)),
        tokenizer, build_datamodule(cfg, tokenizer, batch_size=int(init.batch_size)), max_steps=int(init.max_steps),
        lr=float(init.lr), seed=int(init.seed), accelerator=cfg.trainer.accelerator, what="student init",
        progress=bool(cfg.trainer.get("enable_progress_bar", True)))


# -- losses, callbacks, loggers ---------------------------------------------------------------------------------
def scrg_config(cfg: DictConfig) -> ScrgConfig:
    s = cfg.scrg
    return ScrgConfig(rounds=s.rounds, mode=s.mode, teacher_token=s.teacher_token, divergence=s.divergence,
                      threshold_mode=s.threshold_mode, threshold=s.threshold, quantile=s.quantile,
                      max_corrections=s.max_corrections)


def build_module(cfg: DictConfig, student, teacher, tokenizer) -> DistillModule:
    loss = cfg.loss
    distill = instantiate(loss.distill) if loss.get("distill") is not None and loss.distill_weight > 0 else None
    span = instantiate(loss.span) if loss.get("span") is not None and loss.span_weight > 0 else None
    val = SamplingConfig(max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
                         top_k=cfg.eval.top_k, top_p=cfg.eval.top_p)  # no n-gram ban for selection (METHOD.md 7)
    return DistillModule(
        student, tokenizer, teacher=teacher, sft_weight=loss.sft_weight, distill=distill,
        distill_weight=loss.distill_weight, span=span, span_weight=loss.span_weight, scrg=scrg_config(cfg),
        train_sampling=SamplingConfig(**to_container(cfg.scrg.sampling)), val_sampling=val,
        optim=to_container(cfg.optim), val_generate=cfg.val_generate, seed=cfg.seed,
    )


def uses_student_sequences(cfg: DictConfig) -> bool:
    distills = cfg.loss.distill_weight > 0 or cfg.loss.span_weight > 0
    return bool(distills and cfg.scrg.enabled)


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    loggers = []
    if cfg.logger.csv.enabled:
        loggers.append(CSVLogger(str(run_dir), name="csv", version=""))
    w = cfg.logger.wandb
    if w.enabled and w.mode != "disabled":
        os.environ.setdefault("WANDB_SILENT", "true")
        kw = dict(project=w.project, entity=w.entity, name=cfg.name, group=cfg.group or _sweep_group(cfg, run_dir),
                  save_dir=str(run_dir), config=OmegaConf.to_container(cfg, resolve=True))
        mode = w.mode
        if mode == "online":
            # Start the W&B run now, with a timeout: no API key or no network fails here in seconds (instead of
            # hanging ~90 s and then crashing inside fit), and the run goes on logging offline.
            try:
                import wandb

                lg = WandbLogger(**kw, offline=False, mode="online",
                                 settings=wandb.Settings(init_timeout=float(w.get("init_timeout", 30))))
                lg.experiment  # noqa: B018 - creates the run
                loggers.append(lg)
            except Exception as e:  # noqa: BLE001 - W&B must never block a run
                log.warning("W&B online unavailable (%s: %s); logging offline instead", type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "")
                mode = "offline"
        if mode != "online":
            try:
                loggers.append(WandbLogger(**kw, offline=True, mode=mode))
            except Exception as e:  # noqa: BLE001 - W&B must never block a run
                log.warning("W&B logger unavailable (%s); continuing without it", e)
    return loggers


def wandb_offline_dir(loggers) -> str | None:
    """Directory of an offline W&B run (upload later with `wandb sync <dir>`), None when there is none."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            try:
                run = lg.experiment
                if run.settings.mode in ("offline", "dryrun"):
                    return str(Path(run.dir).parent)
            except Exception:  # noqa: BLE001 - reporting only
                return None
    return None


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list, loggers: list, module=None) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

    ckpt_dir = run_dir / "checkpoints"
    callbacks = list(callbacks)
    callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=cfg.checkpoint.monitor, mode="max",
                                     save_top_k=1, save_last=False))
    callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="last", every_n_train_steps=cfg.checkpoint.every_n_train_steps,
                                     save_top_k=1, save_last=False, enable_version_counter=False))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar())
    kwargs = {k: v for k, v in to_container(cfg.trainer).items() if not k.startswith("_")}
    if isinstance(kwargs.get("strategy"), dict):  # FSDP / DeepSpeed / DDP objects (mgsr/strategies.py)
        from mgsr.strategies import build_strategy, strategy_callbacks

        callbacks.extend(strategy_callbacks(kwargs["strategy"]))
        kwargs["strategy"] = build_strategy(kwargs["strategy"], module)
    return L.Trainer(**kwargs, logger=loggers or False, callbacks=callbacks, default_root_dir=str(run_dir),
                     enable_model_summary=False)


# -- the run ----------------------------------------------------------------------------------------------------
class _DropLitLoggerTip(logging.Filter):
    def filter(self, record):
        return "litlogger" not in record.getMessage()


def tidy_lightning_logging() -> None:
    """For entry points, once Hydra has configured logging. `import lightning` adds its own console handler *and* propagates to the root logger, so under Hydra
    (which configures root) every Lightning line prints twice; and each Trainer advertises a cloud logger."""
    if logging.getLogger().hasHandlers():
        logging.getLogger("lightning").handlers.clear()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLitLoggerTip) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLitLoggerTip())


def check_epoch_length(cfg: DictConfig, n_train: int) -> None:
    """Lightning would only say this after the models load (or, for max_epochs, not at all)."""
    t = cfg.trainer
    batches = -(-n_train // int(cfg.data.batch_size))  # per epoch, single process
    vci = t.get("val_check_interval")
    if isinstance(vci, int) and t.get("check_val_every_n_epoch") is not None and vci > batches:
        raise ConfigError(f"trainer.val_check_interval={vci} is more than the {batches} batches of one epoch; lower "
                          "it or set trainer.check_val_every_n_epoch=null to count batches across epochs")
    max_steps, max_epochs = int(t.get("max_steps") or -1), t.get("max_epochs")
    epoch_steps = -(-batches // int(t.get("accumulate_grad_batches") or 1))  # a partial accumulation steps too
    if max_steps > 0 and max_epochs is not None and 0 < int(max_epochs) * epoch_steps < max_steps:
        log.warning("trainer.max_epochs=%s stops training after %d steps, before trainer.max_steps=%d "
                    "(set trainer.max_epochs=-1 to train for max_steps)", max_epochs, int(max_epochs) * epoch_steps,
                    max_steps)


def _final_evaluation(cfg: DictConfig, model, tokenizer, final_sets, results: dict) -> None:
    sets, labels, skipped = final_sets
    results["eval"] = evaluate_sets(model, tokenizer, sets, eval_settings(cfg), log=log.info)
    results["eval"].update(labels=labels, skipped_rows=skipped)
    results["table"] = markdown_table(results["eval"]["summary"], metrics=("rougeL", "distinct_1", "distinct_2",
                                      "exact_match", "tokens_per_s"), set_order=list(sets), label_overrides=labels)


def _write_results(run_dir: Path, results: dict, t_start: float) -> None:
    results["wall_time_s"] = time.perf_counter() - t_start
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    if "table" in results:
        (run_dir / "results.md").write_text(results["table"])


EVAL_ONLY = ("teacher", "student_init")


def evaluate_reference(cfg: DictConfig, run_dir: Path, tokenizer, dm, final_sets, t_start: float) -> dict:
    """`eval_only=teacher|student_init`: evaluate the run's teacher, or the student as every method starts it,
    with the final evaluation's settings, and write results.json like a trained run (a comparison's reference
    rows)."""
    which = cfg.eval_only
    model = ensure_teacher(cfg, tokenizer, dm) if which == "teacher" else build_student(cfg, tokenizer)
    results = {"name": cfg.name, "seed": cfg.seed, "run_dir": str(run_dir), "eval_only": which,
               "data_stats": dm.stats}
    _final_evaluation(cfg, model, tokenizer, final_sets, results)
    if which == "student_init" and cfg.eval.get("exposure_bias"):
        results["exposure"] = _exposure_bias(cfg, model, None, tokenizer, dm)
    _write_results(run_dir, results, t_start)
    return results


def run(cfg: DictConfig, run_dir: Path) -> dict:
    t_start = time.perf_counter()
    resolve_data_path(cfg)  # data.hub: no local copy -> fetched once into the cache
    validate(cfg)  # before anything loads
    resolve_model_sources(cfg)  # GGUF / packaged weights -> a converted directory in the cache (once)
    check_prune_depth(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    try:
        tokenizer = use_prompt_format(build_tokenizer(cfg), cfg.data.get("prompt_format", "alpaca"))
        dm = build_datamodule(cfg, tokenizer)
        dm.setup("fit")
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError) as e:  # e.g. an empty split: one line, before any model loads
        raise ConfigError(f"data: {e}") from None
    check_epoch_length(cfg, len(dm.datasets["train"]))
    final_sets = eval_sets(dm, cfg) if cfg.eval.enabled else None  # a missing eval file fails before training
    if cfg.get("eval_only"):
        if cfg.eval_only not in EVAL_ONLY or not cfg.eval.enabled:
            raise ConfigError(f"eval_only={cfg.eval_only}: choose one of {', '.join(EVAL_ONLY)} (with eval.enabled=true)")
        return evaluate_reference(cfg, run_dir, tokenizer, dm, final_sets, t_start)
    distills = cfg.loss.distill_weight > 0 or cfg.loss.span_weight > 0
    teacher = ensure_teacher(cfg, tokenizer, dm) if distills else None
    seqkd_stats = None
    if cfg.get("seqkd") is not None and cfg.seqkd.get("enabled"):  # train on cached teacher samples (SeqKD)
        from mgsr.seqkd import apply_seqkd

        seqkd_stats = apply_seqkd(cfg, tokenizer, dm,
                                  lambda: teacher if teacher is not None else ensure_teacher(cfg, tokenizer, dm))
    student = build_student(cfg, tokenizer)
    module = build_module(cfg, student, teacher, tokenizer)

    cost = CostCallback()
    callbacks = [cost]
    if uses_student_sequences(cfg):
        callbacks.append(build_sequence_callback(cfg, seed=cfg.seed))  # ScrgCallback, or scheduled (baselines)
    loggers = build_loggers(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir, callbacks, loggers, module=module)
    ckpt = resume_checkpoint(cfg.ckpt_path, run_dir)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True)  # checkpoints hold tensors and primitives

    results = {"name": cfg.name, "seed": cfg.seed, "run_dir": str(run_dir), "data_stats": dm.stats,
               "train_cost": cost.summary(module), "val": {k: float(v) for k, v in trainer.callback_metrics.items()
                                                           if k.startswith("val/")}}
    if seqkd_stats is not None:
        results["seqkd"] = seqkd_stats
    offline = wandb_offline_dir(loggers)
    if offline:
        results["wandb_offline_dir"] = offline
        log.info("W&B offline run: %s (upload with: wandb sync %s)", offline, offline)
    if getattr(module, "scrg_history", None):  # what SCRG did over training (e.g. corrected tokens per sequence)
        results["scrg"] = {k: sum(v) / len(v) for k, v in module.scrg_history.items() if v}
    best = _best_checkpoint(trainer)
    from mgsr.strategies import is_sharded

    if is_sharded(trainer.strategy):  # FSDP rewrote the student's module tree in place: load into a fresh one
        student = build_student(cfg, tokenizer).to(module.device)
        teacher = None  # rewritten too (and its units all-gather across ranks): reloaded if needed later
        best = best or _last_checkpoint(trainer)
        if not best:
            log.warning("sharded strategy and no checkpoint: the trained student cannot be exported")
    if best and Path(best).is_dir():  # DeepSpeed writes a directory of shards: not loadable here
        log.warning("checkpoint %s is a DeepSpeed directory; convert it with lightning.pytorch.utilities.deepspeed."
                    "convert_zero_checkpoint_to_fp32_state_dict and evaluate that (not loaded here)", best)
        best = None
    if best:
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        student.load_state_dict({k[len("student."):]: v for k, v in state.items() if k.startswith("student.")})
        results["checkpoint"] = best
    if trainer.is_global_zero:
        if hasattr(student, "merge_and_unload"):  # LoRA: keep the adapter, export the merged model
            student.save_pretrained(run_dir / "student_adapter")
            student = student.merge_and_unload()
        student.save_pretrained(run_dir / "student")
        tokenizer.save_pretrained(run_dir / "student")
        if cfg.eval.enabled:
            _final_evaluation(cfg, student, tokenizer, final_sets, results)
            if cfg.eval.get("exposure_bias"):
                results["exposure"] = _exposure_bias(cfg, student, teacher, tokenizer, dm)
        _write_results(run_dir, results, t_start)
        _log_summary(loggers, results)
    _finish_wandb(loggers)  # a sweep runs its jobs in one process: the next job must get a fresh W&B run
    return results


def resume_checkpoint(ckpt_path, run_dir: Path) -> str | None:
    """The checkpoint `trainer.fit` resumes from. "last": <run_dir>/checkpoints/last.ckpt; when there is none yet
    (a requeued job killed before its first checkpoint, or a new run directory) a warning names the path and
    training starts from scratch. An explicit path that is not a file is a ConfigError."""
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        if not Path(os.path.expanduser(str(ckpt_path))).is_file():
            raise ConfigError(f"ckpt_path={ckpt_path}: no checkpoint there (use a .ckpt file, or 'last' for this run dir's)")
        return str(ckpt_path)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        return str(ckpt)
    log.warning("ckpt_path=last: no checkpoint at %s, so training starts FROM SCRATCH; to resume a killed run, set "
                "hydra.run.dir to that run's directory (this run's is %s)", ckpt, run_dir)
    return None


def _exposure_bias(cfg: DictConfig, student, teacher, tokenizer, dm) -> dict:
    """ExAccErr@15 on dev prompts (METHOD.md 7); loads the (cached) teacher for runs that trained without it.
    Without a loadable teacher it is skipped with a warning and {"skipped": reason}; a failure of the
    measurement itself is a bug and is raised."""
    from mgsr.evaluation.exposure import measure_exposure_bias

    e = cfg.eval
    if teacher is None:
        try:
            teacher = ensure_teacher(cfg, tokenizer, dm)
        except (ConfigError, OSError, ValueError) as err:  # no teacher to compare with: skip, never fail the run
            reason = f"no teacher to compare with ({type(err).__name__}: {err})"
            log.warning("exposure bias skipped: %s", reason)
            return {"skipped": reason}
    teacher.to(next(student.parameters()).device)
    out = measure_exposure_bias(teacher, student, tokenizer, dm.records["val"], n_prompts=e.exposure_prompts,
                                seed=e.exposure_seed, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                                max_prompt_len=cfg.data.max_prompt_len)
    log.info("exposure bias: ExAccErr@%d = %.1f%% on %d dev prompts", out["at"], out["exacc_err"], out["n_prompts"])
    return out


def _sweep_group(cfg: DictConfig, run_dir: Path) -> str | None:
    """W&B group shared by the runs of one `-m` sweep (see mgsr.report.sweep_group); None outside sweeps."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            from mgsr.report import sweep_group

            return sweep_group(cfg.name, run_dir.parent)
    except Exception as e:  # noqa: BLE001 - grouping is cosmetic: say so and go on ungrouped
        log.warning("W&B: could not derive the sweep group (%s: %s); this run is logged without a group "
                    "(set group=... to choose one)", type(e).__name__, e)
    return None


def _finish_wandb(loggers) -> None:
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            try:
                lg.experiment.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("W&B finish failed: %s", e)


def eval_settings(cfg: DictConfig) -> EvalSettings:
    e = cfg.eval
    return EvalSettings(seeds=tuple(e.seeds), batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                        temperature=e.temperature, top_k=e.top_k, top_p=e.top_p,
                        no_repeat_ngram_size=e.no_repeat_ngram_size, max_prompt_len=cfg.data.max_prompt_len,
                        limit=eval_limit(cfg))


def eval_limit(cfg: DictConfig) -> int | None:
    """Prompts per final evaluation set: `eval.limit`, and never more than `data.max_eval_records`, the one
    knob that bounds every evaluation of a run (it already cuts the dev and test splits, hence validation
    and exposure bias)."""
    limits = [int(x) for x in (cfg.eval.get("limit"), cfg.data.get("max_eval_records")) if x]
    return min(limits) if limits else None


def _last_checkpoint(trainer) -> str | None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and not cb.monitor and (cb.best_model_path or cb.last_model_path):
            return cb.best_model_path or cb.last_model_path  # without a monitor, "best" is the latest saved
    return None


def _best_checkpoint(trainer) -> str | None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path:
            return cb.best_model_path
    return None


def _log_summary(loggers, results):
    summary = results.get("eval", {}).get("summary", {})
    flat = {f"test/{s}/{m}": v[0] for s, ms in summary.items() for m, v in ms.items()
            if isinstance(v, (tuple, list))}
    flat.update({f"cost/{k}": v for k, v in results.get("train_cost", {}).items()})
    for lg in loggers:
        try:
            lg.log_metrics(flat)
            lg.save()
        except Exception as e:  # noqa: BLE001
            log.warning("logger %s failed to record the summary: %s", type(lg).__name__, e)


__all__ = ["run", "ConfigError"]
