"""The sequence source's rollouts made ahead (scrg.rollout_batches = k): one decode call over k x batch prompts,
served batch by batch in the order they were made, staleness logged, and an exact resume from a mid-stock state."""

from __future__ import annotations

import pytest
import torch

from mgsr.data.collate import pad_rows
from mgsr.sequences import SequenceSource

PAD = 0
B = 2


def _prompt_batch(prompts: list[list[int]]) -> dict:
    seqs = pad_rows([(torch.tensor(p), torch.empty(0, dtype=torch.long)) for p in prompts], pad_id=PAD)
    ids, mask = seqs["prompt_ids"], seqs["prompt_attention_mask"]
    return {"prompt_ids": ids, "prompt_attention_mask": mask, "input_ids": ids}


class FakeRollout:
    """A "student" whose response to a prompt is the prompt reversed plus 99 (ragged lengths), recording calls."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, batch: dict) -> dict:
        self.calls.append(batch["prompt_ids"].shape[0])
        prompts = [row[m.bool()] for row, m in zip(batch["prompt_ids"], batch["prompt_attention_mask"])]
        P = batch["prompt_ids"].shape[1]
        R = max(len(p) for p in prompts) + 1
        ids = torch.full((len(prompts), P + R), PAD)
        attn = torch.zeros_like(ids)
        resp = torch.zeros_like(ids, dtype=torch.bool)
        ids[:, :P], attn[:, :P] = batch["prompt_ids"], batch["prompt_attention_mask"]
        for b, p in enumerate(prompts):
            r = torch.cat([p.flip(0), torch.tensor([99])])
            ids[b, P:P + len(r)], attn[b, P:P + len(r)], resp[b, P:P + len(r)] = r, 1, True
        return {"input_ids": ids, "attention_mask": attn, "response_mask": resp, "prompt_len": P}


def _responses(seqs: dict) -> list[list[int]]:
    P = seqs["prompt_len"]
    return [row[m].tolist() for row, m in zip(seqs["input_ids"][:, P:], seqs["response_mask"][:, P:])]


def _prompts(seqs: dict) -> list[list[int]]:
    P = seqs["prompt_len"]
    return [row[m.bool()].tolist() for row, m in zip(seqs["input_ids"][:, :P], seqs["attention_mask"][:, :P])]


POOL = [[10 + i, 20 + i, 30 + i][: 1 + i % 3] for i in range(40)]
BATCHES = [[[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], [[11], [12, 13]], [[14, 15], [16]], [[17], [18]]]


def test_one_decode_call_serves_k_batches_in_order():
    src = SequenceSource(rollout_batches=3, prompts=POOL, seed=1)
    rollout = FakeRollout()
    served, stale = [], []
    for step, batch in enumerate(BATCHES[:4]):
        source, seqs = src.next(_prompt_batch(batch), step=step, total=10, rollout=rollout, pad_id=PAD)
        assert source == "fresh" and seqs["input_ids"].shape[0] == B
        served.append(seqs)
        stale.append(src.schedule_logs(step, 10)["seq/staleness"])
        assert all(r == p[::-1] + [99] for r, p in zip(_responses(seqs), _prompts(seqs)))  # rows stay paired
    assert rollout.calls == [3 * B, 3 * B]  # steps 0 and 3: one call over k x batch prompts each
    assert _prompts(served[0]) == BATCHES[0] and _prompts(served[3]) == BATCHES[3]  # the batch's own prompts first
    extra = _prompts(served[1]) + _prompts(served[2])
    assert all(p in POOL for p in extra) and extra != BATCHES[1] + BATCHES[2]  # then drawn training prompts
    assert stale == [0.0, 1.0, 2.0, 0.0]  # made at step 0, served at 0, 1, 2; a fresh stock at step 3
    assert src.counts["fresh"] == 4


def test_k_equal_one_is_the_batch_itself():
    src, rollout = SequenceSource(), FakeRollout()
    _, seqs = src.next(_prompt_batch(BATCHES[0]), step=0, total=4, rollout=rollout, pad_id=PAD)
    assert rollout.calls == [B] and _prompts(seqs) == BATCHES[0]
    assert "seq/staleness" not in src.schedule_logs(0, 4)


def test_resume_mid_stock_serves_and_draws_exactly_what_the_uninterrupted_source_does(tmp_path):
    def make():
        return SequenceSource(rollout_batches=3, every_n_steps=1, prompts=POOL, seed=5)

    straight, first = make(), make()
    r1, r2 = FakeRollout(), FakeRollout()
    a = [straight.next(_prompt_batch(b), step=s, total=10, rollout=r1, pad_id=PAD)[1] for s, b in enumerate(BATCHES)]
    for s, b in enumerate(BATCHES[:2]):  # killed after step 1: one rollout still in stock
        first.next(_prompt_batch(b), step=s, total=10, rollout=r2, pad_id=PAD)
    assert len(first.pending) == 1
    torch.save(first.state_dict(), tmp_path / "src.pt")
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "src.pt", weights_only=True))
    b = [resumed.next(_prompt_batch(bt), step=s, total=10, rollout=r2, pad_id=PAD)[1]
         for s, bt in enumerate(BATCHES) if s >= 2]
    for x, y in zip(a[2:], b):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["response_mask"], y["response_mask"])
    assert r1.calls == r2.calls == [3 * B, 3 * B]


def test_rollouts_ahead_need_the_training_prompts():
    with pytest.raises(ValueError, match="rollout_batches > 1 needs the training prompts"):
        SequenceSource(rollout_batches=2)
    with pytest.raises(ValueError, match="scrg.rollout_batches must be >= 1"):
        SequenceSource(rollout_batches=0, prompts=POOL)
