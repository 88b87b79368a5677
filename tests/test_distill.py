"""graphc.distill: soft targets reduce the loss, feature matching, hard labels, options."""

import pytest
import torch
import torch.nn.functional as F

import graphc
from graphc.distill_taps import tap_graph
from graphc.errors import GraphcError
from tests.models.zoo import MLP, build
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)


@pytest.fixture
def pair():
    """Teacher: the zoo MLP (traced and as a module); student: a fresh, differently seeded MLP."""
    m, x = build("mlp")
    teacher = graphc.trace(m, x)
    torch.manual_seed(1)
    student = graphc.trace(MLP(), x)
    xs = [torch.randn(4, 20) for _ in range(24)]
    return m, teacher, student, xs


def _kl(student, teacher, xs, t=2.0):
    with torch.no_grad():
        return sum(F.kl_div(F.log_softmax(student(x)[0] / t, -1),
                            F.log_softmax(teacher(x)[0] / t, -1), log_target=True,
                            reduction="batchmean").item() * t * t for x in xs) / len(xs)


def test_kd_reduces_the_soft_target_loss_on_held_out_inputs(pair):
    _, teacher, student, xs = pair
    held_out = [torch.randn(4, 20) for _ in range(8)]
    before = _kl(student, teacher, held_out)
    r = graphc.distill(student, teacher, xs, epochs=6, lr=3e-3, temperature=2.0)
    after = _kl(r.student, teacher, held_out)
    print(f"KD on the MLP: held-out soft-target loss {before:.4f} -> {after:.4f}")
    assert after < 0.5 * before
    assert len(r.curve["loss"]) == 6 * len(xs) and r.curve["loss"] == r.curve["soft"]
    ep = r.student.meta["distill"]["epoch_losses"]
    assert len(ep) == 6 and ep[-1] < 0.5 * ep[0]
    assert _kl(student, teacher, held_out) == before  # the input graph was not trained


def test_first_step_loss_is_the_temperature_scaled_kl(pair):
    _, teacher, student, xs = pair
    for t in (1.0, 4.0):
        r = graphc.distill(student, teacher, xs[:1], temperature=t)
        assert r.curve["soft"][0] == pytest.approx(_kl(student, teacher, xs[:1], t), rel=1e-5)


def test_feature_matching_pulls_the_named_node_towards_the_teacher(pair):
    _, teacher, student, xs = pair
    held_out = [torch.randn(4, 20) for _ in range(8)]

    def feat_err(g):  # MSE between the graphs' %tanh nodes on held-out inputs
        s, t = tap_graph(g, ["tanh"], "s"), tap_graph(teacher, ["tanh"], "t")
        with torch.no_grad():
            return sum(F.mse_loss(s(x)[1], t(x)[1]).item() for x in held_out) / len(held_out)

    r = graphc.distill(student, teacher, xs, epochs=4, lr=3e-3, features=["tanh"],
                       feature_weight=10.0)
    plain = graphc.distill(student, teacher, xs, epochs=4, lr=3e-3)
    assert set(r.curve) == {"loss", "soft", "features"}
    print(f"feature MSE at %tanh: {feat_err(student):.4f} -> {feat_err(r.student):.4f} "
          f"(outputs only: {feat_err(plain.student):.4f})")
    assert feat_err(r.student) < 0.3 * feat_err(student)
    assert feat_err(r.student) < 0.5 * feat_err(plain.student)  # the feature term did it


def test_module_teacher_taps_submodules_like_graph_teacher_taps_nodes(pair):
    """fc2's output (a forward hook on the nn.Module) is node %addmm_1 of the traced teacher:
    both teachers give the same losses step for step."""
    m, teacher, student, xs = pair
    by_graph = graphc.distill(student, teacher, xs[:6], epochs=2, lr=1e-3,
                              features={"addmm_1": "addmm_1"})
    by_module = graphc.distill(student, m, xs[:6], epochs=2, lr=1e-3,
                               features={"addmm_1": "fc2"})
    assert by_module.curve["features"] == pytest.approx(by_graph.curve["features"], rel=1e-5)
    assert by_module.curve["loss"] == pytest.approx(by_graph.curve["loss"], rel=1e-5)


