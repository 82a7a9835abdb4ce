"""A tiny conv net with batch norm and a linear head, and deliberately naive re-implementations
of each method straight from the papers' equations (functional forward pass, explicit loops,
NumPy where no gradient is needed), to check the library against."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clinadapt.tta import TTAModel

EPS = 1e-5  # BatchNorm2d's default


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x))).mean((2, 3))


def tiny_model(seed: int = 0, classes: int = 3) -> TTAModel:
    """Random weights, source statistics far from the test batches', a sharp head."""
    torch.manual_seed(seed)
    net, head = TinyNet(), nn.Linear(6, classes)
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.3, 2.0)
            bn.weight.normal_(1, 0.3)
            bn.bias.normal_(0, 0.3)
        head.weight.mul_(6)
    return TTAModel(net, head, name="tinynet")


def tiny_batches(n: int = 3, size: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 6, 6, generator=g) * 1.5 + 0.5 for _ in range(n)]


def affine(model: TTAModel) -> list[torch.Tensor]:
    net = model.features
    return [net.bn1.weight, net.bn1.bias, net.bn2.weight, net.bn2.bias]


def _norm(h, bn, gamma, beta, stats, prior):
    shape = (1, -1, 1, 1)
    if stats == "source":
        mean, var = bn.running_mean, bn.running_var
    else:
        n = h.shape[0]
        mean = h.mean((0, 2, 3))
        var = ((h - mean.reshape(shape)) ** 2).mean((0, 2, 3))
        w = prior / (prior + n)
        mean = w * bn.running_mean + (1 - w) * mean
        var = w * bn.running_var + (1 - w) * var
    return (h - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + EPS) * gamma.reshape(
        shape
    ) + beta.reshape(shape)


def forward(model, x, params=None, stats="batch", prior=0.0):
    """(logits, features), with ``params`` (gamma1, beta1, gamma2, beta2) in place of the batch
    norms' and their statistics from the batch (mixed with ``prior`` source images) or source."""
    net, head = model.features, model.head
    g1, b1, g2, b2 = params or affine(model)
    h = F.conv2d(x, net.conv1.weight, net.conv1.bias, padding=1)
    h = torch.relu(_norm(h, net.bn1, g1, b1, stats, prior))
    h = F.conv2d(h, net.conv2.weight, net.conv2.bias, padding=1)
    z = torch.relu(_norm(h, net.bn2, g2, b2, stats, prior)).mean((2, 3))
    return z @ head.weight.T + head.bias, z


