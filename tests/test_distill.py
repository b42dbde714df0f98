"""KD loss (lowbit.recipes.distill) against direct full-vocabulary formulas."""
import copy

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import ConfigError
from lowbit.recipes.distill import distill_loss, kd_loss


def _data(n=11, h=8, ht=6, v=50, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, dtype=torch.float64).requires_grad_()
    ws = torch.randn(v, h, generator=g, dtype=torch.float64).requires_grad_()
    th, tw = torch.randn(n, ht, generator=g, dtype=torch.float64), torch.randn(v, ht, generator=g, dtype=torch.float64)
    y = torch.randint(v, (n,), generator=g)
    return hs, ws, th, tw, y


def _reference(zs, zt, y, T, alpha):
    """alpha * T^2 * mean KL(softmax(zt/T) || softmax(zs/T)) + (1 - alpha) * mean CE(zs, y), written out."""
    p = torch.softmax(zt / T, -1)
    kl = (p * (torch.log(p) - torch.log(torch.softmax(zs / T, -1)))).sum(-1).mean()
    ce = -torch.log(torch.softmax(zs, -1)).gather(1, y[:, None]).mean()
    return alpha * T * T * kl + (1 - alpha) * ce


@pytest.mark.parametrize("T,alpha", [(1.0, 1.0), (2.0, 1.0), (2.0, 0.3), (0.7, 0.0)])
def test_online_matches_reference_value_and_grads(T, alpha):
    hs, ws, th, tw, y = _data()
    got = kd_loss(hs, ws, teacher_hidden=th, teacher_weight=tw, labels=y, temperature=T, alpha=alpha, chunk_tokens=3)
    g_got = torch.autograd.grad(got, (hs, ws))
    want = _reference(hs @ ws.t(), th @ tw.t(), y, T, alpha)
    g_want = torch.autograd.grad(want, (hs, ws))
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    if alpha == 1.0:  # torch's own KL agrees too
        ref = F.kl_div(torch.log_softmax(hs @ ws.t() / T, -1), torch.log_softmax(th @ tw.t() / T, -1),
                       log_target=True, reduction="batchmean") * T * T
        torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-6)


def test_chunk_size_does_not_change_the_loss():
    hs, ws, th, tw, y = _data(n=37)
    vals = [kd_loss(hs, ws, teacher_hidden=th, teacher_weight=tw, temperature=2.0, chunk_tokens=c) for c in (1, 5, 64)]
    for v in vals[1:]:
        torch.testing.assert_close(v, vals[0], rtol=1e-6, atol=1e-7)


def test_identical_teacher_gives_zero_kd():
    hs, ws, _, _, y = _data()
    loss = kd_loss(hs, ws, teacher_hidden=hs.detach(), teacher_weight=ws.detach(), temperature=3.0)
    assert abs(loss.item()) < 1e-6


def test_offline_topk_matches_reference():
    hs, ws, th, tw, y = _data()
    zt = th @ tw.t()
    vals, ids = zt.topk(5, -1)
    T, alpha = 1.5, 0.6
    got = kd_loss(hs, ws, topk_values=vals.half(), topk_indices=ids.int(), labels=y, temperature=T, alpha=alpha,
                  chunk_tokens=4)
    g_got = torch.autograd.grad(got, (hs, ws))
    # teacher renormalised over its top-k; student log-softmax over the full vocabulary, gathered at those ids
    v16 = vals.half().double()
    p = torch.softmax(v16 / T, -1)
    logq = torch.log_softmax(hs @ ws.t() / T, -1).gather(1, ids)
    ce = F.cross_entropy(hs @ ws.t(), y)
    want = alpha * T * T * (p * (torch.log(p) - logq)).sum(-1).mean() + (1 - alpha) * ce
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    for a, b in zip(g_got, torch.autograd.grad(want, (hs, ws))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_offline_with_the_whole_vocabulary_equals_online():
    hs, ws, th, tw, y = _data(v=20)
    zt = th @ tw.t()
    vals, ids = zt.topk(20, -1)
    off = kd_loss(hs, ws, topk_values=vals, topk_indices=ids, temperature=2.0)
    on = kd_loss(hs, ws, teacher_hidden=th, teacher_weight=tw, temperature=2.0)
    torch.testing.assert_close(off, on, rtol=1e-6, atol=1e-7)
    assert off.item() > 0


def test_vocab_mismatch_is_a_clear_error():
    hs, ws, th, tw, y = _data()
    with pytest.raises(ConfigError, match="vocabulary mismatch: teacher has 49 output tokens, student 50"):
        kd_loss(hs, ws, teacher_hidden=th, teacher_weight=tw[:-1])
    with pytest.raises(ConfigError, match="token id 50"):
        kd_loss(hs, ws, topk_values=torch.zeros(11, 2), topk_indices=torch.full((11, 2), 50))
    with pytest.raises(ValueError, match="either"):
        kd_loss(hs, ws)


def test_distill_loss_on_models_online_and_offline(one_thread):
    from lowbit.testing import make_tiny_model
    teacher, tok = make_tiny_model("llama", seed=0)
    student, _ = make_tiny_model("llama", seed=1)
    ids = torch.randint(4, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, 6:] = -100
    mask = (labels != -100).long()
    with torch.no_grad():
        zt = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
        zs = student(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    keep = labels[:, 1:] != -100
    want = _reference(zs[keep], zt[keep], labels[:, 1:][keep], 2.0, 0.5)
    got = distill_loss(student, ids, labels, mask, teacher=teacher, temperature=2.0, alpha=0.5, chunk_tokens=4)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)
    got.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    v, i = zt.float().topk(512, -1)    # the whole vocabulary: offline equals online
    off = distill_loss(student, ids, labels, mask, topk_values=v, topk_indices=i.int(), temperature=2.0, alpha=0.5)
    torch.testing.assert_close(off, got.detach(), rtol=1e-4, atol=1e-5)
    assert distill_loss(teacher, ids, labels, mask, teacher=copy.deepcopy(teacher)).abs().item() < 1e-5
    other, _ = make_tiny_model("llama", seed=0)
    other.resize_token_embeddings(520)
    with pytest.raises(ConfigError, match="vocabulary mismatch"):
        distill_loss(student, ids, labels, mask, teacher=other)
