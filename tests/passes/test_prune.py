"""prune: exact sparsity per layer and globally, criteria, N:M patterns, masks that survive
training, fold-prune-masks, schedules, fine-tuning vs rewinding, and the digits CNN at 80%."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphc
from graphc.errors import PassError
from graphc.passes.prune import prune
from graphc.passes.prune_criteria import (
    effective_weight,
    prunable_weights,
    weight_scores,
)
from graphc.passes.prune_masks import fold_prune_masks
from graphc.passes.prune_schedule import sparsity_schedule
from tests.models.zoo import build
from tests.single_thread import one_torch_thread, single_thread  # noqa: F401  (autouse)
from tests.test_qat import _accuracy, _train_digits

aten = torch.ops.aten
KEY = "prune-unstructured"


@pytest.fixture(scope="module")
def digits():
    with single_thread():
        return _train_digits()


def _eff(g) -> dict[str, torch.Tensor]:
    return {pw.name: effective_weight(g, pw) for pw in prunable_weights(g)}


def _zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


def _masks(g) -> dict[str, torch.Tensor]:
    return {k: (v != 0) for k, v in _eff(g).items()}


# ---- sparsity ------------------------------------------------------------------------------
def test_layer_sparsity_is_exact_and_the_input_is_untouched():
    m, x = build("conv_bn_residual")
    g = graphc.trace(m, x)
    before = {k: v.clone() for k, v in g.weights().items()}
    p, _ = graphc.run_pipeline(g, "prune(sparsity=0.6)", check=True)
    for name, w in _eff(p).items():
        assert _zeros(w) == round(0.6 * w.numel()), name
        kept, dropped = w[w != 0].abs(), before[name][w == 0].abs()
        assert kept.min() >= dropped.max(), name  # l1: the smallest magnitudes went
    assert all(torch.equal(v, before[k]) for k, v in g.weights().items())
    assert "prune_masks" not in g.meta and "mul.Tensor" not in str(g)
    assert str(p).count("aten.mul.Tensor") == 6  # one mask multiply per weight
    torch.testing.assert_close(p(*x)[0], _dense_with(m, x, _eff(p)))
    rows = {r["weight_name"]: r for r in p.meta[KEY]["layers"]}
    assert rows["b2_0_weight"]["nonzero_before"] == 16 * 8 * 9
    assert rows["b2_0_weight"]["nonzero_after"] == 16 * 8 * 9 - round(0.6 * 16 * 8 * 9)


def _dense_with(m, x, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The nn.Module's output with its weights replaced (names: dots -> underscores)."""
    state = {k: v for k, v in m.state_dict().items()}
    for k in state:
        if k.replace(".", "_") in weights:
            state[k] = weights[k.replace(".", "_")]
    with torch.no_grad():
        return torch.func.functional_call(m, state, x)


def test_global_sparsity_is_exact_with_one_threshold():
    m, x = build("encoder_block")
    g = graphc.trace(m, x)
    p = prune(g, sparsity=0.7, scope="global", normalize="none")
    eff, orig = _eff(p), g.weights()
    total = sum(w.numel() for w in eff.values())
    assert sum(_zeros(w) for w in eff.values()) == round(0.7 * total)
    kept = torch.cat([w[w != 0].abs() for w in eff.values()])
    dropped = torch.cat([orig[k][w == 0].abs() for k, w in eff.items()])
    assert kept.min() >= dropped.max()  # one magnitude threshold over every layer
    per_layer = {r["weight_name"]: r["sparsity"] for r in p.meta[KEY]["layers"]}
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05  # not layer-wise


