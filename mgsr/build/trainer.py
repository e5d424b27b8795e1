"""The Lightning side of a run: loggers (CSV, W&B with its sweep group and offline fallback), the Trainer with its
checkpoints and strategy, resuming, the checkpoints training left, and Lightning's console logging.

Imports Lightning only inside the functions that use it: mgsr.report (a Hydra callback of every run, and a
command) imports `sweep_group` from here."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from mgsr.config import ConfigError, to_container

if TYPE_CHECKING:
    import lightning as L

log = logging.getLogger("mgsr")


def sweep_group(name: str, sweep_dir) -> str:
    """The W&B group of one sweep: `<experiment name>/<sweep dir name>` (the sweep's timestamp)."""
    return f"{name}/{Path(sweep_dir).name}"


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


def _sweep_group(cfg: DictConfig, run_dir: Path) -> str | None:
    """W&B group shared by the runs of one `-m` sweep (see sweep_group); None outside sweeps."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return sweep_group(cfg.name, run_dir.parent)
    except Exception as e:  # noqa: BLE001 - grouping is cosmetic: say so and go on ungrouped
        log.warning("W&B: could not derive the sweep group (%s: %s); this run is logged without a group "
                    "(set group=... to choose one)", type(e).__name__, e)
    return None


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


def finish_wandb(loggers) -> None:
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            try:
                lg.experiment.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("W&B finish failed: %s", e)


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list, loggers: list, module=None) -> L.Trainer:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

    ckpt_dir = run_dir / "checkpoints"
    callbacks = list(callbacks)
    callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=cfg.checkpoint.monitor, mode="max",
                                     save_top_k=1, save_last=False))
    callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="last", every_n_train_steps=cfg.checkpoint.every_n_train_steps,
                                     save_top_k=1, save_last=False, enable_version_counter=False))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar())
    else:  # a non-interactive log (compare's cells, SLURM) still gets a line a minute: step, loss, ETA
        from mgsr.callbacks import ProgressLog

        callbacks.append(ProgressLog(str(cfg.get("name") or "train")))
    kwargs = {k: v for k, v in to_container(cfg.trainer).items() if not k.startswith("_")}
    if isinstance(kwargs.get("strategy"), dict):  # FSDP / DeepSpeed / DDP objects (mgsr/strategies.py)
        from mgsr.strategies import build_strategy, strategy_callbacks

        callbacks.extend(strategy_callbacks(kwargs["strategy"]))
        kwargs["strategy"] = build_strategy(kwargs["strategy"], module)
    return L.Trainer(**kwargs, logger=loggers or False, callbacks=callbacks, default_root_dir=str(run_dir),
                     enable_model_summary=False)


def resume_checkpoint(ckpt_path, run_dir: Path) -> str | None:
    """The checkpoint `trainer.fit` resumes from. "last": <run_dir>/checkpoints/last.ckpt; when there is none yet
    (a requeued job killed before its first checkpoint, or a new run directory) a warning names the path and
    training starts from scratch. An explicit path that is not a file is a ConfigError."""
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        if not _is_checkpoint(Path(os.path.expanduser(str(ckpt_path)))):
            raise ConfigError(f"ckpt_path={ckpt_path}: no checkpoint there (use a .ckpt file, or 'last' for this run dir's)")
        return str(ckpt_path)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if _is_checkpoint(ckpt):
        return str(ckpt)
    log.warning("ckpt_path=last: no checkpoint at %s, so training starts FROM SCRATCH; to resume a killed run, set "
                "hydra.run.dir to that run's directory (this run's is %s)", ckpt, run_dir)
    return None


def _is_checkpoint(path: Path) -> bool:
    """A checkpoint file, or a sharded one (FSDP2: a directory whose metadata file rank 0 writes last)."""
    from mgsr.fsdp2_checkpoint import is_sharded_checkpoint

    return path.is_file() or is_sharded_checkpoint(path)


def best_checkpoint(trainer) -> str | None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path:
            return cb.best_model_path
    return None


def last_checkpoint(trainer) -> str | None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and not cb.monitor and (cb.best_model_path or cb.last_model_path):
            return cb.best_model_path or cb.last_model_path  # without a monitor, "best" is the latest saved
    return None


def log_summary(loggers, results):
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
