"""requirements.txt lists what the code imports, and the entry points carry no dead statements."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [*REPO.glob("mgsr/**/*.py"), *REPO.glob("bench/*.py"), REPO / "train.py", REPO / "evaluate.py",
           REPO / "compare.py"]
# distribution name -> import name, where they differ
IMPORT_NAME = {"hydra-core": "hydra", "rouge-score": "rouge_score"}
# needed without an import of ours: Lightning's RichProgressBar (mgsr.build.trainer.build_trainer) imports rich;
# transformers' `gguf_file=` loading (mgsr/sources.py) imports gguf
INDIRECT = {"rich", "gguf"}


def _imported_top_levels() -> set[str]:
    names = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_every_requirement_is_imported():
    reqs = [re.split(r"[<>=!~\[ ]", line.strip())[0] for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    imported = _imported_top_levels()
    unused = [r for r in reqs if r not in INDIRECT and IMPORT_NAME.get(r, r).replace("-", "_") not in imported]
    assert unused == []


def test_no_discarded_results_or_unused_loggers_in_the_entry_points():
    for path in (REPO / "train.py", REPO / "evaluate.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                f = node.value.func
                assert not (isinstance(f, ast.Attribute) and f.attr in ("dumps", "loads")), f"{path.name}:{node.lineno}"
        assigned = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert assigned <= loaded, f"{path.name}: module-level names never used: {sorted(assigned - loaded)}"