def test_global_lamp_never_empties_a_layer():
    m, x = build("mlp")
    g = graphc.trace(m, x)
    none = prune(g, sparsity=0.97, scope="global", normalize="none")
    lamp = prune(g, sparsity=0.97, scope="global")  # normalize="lamp" is the default
    total = sum(w.numel() for w in _eff(g).values())
    for p in (none, lamp):
        assert sum(_zeros(w) for w in _eff(p).values()) == round(0.97 * total)
    assert all(int((w != 0).sum()) >= 1 for w in _eff(lamp).values())
    assert any(int((w != 0).sum()) == 0 for w in _eff(none).values())  # what lamp prevents
    print("97% global, nonzero per layer: none", {k: int((w != 0).sum())
                                                 for k, w in _eff(none).items()},
          "lamp", {k: int((w != 0).sum()) for k, w in _eff(lamp).items()})


def test_include_exclude_select_layers():
    m, x = build("mlp")
    g = graphc.trace(m, x)
    p = prune(g, sparsity=0.5, include=["fc*_weight"], exclude=["addmm_2"])
    assert [r["weight_name"] for r in p.meta[KEY]["layers"]] == ["fc1_weight", "fc2_weight"]
    assert _zeros(_eff(p)["fc3_weight"]) == 0
    assert prune(g, sparsity=0.5, include=["nothing*"]) is g
    assert prune(g, sparsity=0.0) is g  # nothing pruned: unchanged
    p = prune(g, sparsity=0.5)
    assert prune(p, sparsity=0.5) is p and prune(p, sparsity=0.3) is p  # masks only grow


# ---- criteria ------------------------------------------------------------------------------
def _digits_linear():
    """A linear classifier on flattened digits: its corner pixels are 0 in every image."""
    from sklearn.datasets import load_digits

    d = load_digits()
    xs = torch.tensor(d.data[:400], dtype=torch.float32) / 16
    ys = torch.tensor(d.target[:400])
    torch.manual_seed(0)
    m = nn.Linear(64, 10)
    data = [(xs[i:i + 40], ys[i:i + 40]) for i in range(0, 400, 40)]
    return m, graphc.trace(m, (xs[:40],)), data, xs


def test_taylor_is_w_times_grad_and_ignores_dead_inputs():
    m, g, data, xs = _digits_linear()
    scores = weight_scores(g, "taylor", data=data)["weight"]
    ref = torch.zeros(10, 64)
    for xb, yb in data:
        m.zero_grad()
        F.cross_entropy(m(xb), yb).backward()
        ref += (m.weight * m.weight.grad).abs().detach()
    torch.testing.assert_close(scores, ref)
    dead = (xs == 0).all(0)  # pixels that are 0 in every image: no gradient reaches them
    assert dead.sum() >= 3
    assert (scores[:, dead] == 0).all() and (weight_scores(g, "l1")["weight"][:, dead] > 0).all()
    frac = float(dead.sum()) / 64  # as many entries as the dead pixels' weights
    pt = prune(g, sparsity=frac, criterion="taylor", calibration=data)
    pl = prune(g, sparsity=frac)
    assert (_eff(pt)["weight"][:, dead] == 0).all()  # taylor drops them first, l1 does not
    assert (_eff(pl)["weight"][:, dead] != 0).any()
    assert m.weight.grad is not None and g.gm.weight.grad is None  # the graph got no grads


def test_taylor_with_a_custom_loss_and_unlabelled_data():
    _, g, data, _ = _digits_linear()
    inputs = [xb for xb, _ in data]
    s = weight_scores(g, "taylor", data=inputs, loss=lambda out: out.square().mean())
    assert s["weight"].shape == (10, 64) and s["weight"].sum() > 0
    with pytest.raises(PassError, match="without labels and no loss"):
        weight_scores(g, "taylor", data=inputs)


def test_l2_ranks_as_l1_and_random_is_seeded():
    m, x = build("mlp")
    g = graphc.trace(m, x)
    assert all(torch.equal(a, b) for a, b in zip(_masks(prune(g, sparsity=0.5)).values(),
                                                  _masks(prune(g, sparsity=0.5,
                                                               criterion="l2")).values()))
    r0, r0b, r1 = (_masks(prune(g, sparsity=0.5, criterion="random", seed=s)) for s in (0, 0, 1))
    assert all(torch.equal(r0[k], r0b[k]) for k in r0)
    assert any(not torch.equal(r0[k], r1[k]) for k in r0)


