"""prune-channels: dependency groups (residual, concat, depthwise, flatten->linear, attention
heads, FFN), weights and shape constants after pruning, PyTorch vs TVM numerics, criteria,
scopes, the report, bad options, and the digits CNN recovering its accuracy by distillation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphc
from graphc.errors import PassError
from graphc.passes.prune_groups import find_groups, format_groups
from graphc.passes.prune_slice import format_prune_report
from graphc.passes.prune_structured import prune_channels
from graphc.verify import verify
from tests.models.zoo import build, randomize_batchnorm
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)


class ConcatNet(nn.Module):
    """Two branches concatenated on channels (4 + 6), a depthwise conv, a pointwise conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.bn = nn.BatchNorm2d(10)
        self.pw = nn.Conv2d(10, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1)
        y = F.relu(self.pw(F.relu6(self.bn(self.dw(y)))))
        return self.fc(F.avg_pool2d(y, 2).flatten(1))


def _trace(name):
    m, x = build(name)
    return graphc.trace(m, x), x


def _concat():
    torch.manual_seed(0)
    return graphc.trace(randomize_batchnorm(ConcatNet()), (torch.randn(2, 3, 8, 8),))


def _group(deps, space):
    return next(g for g in deps.groups if space in g.spaces)


def _members(grp):
    return {(m.weight, m.axis): m.index.tolist() for m in grp.members}


def _same_on_tvm(g, inputs, atol=1e-4):
    cm = graphc.compile(g, target="cpu")
    with torch.no_grad():
        ref = g(*inputs)[0]
    got = torch.as_tensor(cm(*inputs))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=atol)
    return cm


def test_residual_groups_and_blocked_output():
    g, _ = _trace("conv_bn_residual")
    deps = find_groups(g)
    print(format_groups(deps))
    stream = _group(deps, "convolution")  # stem and the block's last conv meet in the add
    assert stream.spaces == ["convolution", "convolution_2"] and stream.size == 8
    assert {("b1_0_weight", 1), ("down_0_weight", 1), ("b2_0_weight", 1), ("stem_1_weight", 0),
            ("b1_4_running_var", 0), ("b1_3_bias", 0)} <= set(_members(stream))
    down = _group(deps, "convolution_3")
    assert down.spaces == ["convolution_3", "convolution_4"] and ("fc_weight", 1) in _members(down)
    head = _group(deps, "addmm")
    assert "reach the graph output" in head.blocked
    assert [g.blocked is None for g in deps.groups] == [True, True, True, False]


def test_concat_offsets_and_depthwise_joins_its_input_group():
    g = _concat()
    deps = find_groups(g)
    a, b = _group(deps, "convolution"), _group(deps, "convolution_1")
    assert _members(a)[("dw_weight", 0)] == [0, 1, 2, 3] + [-1] * 6
    assert _members(b)[("dw_weight", 0)] == [-1] * 4 + list(range(6))
    assert _members(b)[("pw_weight", 1)] == [-1] * 4 + list(range(6))
    assert ("bn_running_mean", 0) in _members(a) and ("dw_bias", 0) in _members(b)
    assert all(gr.spaces != ["convolution_2"] for gr in deps.groups)  # depthwise: no space
    p = prune_channels(g, sparsity=0.5)
    verify(p, after="prune-channels")
    w = p.weights()
    assert w["a_weight"].shape[0] == 2 and w["b_weight"].shape[0] == 3
    assert w["dw_weight"].shape == (5, 1, 3, 3) and w["pw_weight"].shape == (4, 5, 1, 1)
    dw = next(n for n in p.gm.graph.nodes if n.name == "convolution_2")
    assert dw.args[8] == 5  # the depthwise conv's groups follow its channels
    assert w["fc_weight"].shape == (5, 4 * 16)  # flatten: 16 features per kept channel
    _same_on_tvm(p, g.example_inputs)


def test_depthwise_on_the_graph_input_residual_is_unprunable():
    g, _ = _trace("depthwise_separable")
    (grp,) = find_groups(g).groups
    assert "channels meet %x" in grp.blocked
    assert prune_channels(g, sparsity=0.5) is g  # nothing to do: the input itself back