def softmax(logits):
    e = torch.exp(logits - logits.max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


def entropy(logits):
    p = softmax(logits)
    return -(p * torch.log(p)).sum(1)


class _SGD:
    """SGD with momentum 0.9 written out: b <- 0.9 b + g (b = g at first), p <- p - lr b."""

    def __init__(self, params, lr):
        self.source = [p.detach().clone() for p in params]
        self.lr = lr
        self.reset()

    def reset(self):
        self.params = [p.clone().requires_grad_(True) for p in self.source]
        self.buffers = None

    def step(self, grads):
        if self.buffers is None:
            self.buffers = [g.clone() for g in grads]
        else:
            self.buffers = [0.9 * b + g for b, g in zip(self.buffers, grads, strict=True)]
        self.params = [
            (p - self.lr * b).detach().requires_grad_(True)
            for p, b in zip(self.params, self.buffers, strict=True)
        ]


def naive_bn(model, batches, prior=0.0):
    with torch.no_grad():
        return [softmax(forward(model, x, prior=prior)[0]) for x in batches]


def naive_tent(model, batches, lr, steps=1, continual=True):
    sgd, out = _SGD(affine(model), lr), []
    for x in batches:
        if not continual:
            sgd.reset()
        for _ in range(steps):
            logits, _ = forward(model, x, sgd.params)
            sgd.step(torch.autograd.grad(entropy(logits).mean(), sgd.params))
        out.append(softmax(logits).detach())
    return out


def naive_sar(model, batches, lr, margin, rho, reset_below):
    """Returns the probabilities, the reliable mask of each batch and the number of resets."""
    sgd, out, masks, ema, resets = _SGD(affine(model), lr), [], [], None, 0
    for x in batches:
        logits, _ = forward(model, x, sgd.params)
        out.append(softmax(logits).detach())
        ent = entropy(logits)
        reliable = ent < margin
        masks.append(reliable)
        if not reliable.any():
            continue
        g = torch.autograd.grad(ent[reliable].mean(), sgd.params)
        norm = math.sqrt(sum(float((gi**2).sum()) for gi in g))
        perturbed = [
            (p + rho * gi / (norm + 1e-12)).detach().requires_grad_(True)
            for p, gi in zip(sgd.params, g, strict=True)
        ]
        ent2 = entropy(forward(model, x, perturbed)[0])[reliable]
        ent2 = ent2[ent2 < margin]
        if not len(ent2):
            continue
        sgd.step(torch.autograd.grad(ent2.mean(), perturbed))
        loss = float(ent2.detach().mean())
        ema = loss if ema is None else 0.9 * ema + 0.1 * loss
        if ema < reset_below:
            sgd.reset()
            ema, resets = None, resets + 1
    return out, masks, resets


def naive_eata(model, batches, lr, margin, d_margin, record=None):
    """Returns the probabilities and, per batch, the mask of samples that entered the loss;
    ``record`` (a list) receives each batch's cosine similarities to the moving average."""
    sgd, out, masks, average = _SGD(affine(model), lr), [], [], None
    for x in batches:
        logits, _ = forward(model, x, sgd.params)
        probs = softmax(logits)
        out.append(probs.detach())
        ent = entropy(logits)
        keep = ent < margin
        if average is not None:
            cos = torch.tensor(
                [
                    float(average @ probs[i].detach())
                    / (float(average.norm()) * float(probs[i].detach().norm()))
                    for i in range(len(x))
                ]
            )
            if record is not None:
                record.append(cos[keep])
            keep = keep & (cos.abs() < d_margin)
        masks.append(keep)
        if keep.any():
            mean = probs[keep].detach().mean(0)
            average = mean if average is None else 0.9 * average + 0.1 * mean
            weights = 1 / torch.exp(ent[keep].detach() - margin)
            sgd.step(torch.autograd.grad((ent[keep] * weights).mean(), sgd.params))
    return out, masks


def _np_softmax(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _np_entropy(logits):
    p = _np_softmax(logits)
    return -(p * np.log(p)).sum(1)


def naive_t3a(model, batches, filter_k, continual=True):
    w = model.head.weight.detach().double().numpy()
    b = model.head.bias.detach().double().numpy()
    warm_logits = w @ w.T + b
    warm = list(zip(w, warm_logits.argmax(1), _np_entropy(warm_logits), strict=True))
    supports, out = list(warm), []
    for x in batches:
        with torch.no_grad():
            z = model.features.eval()(x).double().numpy()
        logits = z @ w.T + b
        if not continual:
            supports = list(warm)
        supports += list(zip(z, logits.argmax(1), _np_entropy(logits), strict=True))
        kept = []
        for c in range(len(w)):
            members = sorted((s for s in supports if s[1] == c), key=lambda s: s[2])
            kept += members[:filter_k]
        supports = kept
        prototypes = np.zeros_like(w)
        for vector, label, _ in supports:
            prototypes[label] += vector / np.linalg.norm(vector)
        norms = np.linalg.norm(prototypes, axis=1, keepdims=True)
        prototypes = prototypes / np.where(norms > 0, norms, 1)
        out.append(_np_softmax(z @ prototypes.T))
    return out


def naive_lame(model, batches, knn, iterations=5000):
    out = []
    for x in batches:
        with torch.no_grad():
            logits, z = model.head(model.features.eval()(x)), model.features(x)
        p = _np_softmax(logits.double().numpy())
        z = z.double().numpy()
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        n = len(z)
        affinity = np.zeros((n, n))
        for i in range(n):
            distances = [(np.linalg.norm(z[i] - z[j]), j) for j in range(n) if j != i]
            for _, j in sorted(distances)[:knn]:
                affinity[i, j] = 1.0
        y = p.copy()
        for _ in range(iterations):
            y = _np_softmax(np.log(p + 1e-10) + affinity @ y)
        out.append(y)
    return out