def test_random_is_worse_than_l1_on_the_digits_cnn(digits):
    g, _, test = digits
    l1 = _accuracy(prune(g, sparsity=0.6), test)
    rnd = [_accuracy(prune(g, sparsity=0.6, criterion="random", seed=s), test) for s in range(3)]
    print(f"digits CNN at 60% per layer, no fine-tuning: l1 {l1:.2f}, random {rnd}")
    assert all(r < l1 - 10 for r in rnd)


# ---- N:M -----------------------------------------------------------------------------------
def test_2_4_keeps_the_two_largest_of_every_group_along_the_input_axis():
    m, x = build("conv_bn_residual")
    g = graphc.trace(m, x)
    p = prune(g, structure="2:4", exclude=["stem_0_weight", "fc_weight"])
    orig = g.weights()
    eff = _eff(p)
    for name in ("b1_0_weight", "down_0_weight", "b2_0_weight"):
        w, o = eff[name].movedim(1, -1).reshape(-1, 4), orig[name].movedim(1, -1).reshape(-1, 4)
        assert ((w != 0).sum(1) == 2).all(), name
        top2 = o.abs().topk(2, dim=1).indices
        assert torch.equal((w != 0), torch.zeros_like(w, dtype=torch.bool).scatter(1, top2, True))
    assert p.meta[KEY]["target"] == 0.5 and p.meta[KEY]["sparsity"] == 0.5


