"""Distillation loss blocks against their formulas, computed independently (numpy, torch.distributions,
F.kl_div), and the top-k teacher logit cache on disk."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slmkit.errors import SlmError
from slmkit.train.losses import (TeacherLogitCache, attention_alignment, hidden_alignment, keep_mask,
                                 token_kl, token_kl_topk, topk_teacher)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 7, generator=g) * 2
    teacher = torch.randn(2, 3, 7, generator=g) * 2
    labels = torch.tensor([[5, -100, 2], [-100, 1, 3]])
    return student, teacher, labels


def np_kl(student, teacher, t):
    """KL(softmax(teacher/t) || softmax(student/t)) per row, in float64 numpy."""
    def log_softmax(x):
        x = x.astype(np.float64) / t
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    ls, lt = log_softmax(student.numpy()), log_softmax(teacher.numpy())
    return (np.exp(lt) * (lt - ls)).sum(-1)


@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_token_kl_is_kl_div_times_t_squared_on_kept_rows(logits, t):
    student, teacher, labels = logits
    mask = keep_mask(labels)
    got = token_kl(student, teacher, temperature=t, mask=mask)
    ref = F.kl_div(F.log_softmax(student[mask] / t, -1), F.log_softmax(teacher[mask] / t, -1),
                   reduction="sum", log_target=True) * t * t
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert np.isclose(got.item(), (np_kl(student, teacher, t) * mask.numpy()).sum() * t * t, rtol=1e-5)
    dist = torch.distributions
    per = dist.kl_divergence(dist.Categorical(logits=teacher / t), dist.Categorical(logits=student / t))
    assert torch.allclose(token_kl(student, teacher, t, mask, reduction="none"), per * mask * t * t, atol=1e-5)
    assert torch.allclose(token_kl(student, teacher, t, mask, reduction="mean"), got / mask.sum())


def test_token_kl_is_zero_for_equal_logits_and_ignores_masked_positions(logits):
    student, teacher, labels = logits
    assert token_kl(teacher, teacher.clone(), temperature=3.0).abs().item() < 1e-6
    mask = keep_mask(labels)
    poisoned = student.clone()
    poisoned[~mask] = float("nan")  # what a dropped position holds must not matter
    assert torch.equal(token_kl(poisoned, teacher, 2.0, mask), token_kl(student, teacher, 2.0, mask))
    poisoned.requires_grad_()
    token_kl(poisoned, teacher, 2.0, mask).backward()  # nor its gradient
    assert torch.isfinite(poisoned.grad).all() and (poisoned.grad[~mask] == 0).all()
    assert token_kl(student, teacher, mask=torch.zeros_like(mask)).item() == 0


def test_token_kl_runs_in_float32_for_half_inputs(logits):
    student, teacher, _ = logits
    got = token_kl(student.bfloat16(), teacher.bfloat16())
    assert got.dtype == torch.float32
    assert torch.allclose(got, token_kl(student.bfloat16().float(), teacher.bfloat16().float()))


def test_token_kl_gradient_flows_to_the_student_only(logits):
    student, teacher, _ = logits
    student = student.clone().requires_grad_()
    token_kl(student, teacher, 2.0).backward()
    # d/ds of T^2 * KL(p_t || softmax(s/T)) = T * (softmax(s/T) - p_t)
    expected = 2.0 * (F.softmax(student.detach() / 2, -1) - F.softmax(teacher / 2, -1))
    assert torch.allclose(student.grad, expected, atol=1e-5)


def test_topk_with_k_equal_vocab_is_the_full_kl(logits):
    student, teacher, labels = logits
    mask = keep_mask(labels)
    values, indices = topk_teacher(teacher, k=7)
    got = token_kl_topk(student, values, indices, temperature=2.0, mask=mask)
    assert torch.allclose(got, token_kl(student, teacher, 2.0, mask), rtol=1e-5)


def test_topk_matches_its_formula(logits):
    student, teacher, labels = logits
    mask = keep_mask(labels)
    k, t = 3, 1.5
    values, indices = topk_teacher(teacher, k)
    assert torch.equal(values, teacher.sort(-1, descending=True).values[..., :k])
    # explicit: teacher renormalised on its top k; student's full-vocabulary log-probs at those ids
    total = 0.0
    for b, i in mask.nonzero().tolist():
        top = np.argsort(-teacher[b, i].numpy())[:k]
        zt = teacher[b, i].numpy()[top].astype(np.float64) / t
        p = np.exp(zt - zt.max())
        p /= p.sum()
        zs = student[b, i].numpy().astype(np.float64) / t
        log_q = zs - zs.max() - np.log(np.exp(zs - zs.max()).sum())
        total += (p * (np.log(p) - log_q[top])).sum() * t * t
    got = token_kl_topk(student, values, indices, t, mask)
    assert np.isclose(got.item(), total, rtol=1e-5)
    assert got.item() > 0
    # float16 values and int32 ids (as the cache returns them) give the same loss up to float16 rounding
    half = token_kl_topk(student, values.half(), indices.int(), t, mask)
    assert torch.allclose(half, got, rtol=1e-2)


def test_topk_loss_is_zero_only_when_the_student_matches_the_truncated_teacher():
    teacher = torch.tensor([[4.0, 3.0, -30.0, -30.0]])
    values, indices = topk_teacher(teacher, 2)
    assert token_kl_topk(teacher, values, indices).item() < 1e-6  # the tail holds ~1e-15 of the mass
    flat = torch.zeros(1, 4)  # mass spread on tokens outside the top k is penalised
    assert token_kl_topk(flat, values, indices).item() > 0.5


def test_loss_input_errors(logits):
    student, teacher, labels = logits
    with pytest.raises(SlmError, match="differ in shape"):
        token_kl(student, teacher[..., :5])
    with pytest.raises(SlmError, match="keep_mask"):
        token_kl(student, teacher, mask=labels)
    with pytest.raises(SlmError, match="temperature"):
        token_kl(student, teacher, temperature=0)
    with pytest.raises(SlmError, match="reduction"):
        token_kl(student, teacher, reduction="avg")
    with pytest.raises(SlmError, match=r"k must be an integer in \[1, 7\]"):
        topk_teacher(teacher, 8)
    values, indices = topk_teacher(teacher, 3)
    with pytest.raises(SlmError, match="outside the student's vocabulary"):
        token_kl_topk(student[..., :2], values, indices)
    with pytest.raises(SlmError, match="width is 4 and the teacher's 6"):
        hidden_alignment(torch.zeros(2, 3, 4), torch.zeros(2, 3, 6))


def test_hidden_alignment_is_mse_over_features_summed_over_kept_positions():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 6, generator=g)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    proj = nn.Linear(4, 6, bias=False)
    got = hidden_alignment(s, t, proj=proj, mask=mask)
    projected = (s @ proj.weight.T).detach().numpy()
    ref = (((projected - t.numpy()) ** 2).mean(-1) * mask.numpy()).sum()
    assert np.isclose(got.item(), ref, rtol=1e-5)
    # divided by the kept count it is F.mse_loss over the kept elements
    assert torch.allclose(got / mask.sum(), F.mse_loss(proj(s)[mask], t[mask]), rtol=1e-5)
    got.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    same = torch.randn(2, 3, 6, generator=g)
    assert hidden_alignment(same, same.clone()).item() == 0


def test_attention_alignment_is_kl_summed_over_heads_and_kept_queries():
    g = torch.Generator().manual_seed(2)
    b, h, q = 2, 3, 4
    causal = torch.ones(q, q, dtype=torch.bool).tril()
    def attn(scale):
        scores = torch.randn(b, h, q, q, generator=g) * scale
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)
    s, t = attn(1.0), attn(2.0)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    got = attention_alignment(s, t, mask)
    ref = 0.0
    for bi in range(b):
        for hi in range(h):
            for qi in range(q):
                if mask[bi, qi]:
                    n = qi + 1  # the causal keys: the others have probability 0 in both
                    ps, pt = s[bi, hi, qi, :n].double().numpy(), t[bi, hi, qi, :n].double().numpy()
                    ref += (pt * np.log(pt / ps)).sum()
    assert np.isclose(got.item(), ref, rtol=1e-5)
    assert attention_alignment(t, t.clone(), mask).abs().item() < 1e-6
    assert attention_alignment(s, t, reduction="none").shape == (b, q)
    with pytest.raises(SlmError, match="same head count"):
        attention_alignment(s[:, :2], t)


# ------------------------------------------------------------ logit cache
def test_cache_round_trips_exactly_in_float16_and_survives_reopening(tmp_path):
    g = torch.Generator().manual_seed(3)
    values, indices = topk_teacher(torch.randn(5, 50, generator=g), 4)
    values16 = values.half()
    cache = TeacherLogitCache(tmp_path / "kd", k=4)
    assert 0 not in cache and cache.get(0) is None
    cache.put(0, values16, indices)
    key = TeacherLogitCache.key_for([1, 2, 3])
    cache.put(key, values, indices)  # float32 in: stored as float16
    assert 0 in cache and key in cache and len(cache) == 2
    again = TeacherLogitCache(tmp_path / "kd")  # a fresh process reading the same folder
    assert again.k == 4
    v, i = again.get(0)
    assert v.dtype == torch.float16 and i.dtype == torch.int32
    assert torch.equal(v, values16) and torch.equal(i, indices.int())
    assert torch.equal(again[key][0], values16)
    assert key == TeacherLogitCache.key_for(torch.tensor([1, 2, 3])) != TeacherLogitCache.key_for([1, 2, 4])
    with pytest.raises(KeyError):
        again[1]
    with pytest.raises(SlmError, match="top-4 logits, asked for top-8"):
        TeacherLogitCache(tmp_path / "kd", k=8)
    with pytest.raises(SlmError, match="holds top-4"):
        again.put(1, values[:, :3], indices[:, :3])
    with pytest.raises(SlmError, match="cache key"):
        again.put("../x", values, indices)


def test_an_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    cache = TeacherLogitCache(tmp_path / "kd")
    values, indices = topk_teacher(torch.randn(3, 20), 2)
    cache.put(1, values, indices)

    def crash(src, dst):  # the process dies after writing the temporary file, before the rename
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.put(2, values, indices)
    with pytest.raises(KeyboardInterrupt):
        cache.put(1, values * 0, indices)  # an overwrite that dies keeps the old entry whole
    monkeypatch.undo()
    # a temporary file left by a hard kill is never taken for an entry
    (tmp_path / "kd" / ".i3.safetensors.abc.tmp").write_bytes(b"\x00" * 7)
    reopened = TeacherLogitCache(tmp_path / "kd")
    assert 2 not in reopened and reopened.get(2) is None and 3 not in reopened
    assert len(reopened) == 1
    assert torch.equal(reopened.get(1)[0], values.half())
    # a file truncated by something else is an error naming the file, not garbage
    (tmp_path / "kd" / "i4.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(SlmError, match="i4.safetensors is unreadable"):
        reopened.get(4)
