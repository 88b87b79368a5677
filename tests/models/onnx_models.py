"""ONNX models for the ONNX frontend tests: transformers exports and hand-built graphs.

Weights are seeded and re-initialized so activations stay O(1) through the whole
network (transformers' default init makes MobileNetV2's logits ~1e-30, which
would let any numerical comparison pass).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from tests.models.zoo import randomize_batchnorm


def node_model(op_type: str, values: dict[str, np.ndarray | None], attrs: dict | None = None, *,
               inits: tuple[str, ...] = (), outputs: int = 1, opset: int = 17,
               domain: str = "") -> onnx.ModelProto:
    """A one-node model. values: the node's inputs in order (None = absent optional input);
    the names in `inits` become initializers, the others graph inputs."""
    names = [name if v is not None else "" for name, v in values.items()]
    node = helper.make_node(op_type, names, [f"y{i}" for i in range(outputs)],
                            name=f"the_{op_type.lower()}", domain=domain, **(attrs or {}))
    graph_inputs = {k: v for k, v in values.items() if v is not None and k not in inits}
    return graph_model([node], graph_inputs, {k: values[k] for k in inits},
                       [f"y{i}" for i in range(outputs)], opset)


def graph_model(nodes: list[onnx.NodeProto], inputs: dict[str, np.ndarray | list],
                inits: dict[str, np.ndarray], outputs: list[str], opset: int = 17,
                ) -> onnx.ModelProto:
    """A model from nodes; inputs maps a name to an example array or to a shape
    (a list that may hold dim_param strings); output types come from shape inference."""
    def input_info(name, v):
        if isinstance(v, np.ndarray):
            return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype),
                                                 v.shape)
        return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, v)

    graph = helper.make_graph(
        nodes, "test_graph", [input_info(k, v) for k, v in inputs.items()],
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, 1) for d in {n.domain for n in nodes} - {""}]
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=opsets, ir_version=8))
    for out in model.graph.output:  # ops of unknown domains: no inferred type, say float[?]
        if not out.type.HasField("tensor_type"):
            out.CopyFrom(helper.make_tensor_value_info(out.name, onnx.TensorProto.FLOAT, [None]))
    return model


def _randomize(model: nn.Module) -> nn.Module:
    """He-initialized convs and non-trivial batchnorm statistics: O(1) activations."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.uniform_(m.bias, -0.1, 0.1)
    return randomize_batchnorm(model)


class _Outputs(nn.Module):
    """A transformers model returning a plain tuple of the named outputs."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *args):
        out = self.model(*args)
        return tuple(out[k] for k in self.keys)


def resnet18() -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str]]:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], num_labels=10,
                          hidden_sizes=[64, 128, 256, 512], embedding_size=64)
    torch.manual_seed(0)
    model = _randomize(ResNetForImageClassification(config))
    return _Outputs(model, ("logits",)), (torch.randn(1, 3, 64, 64),), ["pixel_values"]


def mobilenet_v2() -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str]]:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(0)
    model = _randomize(MobileNetV2ForImageClassification(
        MobileNetV2Config(image_size=64, num_labels=10)))
    return _Outputs(model, ("logits",)), (torch.randn(1, 3, 64, 64),), ["pixel_values"]


class _Bert(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, out.pooler_output


def bert_encoder() -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str]]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                        intermediate_size=128, vocab_size=100, max_position_embeddings=32,
                        initializer_range=0.2)  # sharp attention: the mask matters
    model = BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # a padded sequence: the mask really changes the attention
    return _Bert(model), (ids, mask), ["input_ids", "attention_mask"]


class IdiomsCNN(nn.Module):
    """Exporter idioms in one small net: chunk (Split), nearest/bilinear interpolate (Resize),
    ceil-mode avg pool, adaptive pool, size-derived reshape, argmax/cumsum/max heads."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.pool = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
        self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8 * 9, 5)

    def forward(self, x):
        a, b = nn.functional.relu(self.bn(self.c1(x))).chunk(2, dim=1)
        y = self.c2(a * torch.sigmoid(b))
        y = (nn.functional.interpolate(y, scale_factor=2, mode="nearest")
             + nn.functional.interpolate(y, size=(16, 16), mode="bilinear"))
        y = nn.functional.adaptive_avg_pool2d(self.pool(y), 3)
        t = self.ln(y.flatten(2).transpose(1, 2)).reshape(x.size(0), -1)
        out = self.fc(t)
        return out.log_softmax(-1), out.argmax(-1), out.cumsum(1), out.max(dim=1).values


def idioms_cnn() -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str]]:
    torch.manual_seed(0)
    return _randomize(IdiomsCNN()), (torch.randn(2, 3, 16, 16),), ["x"]


def export(model: nn.Module, inputs: tuple, names: list[str], path, *, dynamo: bool,
           dynamic_dims: dict[int, str] | None = None) -> None:
    """torch.onnx.export with either exporter; dynamic_dims marks dims of every input dynamic."""
    kwargs = {}
    if dynamic_dims and dynamo:
        dims = {i: torch.export.Dim(n, max=64) for i, n in dynamic_dims.items()}
        kwargs["dynamic_shapes"] = {n: dims for n in names}
    elif dynamic_dims:
        kwargs["dynamic_axes"] = {n: dynamic_dims for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), inputs, str(path), input_names=names, dynamo=dynamo,
                          opset_version=None if dynamo else 17, verbose=False, **kwargs)