def test_flatten_then_linear_owns_h_times_w_features_per_channel():
    from tests.test_qat import DigitsCNN

    torch.manual_seed(0)
    g = graphc.trace(DigitsCNN(), (torch.randn(40, 1, 8, 8),))
    grp = _group(find_groups(g), "convolution_1")
    assert _members(grp)[("fc1_weight", 1)] == torch.arange(32).repeat_interleave(16).tolist()
    p = prune_channels(g, sparsity=0.5, include=["c2*"])
    kept = p.meta["prune"]["groups"][0]
    assert (kept["channels_before"], kept["channels_after"]) == (32, 16)
    # the kept fc1 columns are exactly the 16-feature blocks of the kept channels
    scores = (g.weights()["c2_weight"].abs().sum((1, 2, 3))
              + g.weights()["fc1_weight"].abs().sum(0).reshape(32, 16).sum(1))
    keep = sorted(scores.argsort(descending=True)[:16].tolist())
    cols = torch.tensor(keep).repeat_interleave(16) * 16 + torch.arange(16).repeat(16)
    torch.testing.assert_close(p.weights()["fc1_weight"], g.weights()["fc1_weight"][:, cols])
    torch.testing.assert_close(p.weights()["c2_bias"], g.weights()["c2_bias"][keep])


def test_attention_heads_and_ffn_of_a_transformer_block():
    g, x = _trace("encoder_block")
    chan = find_groups(g, "channel")
    assert "unit='head'" in _group(chan, "addmm").blocked  # qkv split into heads
    ffn = _group(chan, "addmm_2")
    assert ffn.blocked is None and set(_members(ffn)) == {("ff1_weight", 0), ("ff1_bias", 0),
                                                          ("ff2_weight", 1)}
    heads = _group(find_groups(g, "head"), "addmm")
    assert (heads.size, heads.unit, heads.blocked) == (4, 8, None)
    qkv = _members(heads)[("qkv_weight", 0)]  # q, k and v rows of head h: 3 blocks of 8
    assert qkv == [h for _ in range(3) for h in range(4) for _ in range(8)]
    assert _members(heads)[("proj_weight", 1)] == [h for h in range(4) for _ in range(8)]

    p = prune_channels(g, sparsity=0.5, unit="head")
    verify(p, after="prune-channels")
    assert p.weights()["qkv_weight"].shape == (48, 32)
    assert p.weights()["proj_weight"].shape == (32, 16)
    assert p.weights()["ff1_weight"].shape == (128, 32)  # unit="head": FFN left alone
    views = {n.name: list(n.args[1]) for n in p.gm.graph.nodes
             if n.target is torch.ops.aten.view.default}
    assert views["view_2"] == [2, 7, 3, 2, 8] and views["view_3"] == [4, 7, 8]
    assert views["view_9"] == [2, 7, 16]
    f = prune_channels(p, sparsity=0.25)  # then the FFN channels
    assert f.weights()["ff1_weight"].shape == (96, 32)
    _same_on_tvm(f, x)


def test_resnet_layout_groups_and_pruned_numerics():
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    cfg = ResNetConfig(layer_type="basic", depths=[1, 1], hidden_sizes=[16, 32],
                       embedding_size=16)
    model = randomize_batchnorm(ResNetModel(cfg)).eval()

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.m, self.fc = model, nn.Linear(32, 4)

        def forward(self, x):
            return self.fc(self.m(x).pooler_output.flatten(1))

    g = graphc.trace(Pooled().eval(), (torch.randn(1, 3, 32, 32),))
    deps = find_groups(g)
    sizes = sorted((len(gr.spaces), gr.size) for gr in deps.groups if not gr.blocked)
    # stage 1 stream (embedder + last conv of the block), stage 2 stream (its last conv +
    # shortcut), the first conv of each block
    assert sizes == [(1, 16), (1, 32), (2, 16), (2, 32)]
    p = prune_channels(g, sparsity=0.5)
    verify(p, after="prune-channels")
    assert p.stats()["params"] < 0.3 * g.stats()["params"]
    with torch.no_grad():
        y = p(*g.example_inputs)[0]
    assert torch.isfinite(y).all() and y.shape == (1, 4)


