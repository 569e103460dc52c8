"""No host syncs inside a training step, checked on the CPU (mixlab.sync.no_host_sync), for
every registered method, every attack and the device loader. The CUDA tests check the same
with torch.cuda.set_sync_debug_mode where a GPU exists; these run everywhere."""
import pytest
import torch
import torch.nn.functional as F

from mixlab import attacks
from mixlab.data import Batch, DeviceLoader, synthetic_dataset
from mixlab.ema import WeightAverage
from mixlab.methods import METHODS, AttackSpec, Method, get_method
from mixlab.methods.mma import anpgd
from mixlab.models import build_model
from mixlab.sync import HostSyncError, no_host_sync


@pytest.fixture
def tiny():
    model = build_model("tiny", 10, 3)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    return model, x, y


@pytest.mark.parametrize("sync", [
    lambda t, m: t.sum().item(), lambda t, m: t.tolist(), lambda t, m: bool(t.sum() > 0),
    lambda t, m: t[m], lambda t, m: t.nonzero(), lambda t, m: torch.where(m),
    lambda t, m: t.cpu(), lambda t, m: float(t.max()), lambda t, m: [1, 2][t.argmax() % 2],
    lambda t, m: t.unique(),
], ids=["item", "tolist", "if", "mask-index", "nonzero", "where1", "cpu", "float", "index",
        "unique"])
def test_the_guard_catches_each_kind_of_sync(sync):
    t = torch.rand(6)
    with pytest.raises(HostSyncError, match="host sync inside a step"), no_host_sync():
        sync(t, t > 0.5)


def test_the_guard_lets_device_side_work_through():
    t, i = torch.rand(6), torch.tensor([0, 2])
    with no_host_sync():
        out = torch.where(t > 0.5, t, -t) + t[i].sum() * (t > 0.2)
        t[i] = 0.0
    assert out.shape == (6,)
    with no_host_sync(allow=("item",)):
        t.sum().item()


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-channels-last"])
def test_every_method_step_is_free_of_host_syncs(name, bf16, tiny):
    """The engine's step (loss under autocast, backward, SGD, the weight average's update) at
    the first and last epoch, so that every schedule (GAIRAT's reweighting, FAT's tau, ...)
    is on in one of them."""
    model, x, y = tiny
    if bf16:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ema = WeightAverage(model, decay=0.999)
    # the engine's threat model, as train() passes it (3 PGD steps: enough to loop)
    method = get_method(name)(num_train=8, num_classes=10, epochs=4, attack=AttackSpec(steps=3))
    for epoch in (0, 3):
        with no_host_sync(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = method.loss(model, x, y, torch.arange(8), epoch=epoch)
        with no_host_sync():
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(model)
    assert ema.num_updates == 2


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-channels-last"])
def test_the_engine_step_with_weight_averaging_is_free_of_host_syncs(bf16, tiny):
    """``mixlab.train.train_step`` as ``train(ema_decay=...)`` runs it."""
    from mixlab.train import train_step
    model, x, y = tiny
    if bf16:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ema = WeightAverage(model, decay=0.999)
    method = get_method("pgd_at")(num_train=8, num_classes=10, epochs=1,
                                  attack=AttackSpec(steps=2))
    with no_host_sync():
        for _ in range(2):
            train_step(method, model, opt, Batch(x, y, torch.arange(8)), epoch=0, bf16=bf16,
                       ema=ema)
    assert ema.num_updates == 2


@pytest.mark.parametrize("kwargs", [
    dict(), dict(norm="L2", eps=0.5, step_size=0.1), dict(loss="cw"), dict(loss="slm"),
    dict(restarts=2), dict(early_stop=True), dict(return_kappa=True),
    dict(eps=torch.full((8,), 4 / 255), step_size=torch.full((8,), 1 / 255)),
], ids=["linf", "l2", "cw", "slm", "restarts", "early-stop", "kappa", "per-example-eps"])
def test_pgd_is_free_of_host_syncs(kwargs, tiny):
    model, x, y = tiny
    kwargs = {"eps": 8 / 255, "step_size": 2 / 255, **kwargs}
    with no_host_sync():
        attacks.pgd(model, x, y, steps=3, **kwargs)


def test_other_attacks_are_free_of_host_syncs(tiny):
    model, x, y = tiny
    with no_host_sync():
        attacks.fgsm(model, x, y, eps=8 / 255)
        attacks.early_stopped_pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=3, tau=1,
                                  return_kappa=True)
        direction = torch.randn_like(x)
        attacks.boundary_bisection(model, x, y, direction, lo=torch.zeros(8),
                                   hi=torch.ones(8), steps=4)
        anpgd(model, x, y, torch.full((8,), 0.01), norm="Linf", max_eps=0.13, steps=3,
              search_steps=4)


def test_device_loader_batches_are_free_of_host_syncs():
    loader = DeviceLoader(synthetic_dataset(64), 16, augment=True, channels_last=True,
                          generator=torch.Generator().manual_seed(0))
    with no_host_sync():
        batches = list(loader)
    assert len(batches) == 4


def test_a_method_that_syncs_is_caught(tiny):
    """What a new method's author sees when a step reads a value back."""
    class Leaky(Method):
        name = "leaky"
        defaults = {}

        def loss(self, model, x, y, idx, *, epoch):
            logits = model(x)
            correct = logits.argmax(1) == y
            # per-example weights by boolean indexing: a sync on a GPU
            return F.cross_entropy(logits[correct], y[correct]), logits

    model, x, y = tiny
    with pytest.raises(HostSyncError, match="boolean mask"), no_host_sync():
        Leaky(num_train=8, num_classes=10, epochs=1).loss(model, x, y, torch.arange(8), epoch=0)
