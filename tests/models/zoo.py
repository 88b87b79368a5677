"""Small models built in code, shared by the tests: each has seeded weights and an input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Fn(nn.Module):
    """A function of the inputs as a module (no weights): one op under test."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial batchnorm statistics, so folding them is really tested."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(20, 64), nn.Linear(64, 32), nn.Linear(32, 5)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(F.relu(self.fc1(x)))))


class ConvBNResidual(nn.Module):
    """Conv + batchnorm + residual adds + pooling: a tiny ResNet."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2), nn.BatchNorm2d(16))
        self.b2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 3, stride=1, padding=1)
        x = F.relu(x + self.b1(x))
        x = F.relu(self.down(x) + self.b2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DepthwiseSeparable(nn.Module):
    """MobileNet block: depthwise 3x3 + BN + ReLU6, pointwise 1x1 + BN, residual."""

    def __init__(self, c: int = 12):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn2(self.pw(F.relu6(self.bn1(self.dw(x)))))


class EncoderBlock(nn.Module):
    """Transformer encoder block: masked multi-head attention, layernorm, GELU MLP."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, mask):
        b, s, d = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
        x = self.ln1(x + self.proj(att))
        return self.ln2(x + self.ff2(F.gelu(self.ff1(x))))


def _mask(b: int, s: int) -> torch.Tensor:
    m = torch.ones(b, s, dtype=torch.int64)
    m[0, s - 3:] = 0  # padding at the end of the first sequence
    return m


# name -> (model factory, input factory); seeded so every test sees the same numbers
MODELS = {
    "mlp": (MLP, lambda: (torch.randn(4, 20),)),
    "conv_bn_residual": (ConvBNResidual, lambda: (torch.randn(2, 3, 16, 16),)),
    "depthwise_separable": (DepthwiseSeparable, lambda: (torch.randn(1, 12, 10, 10),)),
    "encoder_block": (EncoderBlock, lambda: (torch.randn(2, 7, 32), _mask(2, 7))),
}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    factory, inputs = MODELS[name]
    return randomize_batchnorm(factory()), inputs()