def test_compile_pipeline_string_report_and_tvm_numerics():
    g, x = _trace("conv_bn_residual")
    before = str(g)
    cm = graphc.compile(g, target="cpu", passes="prune-channels(sparsity=0.5, round_to=2)")
    assert str(g) == before  # the input graph is untouched
    rep = cm.meta["prune"]
    assert [r["channels_after"] for r in rep["groups"]] == [4, 4, 8]
    assert rep["graph_params"] == [3090, 942]
    text = format_prune_report(rep)
    print(text)
    assert "skipped group 3 (addmm)" in text and "3,090 -> 942" in text
    p = prune_channels(g, sparsity=0.5, round_to=2)
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(cm(*x)), p(*x)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor", "random"])
def test_each_criterion(criterion):
    g, _ = _trace("mlp")
    torch.manual_seed(1)
    data = [(torch.randn(4, 20), torch.randint(0, 5, (4,))) for _ in range(4)]
    p = prune_channels(g, sparsity=0.5, criterion=criterion, calibration=data)
    verify(p, after="prune-channels")
    assert p.weights()["fc1_weight"].shape == (32, 20)
    assert p.weights()["fc2_weight"].shape == (16, 32)
    assert p.weights()["fc3_weight"].shape == (5, 16)  # the output layer keeps its rows
    if criterion == "l2":  # kept fc1 rows: the largest sum of squares over fc1 rows + fc2 cols
        w1, w2 = g.weights()["fc1_weight"], g.weights()["fc2_weight"]
        s = w1.square().sum(1) + w2.square().sum(0)
        keep = sorted(s.argsort(descending=True)[:32].tolist())
        torch.testing.assert_close(p.weights()["fc1_weight"], w1[keep])


def test_global_scope_and_round_to():
    g, _ = _trace("mlp")
    p = prune_channels(g, sparsity=0.5, scope="global")
    after = [r["channels_after"] for r in p.meta["prune"]["groups"]]
    assert sum(after) == 48 and all(a >= 1 for a in after)  # 96 channels, half removed
    r = prune_channels(g, sparsity=0.7, round_to=8)
    assert [x["channels_after"] for x in r.meta["prune"]["groups"]] == [24, 16]
    assert prune_channels(g, sparsity=0.0) is g


def test_bad_options_are_rejected():
    g, _ = _trace("mlp")
    for bad in (1.5, -0.1, 1.0):
        with pytest.raises(PassError, match=r"prune-channels.*sparsity=.* must be in \[0, 1\)"):
            prune_channels(g, sparsity=bad)
    with pytest.raises(PassError, match="criterion='magnitude' is unknown"):
        prune_channels(g, criterion="magnitude")
    with pytest.raises(PassError, match="round_to=0"):
        prune_channels(g, round_to=0)
    with pytest.raises(PassError, match=r"'fc3\*' selects layers with no prunable channel "
                                        r"axis.*%addmm_2.*graph output"):
        prune_channels(g, include=["fc3*"])
    with pytest.raises(PassError, match="'conv9' matches no conv/linear layer"):
        prune_channels(g, include=["conv9"])


def test_digits_cnn_half_the_channels_distilled_keeps_accuracy():
    """50% of the channels of every prunable group removed from the trained digits CNN,
    then 3 epochs of distillation against the unpruned graph: within 1 point of fp32, on
    PyTorch and compiled for this CPU."""
    from tests.test_qat import _accuracy, _train_digits

    g, train, test = _train_digits()
    p = prune_channels(g, sparsity=0.5)
    assert p.stats()["params"] < 0.3 * g.stats()["params"]
    s = graphc.distill(p, g, train, epochs=3, lr=3e-3, progress=False).student
    fp32, pruned, distilled = _accuracy(g, test), _accuracy(p, test), _accuracy(s, test)
    cm = graphc.compile(s, target="cpu")
    with torch.no_grad():
        right = sum(int((torch.as_tensor(cm(xb)).argmax(1) == yb).sum()) for xb, yb in test)
    deployed = 100.0 * right / sum(len(yb) for _, yb in test)
    print(f"digits (360 held-out): fp32 {fp32:.2f}, 50% channels pruned {pruned:.2f}, "
          f"distilled {distilled:.2f}, distilled on TVM {deployed:.2f}")
    assert fp32 >= 95.0
    assert distilled >= fp32 - 1.0 and deployed >= fp32 - 1.0