def test_hard_labels_mix_with_soft_targets_by_alpha(pair):
    _, teacher, student, xs = pair
    data = [(x, teacher(x)[0].argmax(1)) for x in xs[:4]]
    r = graphc.distill(student, teacher, data, alpha=0.25)
    hard = F.cross_entropy(student(xs[0])[0], data[0][1]).item()
    assert r.curve["hard"][0] == pytest.approx(0.75 * hard, rel=1e-5)
    assert r.curve["soft"][0] == pytest.approx(0.25 * _kl(student, teacher, xs[:1]), rel=1e-5)
    only_soft = graphc.distill(student, teacher, data, alpha=1.0)
    assert only_soft.curve["hard"] == [0.0] * 4


def test_mse_and_cosine_losses_for_embedding_outputs(pair):
    _, teacher, student, xs = pair
    for loss in ("mse", "cosine"):
        r = graphc.distill(student, teacher, xs, epochs=4, loss=loss, lr=3e-3)
        ep = r.student.meta["distill"]["epoch_losses"]
        assert ep[-1] < 0.5 * ep[0], (loss, ep)
    y_s, y_t = student(xs[0])[0], teacher(xs[0])[0]
    r = graphc.distill(student, teacher, xs[:1], loss="cosine")
    want = (1 - F.cosine_similarity(y_s, y_t, dim=-1)).mean().item()
    assert r.curve["soft"][0] == pytest.approx(want, rel=1e-5)


def test_trainable_patterns_freeze_the_other_weights(pair):
    _, teacher, student, xs = pair
    r = graphc.distill(student, teacher, xs[:4], lr=1e-2, trainable=["fc3_*"])
    w0, w1 = student.weights(), r.student.weights()
    changed = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert changed == {"fc3_weight", "fc3_bias"}


def test_plot_needs_matplotlib(pair, tmp_path):
    _, teacher, student, xs = pair
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.warns(UserWarning, match="matplotlib is not installed"):
            r = graphc.distill(student, teacher, xs[:2], plot=tmp_path / "kd.png")
        assert len(r.curve["loss"]) == 2 and not (tmp_path / "kd.png").exists()
        return
    graphc.distill(student, teacher, xs[:2], plot=tmp_path / "kd.png")
    assert (tmp_path / "kd.png").stat().st_size > 1000


BAD = [
    ({"loss": "l2"}, "loss='l2' is unknown; choose from \\['kl', 'mse', 'cosine'\\]"),
    ({"loss": "mse", "temperature": 2.0}, "temperature=2.0 applies to loss='kl' only"),
    ({"epochs": 0}, "epochs=0 out of range"),
    ({"alpha": 1.5}, "alpha=1.5 out of range"),
    ({"temperature": -1.0}, "temperature=-1.0 out of range"),
    ({"features": ["nope"]}, "features \\['nope'\\] are not nodes of the student graph"),
    ({"features": {"relu": "tanh"}}, ("feature %relu of the student is \\[4, 64\\] but "
                                      "teacher 'tanh' is \\[4, 32\\]")),
    ({"trainable": ["conv*"]}, "trainable=\\['conv\\*'\\] matches no parameter"),
]


@pytest.mark.parametrize("kwargs, message", BAD)
def test_bad_options_are_rejected(pair, kwargs, message):
    _, teacher, student, xs = pair
    with pytest.raises(GraphcError, match=message):
        graphc.distill(student, teacher, xs[:2], **kwargs)


def test_bad_models_and_data_are_rejected(pair):
    m, teacher, student, xs = pair
    with pytest.raises(GraphcError, match="student must be a graphc.Graph"):
        graphc.distill(m, teacher, xs[:2])
    with pytest.raises(GraphcError, match="is not a submodule of the teacher MLP"):
        graphc.distill(student, m, xs[:2], features={"tanh": "fc9"})
    with pytest.raises(GraphcError, match="`data` is empty"):
        graphc.distill(student, teacher, [])
    with pytest.raises(GraphcError, match="distill data for"):
        graphc.distill(student, teacher, [torch.randn(3, 20)])
