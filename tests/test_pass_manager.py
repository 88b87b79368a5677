"""Pass registry, pipeline strings, typed options, and the pipeline's per-pass records."""

import pytest
import torch

import graphc
from graphc.errors import PassError
from graphc.pass_manager import PASSES, parse_pipeline, resolve
from graphc.pipeline import run_pipeline
from tests.models.zoo import build


@pytest.fixture
def user_pass():
    """A user-registered pass that scales the model's output; removed again afterwards."""

    @graphc.register_pass("scale-output")
    def scale_output(graph: graphc.Graph, *, factor: float = 1.0, note: str = "") -> graphc.Graph:
        """out -> out * factor."""
        g = graph.copy()
        out = g.gm.graph.output_node()
        (last,) = out.args[0]
        with g.gm.graph.inserting_before(out):
            scaled = g.gm.graph.call_function(torch.ops.aten.mul.Tensor, (last, factor))
        out.args = ((scaled,),)
        g.gm.recompile()
        return g

    yield scale_output
    del PASSES["scale-output"]


def test_parse_pipeline_types_and_nesting():
    steps = parse_pipeline('a, b(k=1, f=0.5, flag=true, s="x, y", l=[1, 2]), c(name=word)')
    assert steps == [("a", {}), ("b", {"k": 1, "f": 0.5, "flag": True, "s": "x, y",
                                       "l": [1, 2]}), ("c", {"name": "word"})]


def test_list_options_take_bare_words_in_pipeline_strings():
    assert parse_pipeline("q(ops=[linear, 'conv'], n=[1, 2.5])") == [
        ("q", {"ops": ["linear", "conv"], "n": [1, 2.5]})]
    from_string = resolve("quantize(ops=[linear, embedding], exclude=fc*)")
    from_python = resolve([("quantize", {"ops": ("linear", "embedding"), "exclude": ("fc*",)})])
    assert from_string == from_python  # the same options, as tuples, either way


def test_user_pass_in_a_pipeline_string(user_pass):
    m, x = build("mlp")
    g = graphc.trace(m, x)
    out, records = run_pipeline(g, "scale-output(factor=2), dead-code-elimination", check=True)
    torch.testing.assert_close(out(*x)[0], 2 * g(*x)[0])
    assert [r.step for r in records] == ["input", "scale-output(factor=2.0)",
                                         "dead-code-elimination"]
    assert records[1].changed and not records[2].changed
    assert records[1].nodes == records[0].nodes + 1
    # error against the graph before: |2y - y| = |y|
    assert records[1].max_abs_err == pytest.approx(g(*x)[0].abs().max().item(), rel=1e-6)
    assert records[1].max_rel_err == pytest.approx(1.0, rel=1e-6)


def test_python_and_string_options_are_the_same(user_pass):
    a = resolve("scale-output(factor=3)")
    b = resolve([("scale-output", {"factor": 3})])
    assert a == b and a[0][1] == {"factor": 3.0}


def test_unknown_pass_lists_registered_ones():
    with pytest.raises(PassError, match=r"unknown pass 'fold-bn'; registered passes: .*"
                                        r"fold-batchnorm"):
        resolve("fold-bn")


@pytest.mark.parametrize("text, message", [
    ("scale-output(facter=2)", r"has no option 'facter'; its options: factor: float, note: str"),
    ("scale-output(factor=true)", r"option factor=True must be float"),
    ("scale-output(factor)", r"needs the form key=value"),
    ("scale-output(factor=2", r"unbalanced parentheses"),
])
def test_bad_options_are_rejected(user_pass, text, message):
    with pytest.raises(PassError, match=message):
        resolve(text)


def test_register_rejects_positional_options():
    with pytest.raises(PassError, match="must be keyword-only with a default"):
        @graphc.register_pass("bad-signature")
        def bad(graph, factor=1.0):
            return graph
    assert "bad-signature" not in PASSES


def test_pipeline_catches_a_pass_that_mutates_its_input():
    @graphc.register_pass("mutate-input")
    def mutate(graph: graphc.Graph) -> graphc.Graph:
        """Wrongly edits its input in place."""
        relu = next(n for n in graph.gm.graph.nodes if n.name == "relu")
        relu.target = torch.ops.aten.sigmoid.default
        return graph

    try:
        m, x = build("mlp")
        with pytest.raises(PassError, match="'mutate-input' mutated its input graph"):
            run_pipeline(graphc.trace(m, x), "mutate-input", check=True)
    finally:
        del PASSES["mutate-input"]


def test_pass_exceptions_name_the_pass():
    @graphc.register_pass("explode")
    def explode(graph: graphc.Graph) -> graphc.Graph:
        """Fails."""
        raise RuntimeError("boom")

    try:
        m, x = build("mlp")
        with pytest.raises(PassError, match=r"pass 'explode' failed: RuntimeError: boom"):
            run_pipeline(graphc.trace(m, x), ["explode"])
    finally:
        del PASSES["explode"]
