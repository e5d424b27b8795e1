"""bench/loss_scaling.py's "before" loader: a past revision's whole losses package, isolated from today's."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import loss_scaling as ls  # noqa: E402

from mgsr.losses import dac_kl_loss  # noqa: E402


def _head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def test_before_loads_a_revision_as_its_own_package():
    rev = _head()
    if rev is None:
        pytest.skip("not a git checkout")
    before = ls.load_before(rev)
    assert before is not dac_kl_loss and before.__module__ == "mgsr_before.losses.dac_kl"
    # every module it uses comes from the loaded revision, none from today's package
    fast = sys.modules["mgsr_before.losses.dac_kl"].fast
    assert fast.__name__ == "mgsr_before.losses.dac_kl_fast"
    t, s = ls.make_logits(8, 9000, "lm", torch.device("cpu"))
    mask = torch.ones(1, 8, dtype=torch.bool)
    # HEAD's committed losses: the same values as the working tree's when the tree is clean there
    clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "mgsr/losses"], cwd=REPO).returncode == 0
    if clean:
        assert torch.equal(before(t, s, mask, 0.15, 0.85).loss, dac_kl_loss(t, s, mask, 0.15, 0.85).loss)


def test_before_none_and_unknown_revisions_give_no_rows(capsys):
    assert ls.load_before("none") is None
    assert ls.load_before("0" * 40) is None
    assert "skipping the 'before' rows" in capsys.readouterr().out
