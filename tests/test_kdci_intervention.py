"""The causal intervention and the distiller: formula, gradients, alpha = 0 == baseline, ablations."""

import faiss  # noqa: F401  (before torch)
import math

import pytest
import torch
from torch import nn

from kdci_ray.kdci import CausalIntervention, CompensatedStudent, Distiller, attention_entropy, total_loss
from kdci_ray.losses import KLDivergenceKD, kd_kl_div
from kdci_ray.models import create_model

C, N, B = 10, 7, 16


def dictionary(seed=0):
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(N, C, generator=g) * 3
    priors = torch.rand(N, generator=g) + 0.1
    return prototypes, priors / priors.sum()


def make(**kwargs):
    torch.manual_seed(0)
    module = CausalIntervention(C, hidden=32, **kwargs)
    module.set_dictionary(*dictionary())
    return module


def test_additive_attention_matches_the_formula():
    m = make(alpha=0.7)
    s = torch.randn(B, C)
    out = m(s)
    z, p = m.prototypes, m.priors
    # e_i = w^T tanh(W_q s + W_k z_i), written out longhand
    e = torch.stack([m.score.weight @ torch.tanh(m.query.weight @ s[b] + (m.key.weight @ z.T).T).T for b in range(B)]).squeeze(1)
    lam = torch.softmax(e, dim=1)
    f = (lam * p) @ z
    torch.testing.assert_close(out.attention, lam)
    torch.testing.assert_close(out.compensation, f)
    torch.testing.assert_close(out.logits, s + 0.7 * f)
    assert torch.allclose(out.attention.sum(1), torch.ones(B))


def test_dot_product_variant():
    m = make(attention="dot")
    assert m.score is None
    s = torch.randn(B, C)
    q, k = m.query(s), m.key(m.prototypes)
    torch.testing.assert_close(m(s).attention, torch.softmax(q @ k.T / math.sqrt(32), dim=1))


def test_uniform_attention_is_one_over_n():
    out = make(uniform_attention=True)(torch.randn(B, C))
    assert torch.equal(out.attention, torch.full((B, N), 1.0 / N))
    assert attention_entropy(out.attention).item() == pytest.approx(math.log(N), rel=1e-5)


def test_no_prior_drops_p_of_z():
    with_prior, without = make(), make(use_prior=False)
    s = torch.randn(B, C)
    a, b = with_prior(s), without(s)
    torch.testing.assert_close(a.attention, b.attention)  # same weights, same attention
    torch.testing.assert_close(b.compensation, b.attention @ without.prototypes)
    torch.testing.assert_close(a.compensation, (a.attention * with_prior.priors) @ with_prior.prototypes)


def test_random_prototypes_replace_the_dictionary_reproducibly():
    real, _ = dictionary()
    a, b = make(random_prototypes=True), make(random_prototypes=True)
    assert not torch.allclose(a.prototypes, real)
    assert torch.equal(a.prototypes, b.prototypes)
    assert a.prototypes.mean().item() == pytest.approx(real.mean().item(), abs=0.8)
    assert a.prototypes.std().item() == pytest.approx(real.std().item(), rel=0.35)


def test_dictionary_is_constant_and_swappable():
    m = make()
    assert {name for name, _ in m.named_parameters()} == {"query.weight", "key.weight", "score.weight"}
    assert "prototypes" not in m.state_dict() and "priors" not in m.state_dict()
    m.set_dictionary(torch.randn(3, C), torch.full((3,), 1 / 3))  # a rebuilt dictionary may change N
    assert m(torch.randn(B, C)).attention.shape == (B, 3)
    with pytest.raises(ValueError, match=r"\(N, 10\)"):
        m.set_dictionary(torch.randn(3, C + 1), torch.ones(3) / 3)
    with pytest.raises(RuntimeError, match="no dictionary"):
        CausalIntervention(C)(torch.randn(2, C))


class Tiny(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, C))

    def forward(self, x):
        return self.body(x)


