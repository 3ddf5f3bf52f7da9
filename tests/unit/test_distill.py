"""Eq. 2 schedules, soft KD, and the token plumbing (no cached model needed)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from knexad.agent import distill  # noqa: E402
from knexad.agent_api import ProtocolArm  # noqa: E402


def test_schedules_grow_from_paper_start_to_end() -> None:
    assert distill.alpha_schedule(0, 10) == pytest.approx(0.2)
    assert distill.alpha_schedule(9, 10) == pytest.approx(0.5)
    assert distill.alpha_schedule(50, 10) == pytest.approx(0.5)
    assert distill.temperature_schedule(0, 10) == pytest.approx(1.5)
    assert distill.temperature_schedule(9, 10) == pytest.approx(2.5)
    seq = [distill.alpha_schedule(r, 10) for r in range(10)]
    assert seq == sorted(seq) and len(set(seq)) == 10


def test_default_arm_follows_schedule_and_arms_shift_it() -> None:
    assert distill.effective_knobs(0, ProtocolArm(), 10) == pytest.approx((0.2, 1.5))
    a, t = distill.effective_knobs(0, ProtocolArm(alpha=0.6, temperature=3.0), 10)
    assert a == pytest.approx(0.4) and t == pytest.approx(2.5)
    a, t = distill.effective_knobs(9, ProtocolArm(alpha=2.0, temperature=-9.0), 10)
    assert a == pytest.approx(0.95) and t == pytest.approx(0.1)  # clipped


def test_soft_kd_loss_zero_on_identical_and_positive_otherwise() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 11, generator=g)
    mask = torch.ones(2, 5)
    assert float(distill.soft_kd_loss(s, s.clone(), mask, 2.0)) == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(2, 5, 11, generator=g)
    assert float(distill.soft_kd_loss(s, t, mask, 2.0)) > 0
    mask0 = torch.zeros(2, 5)
    assert float(distill.soft_kd_loss(s, t, mask0, 2.0)) == 0.0
    with pytest.raises(ValueError):
        distill.soft_kd_loss(s, torch.randn(2, 5, 12), mask, 2.0)


def test_collate_masks_prompt_and_padding() -> None:
    ex = [distill.Example((1, 2, 3), (4, 5)), distill.Example((6,), (7,))]
    ids, mask, labels = distill.collate(ex, pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert labels.tolist() == [[-100, -100, -100, 4, 5], [-100, 7, -100, -100, -100]]


def test_truncate_completion() -> None:
    assert distill.truncate_completion("    return x\n    more\n", True) == "    return x\n"
    assert distill.truncate_completion("    return x", True) == "    return x\n"
    multi = "    a = 1\n    return a\n\ndef other():\n    pass\n"
    assert distill.truncate_completion(multi, False) == "    a = 1\n    return a\n"


class _TinyLM(torch.nn.Module):
    """A bigram LM with the HF call signature: enough to test the training loop."""

    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids, attention_mask=None):  # noqa: ARG002 - HF signature
        return type("Out", (), {"logits": self.emb(input_ids)})()


def test_kd_training_is_finite_and_lowers_loss_on_teacher_text() -> None:
    torch.manual_seed(0)
    model = _TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    local = [distill.Example((1, 2), (3, 4))] * 4
    kd = [distill.Example((5, 6), (7, 8))] * 4
    dev = torch.device("cpu")
    pre_kd = distill.mean_loss(model, kd, 0, dev)
    res = distill.distill(model, opt, local=local, kd=kd, val=kd, arm=ProtocolArm(), round_=9,
                          total_rounds=10, steps=40, batch_size=4, pad_id=0, device=dev, seed=0)
    assert all(torch.isfinite(torch.tensor(res.step_losses)))
    assert res.alpha == pytest.approx(0.5)
    assert res.loss_pre == pytest.approx(pre_kd)
    assert res.loss_post < 0.5 * res.loss_pre
    assert res.step_losses[-1] < res.step_losses[0]
    # LocalOnly (no KD data) does not teach the KD targets as fast
    torch.manual_seed(0)
    model2 = _TinyLM()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.05)
    res2 = distill.distill(model2, opt2, local=local, kd=[], val=kd, arm=ProtocolArm(), round_=9,
                           total_rounds=10, steps=40, batch_size=4, pad_id=0, device=dev, seed=0)
    assert res2.loss_post > res.loss_post
