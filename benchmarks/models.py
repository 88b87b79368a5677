"""The benchmark models: ResNet-18 and MobileNetV2 layouts (transformers configs, random
weights) and the real MiniLM-L6 sentence encoder, each at batch 1.

Random weights are re-initialized the way tests/models/onnx_models.py does (He-initialized
convs, non-trivial batchnorm statistics) so activations stay O(1) and the error columns mean
something; transformers' default init gives MobileNetV2 logits of ~1e-30.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tests.models.minilm import encoder, real_sentences, tokenize


@dataclass
class Case:
    name: str
    model: nn.Module  # eval mode, returns a tensor or a tuple of tensors
    inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    about: str  # one line for the table and the JSON
    int8: str = "static"  # graphc-int8's input quantization: static (calibrated) or dynamic
    # run(inputs) -> outputs  ->  the task's metric for that variant (None: max rel err only)
    quality: Callable[[Callable], dict] | None = None


class Logits(nn.Module):
    """A transformers image classifier returning its logits tensor only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values).logits


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.uniform_(m.bias, -0.1, 0.1)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _image(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def resnet18() -> Case:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], num_labels=1000,
                          hidden_sizes=[64, 128, 256, 512], embedding_size=64)
    torch.manual_seed(0)
    model = Logits(_randomize(ResNetForImageClassification(config))).eval()
    return Case("resnet18", model, (_image(),), ["pixel_values"],
                "ResNet-18 layout (transformers, random weights), 1x3x224x224")


def mobilenet_v2() -> Case:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(0)
    model = MobileNetV2ForImageClassification(MobileNetV2Config(image_size=224, num_labels=1000))
    return Case("mobilenet_v2", Logits(_randomize(model)).eval(), (_image(),),
                ["pixel_values"], "MobileNetV2 1.0 layout (transformers, random weights), "
                "1x3x224x224")


SENTENCE = "A compression compiler makes neural networks smaller and faster."


def minilm(seq_len: int = 128) -> Case:
    model = encoder()
    return Case("minilm_l6", model, tokenize([SENTENCE], seq_len),
                ["input_ids", "attention_mask"],
                f"all-MiniLM-L6-v2 (real weights) + mean pooling, 1 sentence padded to {seq_len}",
                int8="dynamic", quality=_sentence_quality(model, seq_len))


def _sentence_quality(model: nn.Module, seq_len: int, n: int = 200):
    """Cosine similarity of a variant's sentence embeddings to PyTorch fp32's, over n real
    sentences (tests/models/minilm.py), one at a time as the variant was compiled."""
    ids, mask = tokenize(real_sentences(n), seq_len)
    inputs = [(ids[i:i + 1], mask[i:i + 1]) for i in range(n)]
    with torch.no_grad():
        refs = [model(*x) for x in inputs]

    def quality(run) -> dict:
        cos = torch.cat([nn.functional.cosine_similarity(torch.as_tensor(run(x)[0]), r)
                         for x, r in zip(inputs, refs)])
        return {"metric": f"cosine to fp32 over {n} real sentences",
                "mean": float(cos.mean()), "min": float(cos.min())}

    return quality


MODELS: dict[str, Callable[[], Case]] = {
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "minilm_l6": minilm,
}