def grads(module):
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def one_step(alpha, kdci=True):
    student, teacher = Tiny(1), Tiny(2)
    intervention = make(alpha=alpha) if kdci else None
    distiller = Distiller(student, teacher, KLDivergenceKD(temperature=4.0), intervention).train()
    x = torch.randn(B, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    out = distiller.forward_train(x)
    loss = total_loss(out.losses)
    loss.backward()
    return distiller, out, loss


def test_alpha_zero_is_exactly_the_baseline():
    base, base_out, base_loss = one_step(0.0, kdci=False)
    kdci, kdci_out, kdci_loss = one_step(0.0, kdci=True)
    assert torch.equal(base_loss, kdci_loss)
    assert torch.equal(kdci_out.compensated, base_out.logits.float())
    g_base, g_kdci = grads(base.student), grads(kdci.student)
    assert g_base.keys() == g_kdci.keys() and all(torch.equal(g_base[k], g_kdci[k]) for k in g_base)


def test_kdci_off_returns_raw_logits_as_compensated():
    _, out, _ = one_step(1.0, kdci=False)
    assert out.compensated is out.logits and out.attention is None


def test_gradients_reach_attention_and_student_but_not_the_dictionary_or_teacher():
    distiller, out, loss = one_step(1.0)
    base, base_out, _ = one_step(0.0, kdci=False)
    assert not torch.equal(out.compensated, out.logits.float())
    g = grads(distiller.intervention)
    assert set(g) == {"query.weight", "key.weight", "score.weight"} and all(v.abs().sum() > 0 for v in g.values())
    # The student's gradient differs from the baseline's: F is not detached.
    assert not torch.equal(grads(distiller.student)["body.1.weight"], grads(base.student)["body.1.weight"])
    assert not distiller.intervention.prototypes.requires_grad and distiller.intervention.prototypes.grad is None
    assert distiller.intervention.priors.grad is None
    assert all(p.grad is None and not p.requires_grad for p in distiller.teacher.parameters())
    assert distiller.teacher.training is False


def test_query_path_carries_gradient_into_the_student():
    """Gradient of F alone w.r.t. the student output: non-zero only if F is not detached."""
    m = make()
    s = torch.randn(B, C, requires_grad=True)
    m(s).compensation.sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_distiller_keeps_teacher_out_of_state_and_optimizer():
    student, teacher = Tiny(1), Tiny(2)
    distiller = Distiller(student, teacher, KLDivergenceKD(), make())
    ids = {id(p) for p in distiller.trainable_parameters()}
    assert ids == {id(p) for p in student.parameters()} | {id(p) for p in distiller.intervention.parameters()}
    assert not any(k.startswith("teacher") for k in distiller.state_dict())
    distiller.train()
    assert student.training and not teacher.training
    distiller.eval()
    x = torch.randn(4, 3, 4, 4)
    assert torch.equal(distiller(x), student(x))  # test time: the student alone
    assert torch.equal(distiller.compensated_logits(x), CompensatedStudent(student, distiller.intervention)(x))
    with pytest.raises(ValueError, match="same module"):
        Distiller(student, student, KLDivergenceKD())


def test_kd_loss_is_hinton_kl():
    s, t = torch.randn(B, C), torch.randn(B, C)
    p_t = torch.softmax(t / 4, 1)
    expected = (p_t * (p_t.log() - torch.log_softmax(s / 4, 1))).sum(1).mean() * 16
    torch.testing.assert_close(kd_kl_div(s, t, 4.0), expected)
    assert kd_kl_div(t, t, 4.0).abs().item() < 1e-6
    with pytest.raises(ValueError, match="temperature"):
        KLDivergenceKD(0)


@pytest.mark.parametrize("arch", ["resnet18", "wrn16_1"])
def test_real_students_train_through_kdci(arch):
    student = create_model(arch, num_classes=C)
    teacher = create_model("wrn16_1", num_classes=C)
    distiller = Distiller(student, teacher, KLDivergenceKD(4.0), make()).train()
    opt = torch.optim.SGD(distiller.trainable_parameters(), lr=0.05)
    x = torch.randn(8, 3, 32, 32)
    before = distiller.intervention.query.weight.clone()
    loss = total_loss(distiller(x).losses)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, distiller.intervention.query.weight)


def test_uniform_attention_freezes_the_unused_attention_weights():
    m = make(uniform_attention=True)
    assert not any(p.requires_grad for p in m.parameters())
    distiller = Distiller(Tiny(1), Tiny(2), KLDivergenceKD(), m)
    assert {id(p) for p in distiller.trainable_parameters()} == {id(p) for p in distiller.student.parameters()}


def test_intervention_computes_in_fp32_under_bf16_autocast():
    m = make()
    s = torch.randn(B, C)
    reference = m(s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(s.bfloat16())
    assert out.logits.dtype == out.compensation.dtype == out.attention.dtype == torch.float32
    # Only the input's bf16 rounding differs from the fp32 reference.
    torch.testing.assert_close(out.compensation, m(s.bfloat16().float()).compensation)
    assert (out.compensation - reference.compensation).abs().max() < 0.05


def test_kd_loss_receives_the_raw_logits_too():
    seen = {}

    def loss(student_logits, teacher_logits, raw_logits=None, **batch):
        seen["raw"], seen["student"] = raw_logits, student_logits
        return kd_kl_div(student_logits, teacher_logits)

    distiller = Distiller(Tiny(1), Tiny(2), loss, make()).train()
    out = distiller(torch.randn(B, 3, 4, 4))
    assert seen["raw"] is out.logits and seen["student"] is out.compensated and set(out.losses) == {"kd"}
