"""`graphc demo`: compile a small built-in CNN and show what each pass did and how fast it runs."""

from __future__ import annotations

import torch
from torch import nn

DEMO_PASSES = "fold-batchnorm, constant-folding, dead-code-elimination"


class DemoNet(nn.Module):
    """Conv + batchnorm + residual blocks, a depthwise-separable block, and a linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16),
                                nn.ReLU(), nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = self.dw(nn.functional.max_pool2d(x, 2))
        return self.head(x.mean((2, 3)))


def demo_model(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """DemoNet with seeded weights and non-trivial batchnorm statistics, and its input."""
    torch.manual_seed(seed)
    model = DemoNet().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model, (torch.randn(1, 3, 32, 32),)


def run_demo(target: str = "cpu") -> None:
    import graphc
    from graphc.pipeline import output_error

    model, inputs = demo_model()
    print(f"compiling DemoNet for target={target} with passes: {DEMO_PASSES}")
    cm = graphc.compile(model, inputs, target=target, passes=DEMO_PASSES)
    print(cm.report())
    with torch.no_grad():
        ref = model(*inputs)
    abs_err, _ = output_error((cm(*inputs),), (ref,))
    print(f"max abs error vs PyTorch: {abs_err:.2e}")
    ours = cm.benchmark(repeat=50)["median"]
    eager = torch_latency_ms(model, inputs, repeat=50)
    print(f"latency, median of 50: graphc ({cm.target}) {ours:.3f} ms, "
          f"PyTorch eager {eager:.3f} ms ({ours / eager:.2f}x PyTorch's time)")


def torch_latency_ms(model, inputs, repeat: int = 50, warmup: int = 5) -> float:
    """Median eager PyTorch latency in ms, measured like CompiledModel.benchmark."""
    import time

    samples = []
    with torch.no_grad():
        for i in range(warmup + repeat):
            start = time.perf_counter()
            model(*inputs)
            if i >= warmup:
                samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[len(samples) // 2]
