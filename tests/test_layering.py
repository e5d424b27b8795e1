"""The import graph of `mgsr` points one way: a module imports only from its own layer or the layers below.

Every `import mgsr.x` / `from mgsr.x import y` counts, module level or inside a function (a lazy import is still a
dependency). A new module must be given a layer here, so that its place is a decision.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Layers, low to high. A key is a module, or a package ending in ".*" (the package and everything under it).
# 0  config: ConfigError / to_container, used everywhere
# 1  data: records, tokenizers, batches, and the pure metric/table functions
# 2  models: loading, pruning, model sources, generation, calling sharded modules; learning-rate schedules
# 3  losses, spans, SCRG, where distillation sequences come from (sequences, replay), run-level callbacks
# 4  the LightningModule
# 5  recipe parts: the build stages, evaluation runs, SFT stages, SeqKD, strategies, reports, comparisons
# 6  the recipe itself
LAYERS = {
    "mgsr.config": 0,
    "mgsr.data.*": 1,
    "mgsr.evaluation": 1,  # the package's (empty) __init__; its modules are placed one by one
    "mgsr.evaluation.metrics": 1,
    "mgsr.evaluation.tables": 1,
    "mgsr.noise_budget": 1,  # pure arithmetic of paired differences (reports use it)
    "mgsr.models": 2,
    "mgsr.prune": 2,
    "mgsr.sources": 2,
    "mgsr.generation": 2,
    "mgsr.sharding": 2,
    "mgsr.fsdp2_checkpoint": 2,  # sharded checkpoints: read by the recipe (resume, export) and the strategy
    "mgsr.rollout_vllm": 2,  # the vLLM engine behind generate / continue_generation
    "mgsr.rng": 2,
    "mgsr.lr_schedule": 2,
    "mgsr.losses.*": 3,
    "mgsr.spans": 3,
    "mgsr.span_alignment": 3,
    "mgsr.objectives": 3,
    "mgsr.scrg": 3,
    "mgsr.replay": 3,
    "mgsr.sequences": 3,
    "mgsr.callbacks": 3,
    "mgsr.module": 4,
    "mgsr.build.*": 5,
    "mgsr.evaluation.run": 5,
    "mgsr.evaluation.entry": 5,
    "mgsr.evaluation.exposure": 5,
    "mgsr.evaluation.teacher_forced": 5,
    "mgsr.seqkd": 5,
    "mgsr.sft_stage": 5,  # trains a DistillModule (mgsr.module) for the cached teacher / student-init stages
    "mgsr.strategies": 5,
    "mgsr.fsdp2": 5,
    "mgsr.report": 5,
    "mgsr.compare": 5,
    "mgsr.paired_report": 5,
    "mgsr.docs_tables": 5,
    "mgsr.pipeline": 6,
}

# Upward imports that are meant: none. (Config validation, which asks every layer's rules, sits in the recipe
# layer as mgsr.build.validate; mgsr.config keeps only what every layer needs.)
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted((REPO / "mgsr").rglob("*.py"))}


def layer_of(module: str) -> int | None:
    if module in LAYERS:
        return LAYERS[module]
    parts = module.split(".")
    for i in range(len(parts), 1, -1):
        key = ".".join(parts[:i]) + ".*"
        if key in LAYERS:
            return LAYERS[key]
    return None


def imports_of(module: str, path: Path) -> set[str]:
    """The mgsr modules `module` imports, anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` steps up
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:  # `from mgsr import pipeline` imports the module mgsr.pipeline
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m == "mgsr" or m.startswith("mgsr.")}


def _edges() -> list[tuple[str, str]]:
    return [(m, imp) for m, path in MODULES.items() for imp in sorted(imports_of(m, path)) if imp != m]


def test_every_module_has_a_layer():
    # the root package is only the namespace: it must stay empty of imports
    assert imports_of("mgsr", MODULES["mgsr"]) == set()
    missing = sorted(m for m in MODULES if m != "mgsr" and layer_of(m) is None)
    assert not missing, f"give these modules a layer in tests/test_layering.py LAYERS: {missing}"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for importer, imported in _edges():
        if importer == "mgsr" or (importer, imported) in ALLOWED_UPWARD:
            continue
        low, high = layer_of(importer), layer_of(imported)
        assert high is not None, f"{importer} imports {imported}, which is not a module with a layer"
        if low is not None and high > low:
            upward.append(f"{importer} (layer {low}) -> {imported} (layer {high})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_allowed_upward_imports_are_still_real():
    edges = set(_edges())
    stale = sorted(pair for pair in ALLOWED_UPWARD if pair not in edges)
    assert not stale, f"no longer imported: drop them from ALLOWED_UPWARD: {stale}"
