"""Attack invariants: ball, box, strength ordering, per-example eps, kappa, no param grads."""
import pytest
import torch
import torch.nn as nn

from mixlab.attacks import check_eps, cw_margin, early_stopped_pgd, fgsm, pgd, slm_margin
from mixlab.models import build_model
from mixlab.sync import no_host_sync


def tiny_model():
    torch.manual_seed(0)
    return build_model("tiny", 10, 3).eval()


def batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


ATTACKS = {
    "fgsm_linf": lambda m, x, y, eps: fgsm(m, x, y, eps=eps),
    "pgd_linf_ce": lambda m, x, y, eps: pgd(m, x, y, eps=eps, step_size=eps / 4, steps=5),
    "pgd_linf_cw": lambda m, x, y, eps: pgd(m, x, y, eps=eps, step_size=eps / 4, steps=5,
                                            loss="cw"),
    "pgd_linf_slm_restarts": lambda m, x, y, eps: pgd(m, x, y, eps=eps, step_size=eps / 4, steps=3,
                                                      loss="slm", restarts=2),
    "pgd_linf_early_stop": lambda m, x, y, eps: pgd(m, x, y, eps=eps, step_size=eps / 4, steps=5,
                                                    early_stop=True),
    "pgd_l2": lambda m, x, y, eps: pgd(m, x, y, eps=eps * 16, step_size=eps * 4, steps=5,
                                       norm="L2"),
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


# ----------------------------------------------------------------------------- boundary checks
def _valid():
    model, (x, y) = tiny_model(), batch(4)
    return model, x, y, dict(eps=8 / 255, step_size=2 / 255, steps=2)


BAD_PGD = {  # name: (overrides of a valid pgd call, exception, message regex)
    "uint8 x": (lambda x, y: dict(x=(x * 255).to(torch.uint8)), TypeError,
                r"torch\.uint8.*x\.float\(\) / 255"),
    "int64 x": (lambda x, y: dict(x=x.long()), TypeError, r"torch\.int64.*x\.float\(\)"),
    "1-D x": (lambda x, y: dict(x=x.flatten()), ValueError, r"shape \(12288,\).*batch"),
    "list y": (lambda x, y: dict(y=y.tolist()), TypeError, r"y must be a torch\.Tensor"),
    "int32 y": (lambda x, y: dict(y=y.int()), TypeError, r"torch\.int32.*y\.long\(\)"),
    "soft y": (lambda x, y: dict(y=torch.rand(4, 10)), TypeError, r"float32.*hard labels"),
    "short y": (lambda x, y: dict(y=y[:3]), ValueError, r"shape \(3,\).*\(4,\)"),
    "eps nan": (lambda x, y: dict(eps=float("nan")), ValueError, r"eps=nan"),
    "eps inf L2": (lambda x, y: dict(eps=float("inf"), norm="L2"), ValueError, r"eps=inf"),
    "eps 0": (lambda x, y: dict(eps=0.0), ValueError, r"eps must be > 0, got eps=0\.0"),
    "eps str": (lambda x, y: dict(eps="8/255"), TypeError, r"str '8/255'"),
    "eps shape": (lambda x, y: dict(eps=torch.full((3,), 0.03)), ValueError,
                  r"shape \(4,\).*got shape \(3,\)"),
    "eps tensor nan": (lambda x, y: dict(eps=torch.tensor([0.03, float("nan"), 0.03, 0.03])),
                       ValueError, r"per-example eps must be finite"),
    "step nan": (lambda x, y: dict(step_size=float("nan")), ValueError, r"step_size=nan"),
    "step 0": (lambda x, y: dict(step_size=0), ValueError,
               r"step_size must be > 0, got step_size=0 .*random start"),
    "step < 0": (lambda x, y: dict(step_size=-0.01), ValueError, r"step_size=-0\.01"),
    "steps 0": (lambda x, y: dict(steps=0), ValueError, r"steps must be >= 1, got steps=0"),
    "steps float": (lambda x, y: dict(steps=10.0), TypeError, r"steps.*float 10\.0"),
    "restarts 0": (lambda x, y: dict(restarts=0), ValueError, r"restarts must be >= 1"),
    "norm": (lambda x, y: dict(norm="linf"), ValueError, r"'linf'.*'Linf', 'L2'"),
    "loss": (lambda x, y: dict(loss="xent"), ValueError, r"'xent'.*'ce', 'cw', 'slm'"),
    "x outside [0, 1]": (lambda x, y: dict(x=x * 3 - 1), ValueError,
                         r"x has values in \[-1, 2\]"),
    "x 0-255": (lambda x, y: dict(x=x * 255), ValueError, r"divide by 255"),
    "label -1": (lambda x, y: dict(y=torch.tensor([0, -1, 2, 3])), ValueError, r"label -1"),
    "label 10": (lambda x, y: dict(y=torch.tensor([0, 10, 2, 3])), ValueError,
                 r"label 10 but the model outputs 10 classes"),
}


def _with_range(x):
    """x with exact 0 and 1 present, so the reported range is exact."""
    x = x.clone()
    x.view(-1)[0], x.view(-1)[1] = 0.0, 1.0
    return x


@pytest.mark.parametrize("case", BAD_PGD)
def test_pgd_boundary_errors(case):
    model, x, y, kwargs = _valid()
    override, exc, match = BAD_PGD[case]
    call = {"x": _with_range(x), "y": y, **kwargs}
    call.update(override(call["x"], y))
    with pytest.raises(exc, match=match):
        pgd(model, call.pop("x"), call.pop("y"), **call)


@pytest.mark.parametrize("call, exc, match", [
    (lambda m, x, y: fgsm(m, x, y, eps=0), ValueError, r"eps must be > 0"),
    (lambda m, x, y: fgsm(m, (x * 255).byte(), y, eps=8 / 255), TypeError, r"uint8"),
    (lambda m, x, y: fgsm(m, x, y, eps=8 / 255, loss="hinge"), ValueError, r"'hinge'"),
    (lambda m, x, y: early_stopped_pgd(m, x, y, eps=8 / 255, step_size=float("nan"), steps=3),
     ValueError, r"step_size=nan"),
    (lambda m, x, y: early_stopped_pgd(m, x, y, eps=8 / 255, step_size=0.0, steps=3),
     ValueError, r"step_size must be > 0"),
    (lambda m, x, y: early_stopped_pgd(m, x, y, eps=8 / 255, step_size=2 / 255, steps=3,
                                       tau=-1), ValueError, r"tau.*-1"),
    (lambda m, x, y: early_stopped_pgd(m, x, y, eps=8 / 255, step_size=2 / 255, steps=3,
                                       tau=1.5), TypeError, r"tau.*float 1\.5"),
    (lambda m, x, y: early_stopped_pgd(m, x, y, eps=8 / 255, step_size=2 / 255, steps=3,
                                       omega=float("nan")), ValueError, r"omega=nan"),
    (lambda m, x, y: early_stopped_pgd(m, x, y, eps=8 / 255, step_size=2 / 255, steps=3,
                                       loss=cw_margin), ValueError, r"unknown attack loss"),
    (lambda m, x, y: early_stopped_pgd(m, x * 3 - 1, y, eps=8 / 255, step_size=2 / 255,
                                       steps=3), ValueError, r"x has values in"),
    (lambda m, x, y: early_stopped_pgd(m, x, y + 10, eps=8 / 255, step_size=2 / 255, steps=3),
     ValueError, r"but the model outputs 10 classes"),
], ids=["fgsm-eps0", "fgsm-uint8", "fgsm-loss", "fat-step-nan", "fat-step0", "fat-tau<0",
        "fat-tau-float", "fat-omega-nan", "fat-callable-loss", "fat-range", "fat-labels"])
def test_fgsm_and_early_stopped_pgd_boundary_errors(call, exc, match):
    model, x, y, _ = _valid()
    with pytest.raises(exc, match=match):
        call(model, x, y)


def test_check_eps_keeps_allowing_zero_and_checks_cpu_tensors():
    check_eps(0.0)  # AMP's eps = 0 (λ-only) and the curves' eps = 0 point rely on it
    check_eps(torch.zeros(4))
    with pytest.raises(ValueError, match="eps must be > 0"):
        check_eps(0.0, positive=True)
    with pytest.raises(ValueError, match=r"per-example eps must be finite and >= 0"):
        check_eps(torch.tensor([0.1, -0.1]))


def test_pixels_a_rounding_error_outside_the_box_are_fine():
    """Mixing two [0, 1] images in fp32 can land 1e-7 outside; that is not a caller's bug."""
    model, x, y, kwargs = _valid()
    lam = torch.rand(4, 1, 1, 1)
    mixed = lam * x + (1 - lam) * torch.ones_like(x)
    mixed.view(-1)[0] = 1 + 1e-7
    pgd(model, mixed, y, **kwargs)


def test_value_checks_are_skipped_inside_the_sync_guard_but_metadata_checks_are_not():
    """Inside no_host_sync (a GPU step stood in for by the CPU) a check that reads values
    would be a host sync; only the free checks run there, as on a GPU."""
    model, x, y, kwargs = _valid()
    with no_host_sync():
        pgd(model, x * 3 - 1, y, **kwargs)  # out of range, but reading it would sync
        with pytest.raises(TypeError, match="uint8"):
            pgd(model, (x * 255).byte(), y, **kwargs)
        with pytest.raises(ValueError, match="step_size=nan"):
            pgd(model, x, y, eps=8 / 255, step_size=float("nan"), steps=2)
