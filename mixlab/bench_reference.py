"""The benchmark's ``reference`` row: PGD-10 adversarial training written the way research code
usually is, so that ``python -m mixlab.bench`` can show what mixlab's data path and attack gain.

It is transcribed from the official GAIRAT training script (Zhang et al. 2021, arXiv
2010.01736, ``GAIRAT.py`` and its ``GA_PGD``): a torchvision ``DataLoader`` with CPU transforms
(``RandomCrop(32, 4)``, ``RandomHorizontalFlip``, ``ToTensor``) over PIL images, fp32, no
channels_last, no compile, numpy noise built on the host, ``backward()`` into the model's
parameters during the attack, and a Python loop over examples counting kappa, each comparison a
device-to-host sync. Deliberately slow: nothing here is for training. ``mixlab.attacks.pgd(...,
return_kappa=True)`` is the same attack without any of these costs.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data import TensorDataset


class PILDataset(torch.utils.data.Dataset):
    """What ``torchvision.datasets.CIFAR10`` does with its data: an NHWC uint8 array, one PIL
    image per item, then the CPU transform. Wraps the same uint8 pixels the bench uses."""

    def __init__(self, ds: TensorDataset, transform):
        self.data = ds.x.cpu().permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C) uint8
        self.targets = ds.y.cpu().tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        img = self.data[i]
        img = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        return self.transform(img), self.targets[i]


def reference_loader(ds: TensorDataset, batch_size: int, workers: int, seed: int):
    """torchvision DataLoader with CPU augmentation, as in the official GAIRAT / TRADES code."""
    import torchvision.transforms as T

    size = ds.x.shape[-1]
    transform = T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    return torch.utils.data.DataLoader(
        PILDataset(ds, transform), batch_size=batch_size, shuffle=True, num_workers=workers,
        drop_last=True, generator=torch.Generator().manual_seed(seed))


def reference_pgd(model, data, target, *, eps: float, step_size: float, steps: int):
    """PGD-k with GAIRAT's kappa, transcribed from the official code's ``GA_PGD`` (Madry
    category, CE loss). Its costs are the point: numpy noise built on the host, ``backward()``
    into the model's parameters, and a Python loop over examples whose every comparison is a
    device-to-host sync. Not for use: ``mixlab.attacks.pgd(..., return_kappa=True)`` is the same
    attack without any of them."""
    model.eval()
    kappa = torch.zeros(len(data))
    noise = np.random.uniform(-eps, eps, data.shape)
    x_adv = (data.detach() + torch.from_numpy(noise).float().to(data.device)).clamp(0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_()
        output = model(x_adv)
        predict_ = output.max(1, keepdim=True)[1]
        for p in range(len(x_adv)):
            if predict_[p] == target[p]:
                kappa[p] += 1
        model.zero_grad()
        loss_adv = F.cross_entropy(output, target)
        loss_adv.backward()
        eta = step_size * x_adv.grad.sign()
        x_adv = x_adv.detach() + eta
        x_adv = torch.min(torch.max(x_adv, data - eps), data + eps).clamp(0.0, 1.0)
    return x_adv.detach(), kappa


def reference_step(model, optimizer, device, *, eps: float, step_size: float, steps: int):
    """GAIRAT.py's training step before its reweighting starts (i.e. PGD-AT): the host batch to
    the device, the attack, a fp32 step, and the running loss read with ``.item()`` (one more
    sync per step). Left out: its ``DataParallel`` wrapper and global cudnn flags, which would
    change the other rows too."""
    running_loss = 0.0

    def step(batch):
        nonlocal running_loss
        data, target = batch[0].to(device), batch[1].to(device)
        x_adv, _ = reference_pgd(model, data, target, eps=eps, step_size=step_size, steps=steps)
        model.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x_adv), target)
        running_loss += loss.item() * len(x_adv)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step