class _MatmulStoredInOut(nn.Module):
    """A weight stored [in, out] and used as x @ W: its input axis is dim 0."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8))

    def forward(self, x):
        return x @ self.w


def test_2_4_follows_the_reduction_axis_through_the_graph():
    m = _MatmulStoredInOut()
    g = graphc.trace(m, (torch.randn(3, 16),))
    (pw,) = prunable_weights(g)
    assert pw.reduction_dim == 0
    w = _eff(prune(g, structure="1:4"))["w"]
    assert ((w.T.reshape(8, 4, 4) != 0).sum(-1) == 1).all()  # groups run down the columns


def test_2_4_rejects_a_layer_whose_input_axis_is_not_a_multiple_of_4(digits):
    g = digits[0]
    with pytest.raises(PassError, match=r"'c1_weight' of %convolution .*has 1 entries, not "
                                        r"a multiple of 4.*exclude=\['convolution'\]"):
        prune(g, structure="2:4")
    p = prune(g, structure="2:4", exclude=["convolution"])
    assert [r["sparsity"] for r in p.meta[KEY]["layers"]] == [0.5, 0.5, 0.5]


# ---- options -------------------------------------------------------------------------------
@pytest.mark.parametrize("opts, message", [
    ({"sparsity": 1.5}, r"sparsity=1.5 must be a fraction of zeros in \[0, 1\)"),
    ({"sparsity": -0.2}, r"sparsity=-0.2 must be"),
    ({"criterion": "hessian"}, r"criterion='hessian' is unknown; choose from \['l1'"),
    ({"criterion": "taylor"}, r"criterion 'taylor' needs data"),
    ({"structure": "4:2"}, r"structure='4:2' is unknown"),
    ({"structure": "2:4", "sparsity": 0.8}, r"keeps 2 of every 4 .* contradicts"),
    ({"structure": "2:4", "scope": "global"}, r"scope='global' does not apply"),
    ({"scope": "net"}, r"scope='net' is unknown"),
])
def test_bad_options_are_rejected(opts, message):
    m, x = build("mlp")
    with pytest.raises(PassError, match=message):
        prune(graphc.trace(m, x), **opts)


def test_pipeline_strings_check_option_values():
    m, x = build("mlp")
    with pytest.raises(PassError, match=r"criterion='hessian' must be one of"):
        graphc.run_pipeline(graphc.trace(m, x), "prune(criterion=hessian)")


def test_channels_delegates_to_prune_channels():
    from graphc.passes.prune_structured import prune_channels

    m, x = build("mlp")
    g = graphc.trace(m, x)
    a = prune(g, structure="channels", sparsity=0.5)
    b = prune_channels(g, sparsity=0.5)
    assert str(a) == str(b) and str(a) != str(g)


# ---- masks through training, folding -------------------------------------------------------
def test_masks_survive_distillation_and_training(digits):
    g, train, _ = digits
    p = prune(g, sparsity=0.8)
    pruned = {k: w == 0 for k, w in _eff(p).items()}
    r = graphc.distill(p, g, train[:20], epochs=2, lr=1e-3, progress=False)
    q = graphc.qat.train(p, train[:20], epochs=1, lr=1e-3)
    losses = r.student.meta["distill"]["epoch_losses"]
    assert losses[1] < losses[0]
    for t in (r.student, q):
        for k, w in _eff(t).items():
            assert (w[pruned[k]] == 0).all() and _zeros(w) == round(0.8 * w.numel()), k
            raw = t.gm.get_parameter(k)  # the parameter itself stays 0 there too (Adam: no grad)
            assert (raw[pruned[k]] == 0).all()
        changed = [k for k, w in _eff(t).items() if not torch.equal(w, _eff(p)[k])]
        assert len(changed) == 4  # the survivors did train


def test_fold_prune_masks_leaves_plain_sparse_weights():
    m, x = build("conv_bn_residual")
    g = graphc.trace(m, x)
    p = prune(g, sparsity=0.5)
    f, _ = graphc.run_pipeline(p, "fold-prune-masks", check=True)
    assert "mul.Tensor" not in str(f) and "prune_masks" not in f.meta
    assert not [n for n in dict(f.gm.named_buffers()) if n.endswith("_mask")]
    assert f.stats()["params"] == g.stats()["params"]
    torch.testing.assert_close(f(*x)[0], p(*x)[0], rtol=0, atol=0)
    for k, w in _eff(p).items():
        assert torch.equal(f.weights()[k], w)
    assert fold_prune_masks(g) is g and KEY in f.meta


def test_compile_carries_the_report(tmp_path):
    m, x = build("mlp")
    cm = graphc.compile(m, x, target="torch", passes="prune(sparsity=0.5), fold-prune-masks")
    assert cm.meta[KEY]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    torch.testing.assert_close(torch.as_tensor(cm(*x)),
                               prune(graphc.trace(m, x), sparsity=0.5)(*x)[0])


# ---- schedules and iterative pruning -------------------------------------------------------
def test_schedules():
    cubic = sparsity_schedule(0.8, 4, "cubic")
    assert cubic == pytest.approx([0.8 * (1 - (1 - k / 4) ** 3) for k in (1, 2, 3, 4)])
    assert cubic == pytest.approx([0.4625, 0.7, 0.7875, 0.8])
    assert sparsity_schedule(0.8, 4, "linear") == pytest.approx([0.2, 0.4, 0.6, 0.8])
    geo = sparsity_schedule(0.9, 3, "geometric", initial=0.5)
    survivors = [0.5] + [1 - s for s in geo]
    ratios = [b / a for a, b in itertools.pairwise(survivors)]
    assert ratios == pytest.approx([0.2 ** (1 / 3)] * 3) and geo[-1] == 0.9
    assert sparsity_schedule(0.8, 2, "cubic", initial=0.5) == pytest.approx([0.7625, 0.8])
    for bad, msg in (((0.8, 0), "steps=0"), ((1.0, 3), "target_sparsity=1.0"),
                     ((0.8, 3, "exp"), "schedule='exp' is unknown")):
        with pytest.raises(PassError, match=msg):
            sparsity_schedule(*bad)


def _spy(seen: list, data):
    """A train fn that records the weights it is given and the weights it trained."""
    def train(g):
        t = graphc.qat.train(g, data, epochs=1, lr=1e-3)
        seen.append(({k: v.detach().clone() for k, v in g.gm.named_parameters()},
                     {k: v.detach().clone() for k, v in t.gm.named_parameters()}))
        return t
    return train


def test_rewinding_restores_the_checkpoint_for_survivors(digits):
    g, train, _ = digits
    early = {k: torch.randn_like(v) for k, v in g.gm.named_parameters()}  # a "checkpoint"
    seen: list = []
    r = graphc.prune_iteratively(g, train, target_sparsity=0.75, steps=3, schedule="linear",
                                 train=_spy(seen, train[:5]), rewind=early)
    assert [s["sparsity"] for s in r.steps] == pytest.approx([0, 0.25, 0.5, 0.75], abs=1e-3)
    masks = r.graph.meta["prune_masks"]
    for step, (got, _) in enumerate(seen):
        for k, v in got.items():
            want = early[k]
            if k in masks:  # pruned entries 0, survivors exactly the checkpoint's
                assert _zeros(v) == round([0.25, 0.5, 0.75][step] * v.numel()), (step, k)
                want = want * (v != 0)
            assert torch.equal(v, want), (step, k)
    # without rewinding, each step starts from the weights the previous step trained
    seen2: list = []
    graphc.prune_iteratively(g, train, target_sparsity=0.75, steps=3, schedule="linear",
                             train=_spy(seen2, train[:5]), rewind="none")
    w0, w1 = seen2[0][0]["fc1_weight"], seen2[1][0]["fc1_weight"]
    assert torch.equal(w0, g.weights()["fc1_weight"] * (w0 != 0))
    assert torch.equal(w1, seen2[0][1]["fc1_weight"] * (w1 != 0))
    assert not torch.equal(w1, early["fc1_weight"] * (w1 != 0))


def test_prune_iteratively_rejects_bad_arguments(digits):
    g, train, _ = digits
    for kw, msg in (({"rewind": "late"}, "rewind='late' is unknown"),
                    ({"rewind": {"c1_weight": torch.zeros(1)}}, (r"'c1_weight' is \[1\], the "
                                                                 r"graph's is \[16, 1, 3, 3\]")),
                    ({"rewind": {}}, "checkpoint has no 'c1_weight' .weight of %convolution"),
                    ({"structure": "2:4"}, "schedules apply to unstructured"),
                    ({"sparsity": 0.5}, "give target_sparsity"),
                    ({"train": lambda h: h.gm}, r"train\(\) returned DigitsCNN; it must return")):
        with pytest.raises(PassError, match=msg):
            graphc.prune_iteratively(g, train[:2], steps=1, **kw)


# ---- the target: digits CNN at 80% with fine-tuning ----------------------------------------
def test_digits_80_percent_with_fine_tuning_keeps_accuracy(digits):
    g, train, test = digits
    fp32 = _accuracy(g, test)
    layer = prune(g, sparsity=0.8)
    glob = prune(g, sparsity=0.8, scope="global")
    torch.manual_seed(0)
    ft_layer = graphc.distill(layer, g, train, epochs=5, lr=1e-3, progress=False).student
    ft_glob = graphc.distill(glob, g, train, epochs=3, lr=1e-3, progress=False).student
    it = graphc.prune_iteratively(g, train, target_sparsity=0.8, steps=4, epochs=1, lr=1e-3,
                                  evaluate=lambda h: _accuracy(h, test))
    acc = {"layer": (_accuracy(layer, test), _accuracy(ft_layer, test)),
           "global": (_accuracy(glob, test), _accuracy(ft_glob, test)),
           "iterative cubic": [s["eval"] for s in it.steps]}
    print(f"digits CNN fp32 {fp32:.2f}; 80% (pruned, fine-tuned): {acc}")
    for ft in (ft_layer, ft_glob, it.graph):
        assert sum(_zeros(w) for w in _eff(ft).values()) == pytest.approx(0.8 * 38160, abs=4)
    assert acc["layer"][1] >= fp32 - 1.0 and acc["global"][1] >= fp32 - 1.0
    assert acc["layer"][0] < fp32 - 10  # pruning alone did hurt: the fine-tuning recovered it
