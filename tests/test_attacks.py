"""Attack invariants: ball, box, strength ordering, per-example eps, kappa, no param grads."""
import pytest
import torch
import torch.nn as nn

from mixlab.attacks import cw_margin, fgsm, pgd, slm_margin
from mixlab.models import build_model


def tiny_model():
    torch.manual_seed(0)
    return build_model("tiny", 10, 3).eval()


def batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


ATTACKS = {
    "fgsm_linf": lambda m, x, y, eps: fgsm(m, x, y, eps=eps),
    "pgd_linf_ce": lambda m, x, y, eps: pgd(m, x, y, eps=eps, step_size=eps / 4, steps=5),
    "pgd_linf_cw": lambda m, x, y, eps: pgd(m, x, y, eps=eps, step_size=eps / 4, steps=5, loss="cw"),
    "pgd_linf_slm_restarts": lambda m, x, y, eps: pgd(m, x, y, eps=eps, step_size=eps / 4, steps=3,
                                                      loss="slm", restarts=2),
    "pgd_linf_early_stop": lambda m, x, y, eps: pgd(m, x, y, eps=eps, step_size=eps / 4, steps=5,
                                                    early_stop=True),
    "pgd_l2": lambda m, x, y, eps: pgd(m, x, y, eps=eps * 16, step_size=eps * 4, steps=5, norm="L2"),
    "fgsm_l2": lambda m, x, y, eps: fgsm(m, x, y, eps=eps * 16, norm="L2"),
}


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_invariants(name):
    model, (x, y) = tiny_model(), batch()
    y = model(x).argmax(1)  # start from correctly classified points
    eps = 8 / 255
    x_adv = ATTACKS[name](model, x, y, eps)
    delta = (x_adv - x).flatten(1)
    if "l2" in name:
        assert (delta.norm(dim=1) <= eps * 16 + 1e-5).all()
    else:
        assert delta.abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not model.training
    robust = (model(x_adv).argmax(1) == y).float().mean()
    assert robust <= 1.0  # clean accuracy is 1 by construction
    assert robust < 1.0, "the attack flipped no prediction at all on an untrained net"
    assert all(p.grad is None for p in model.parameters())


def test_model_mode_restored_and_no_param_grads():
    model, (x, y) = tiny_model(), batch()
    model.train()
    pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_pgd_at_least_as_strong_as_fgsm():
    model, (x, y) = tiny_model(), batch(64)
    y = model(x).argmax(1)
    loss = nn.CrossEntropyLoss()
    with torch.no_grad():
        l_fgsm = loss(model(fgsm(model, x, y, eps=4 / 255)), y)
        l_pgd = loss(model(pgd(model, x, y, eps=4 / 255, step_size=1 / 255, steps=10,
                               random_start=False)), y)
    assert l_pgd >= l_fgsm - 1e-4


def test_cw_attack_raises_cw_margin_more_than_ce_on_average():
    model, (x, y) = tiny_model(), batch(64)
    y = model(x).argmax(1)
    with torch.no_grad():
        m_cw = cw_margin(model(pgd(model, x, y, eps=2 / 255, step_size=0.5 / 255, steps=10,
                                   loss="cw", random_start=False)), y)
        m_ce = cw_margin(model(pgd(model, x, y, eps=2 / 255, step_size=0.5 / 255, steps=10,
                                   loss="ce", random_start=False)), y)
    assert m_cw.mean() >= m_ce.mean() - 1e-4


def test_margins_on_hand_made_logits():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    y = torch.tensor([0, 1])
    assert torch.allclose(cw_margin(logits, y), torch.tensor([-2.0, 0.0]))
    expected = torch.logsumexp(torch.tensor([1.0, 0.0]), 0) - 3.0
    assert torch.allclose(slm_margin(logits, y)[0], expected)


def test_per_example_eps():
    model, (x, y) = tiny_model(), batch(4)
    eps = torch.tensor([0.0, 1 / 255, 4 / 255, 8 / 255])
    x_adv = pgd(model, x, y, eps=eps, step_size=eps / 2, steps=3)
    linf = (x_adv - x).flatten(1).abs().amax(1)
    assert (linf <= eps + 1e-6).all()
    assert linf[0] == 0
    x_l2 = pgd(model, x, y, eps=eps * 8, step_size=eps * 2, steps=3, norm="L2")
    assert ((x_l2 - x).flatten(1).norm(dim=1) <= eps * 8 + 1e-5).all()


class Linear1D(nn.Module):
    """logits = [0, w * (x.mean() - c)]: class 1 iff mean pixel > c."""
    def __init__(self, w, c):
        super().__init__()
        self.w, self.c = w, c

    def forward(self, x):
        s = self.w * (x.flatten(1).mean(1) - self.c)
        return torch.stack([torch.zeros_like(s), s], 1)


def test_kappa_counts_correct_iterates_on_hand_made_model():
    # class 0 while mean < 0.5; each Linf step of 0.02 raises the mean by exactly 0.02
    model = Linear1D(100.0, 0.5)
    start = torch.tensor([0.45, 0.41, 0.55])  # needs 3, 5, 0 steps to cross (>= 0.5)
    x = start.reshape(3, 1, 1, 1).expand(3, 1, 4, 4).clone()
    y = torch.zeros(3, dtype=torch.long)
    _, kappa = pgd(model, x, y, eps=0.2, step_size=0.02, steps=10, random_start=False,
                   return_kappa=True)
    # iterates before steps k = 0..9 have mean start + 0.02k; correct while mean < 0.5
    assert kappa.tolist() == [3, 5, 0]


def test_early_stop_freezes_examples_once_fooled():
    model = Linear1D(100.0, 0.5)
    x = torch.full((1, 1, 4, 4), 0.45)
    y = torch.zeros(1, dtype=torch.long)
    x_adv = pgd(model, x, y, eps=0.3, step_size=0.02, steps=10, random_start=False, early_stop=True)
    # first misclassified iterate at 0.45 + 3 * 0.02 = 0.51, then it stops moving
    assert torch.allclose(x_adv.mean(), torch.tensor(0.51), atol=1e-5)


def test_bf16_autocast_channels_last_cpu_path():
    model = tiny_model().to(memory_format=torch.channels_last)
    x, y = batch(8)
    x = x.to(memory_format=torch.channels_last)
    x_adv = pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=3, bf16=True)
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6


@pytest.mark.parametrize("eps", [8, -0.1, float("nan")])
def test_bad_eps_is_one_clear_error(eps):
    model, (x, y) = tiny_model(), batch(2)
    with pytest.raises(ValueError, match="eps"):
        pgd(model, x, y, eps=eps, step_size=0.01, steps=1)


@pytest.mark.gpu
def test_pgd_on_cuda_bf16():
    model = tiny_model().cuda().to(memory_format=torch.channels_last)
    x, y = (t.cuda() for t in batch(8))
    x_adv, kappa = pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=3, return_kappa=True)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and kappa.max() <= 3
