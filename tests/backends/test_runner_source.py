"""backends/tvm/runner_source.py: the board runner an artifact carries is its source's code."""

import ast
import io
import tokenize

from graphc.backends.tvm.runner_source import shipped
from graphc.backends.tvm.runtime import MAIN_FILE


def _code(source: str) -> str:
    """The module's AST without docstrings."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def test_the_shipped_runner_is_the_board_runners_code_without_comments_or_docstrings():
    source = MAIN_FILE.read_text()
    out = shipped(source)
    assert _code(out) == _code(source)
    tokens = list(tokenize.generate_tokens(io.StringIO(out).readline))
    assert not [t for t in tokens if t.type == tokenize.COMMENT]
    docs = [n for n in ast.walk(ast.parse(out))
            if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef) and ast.get_docstring(n)]
    assert len(docs) == 1  # the module's: argparse's description, and where the source is
    summary = ast.get_docstring(ast.parse(source)).split("\n")[0]
    assert ast.get_docstring(ast.parse(out)).split("\n")[0] == summary
    print(f"__main__.py: {len(source)} -> {len(out)} characters")
    assert len(out) < 0.8 * len(source)


def test_strings_that_look_like_comments_stay_and_doc_only_bodies_keep_their_docstring():
    source = '''"""Module.

More."""
x = "# not a comment"  # a comment
def f():
    """Only a docstring."""
def g():
    """Doc."""

    # alone
    return x  # trailing
'''
    out = shipped(source)
    assert '"# not a comment"' in out and "comment\n" not in out and "alone" not in out
    assert '"""Only a docstring."""' in out and "Doc." not in out
    namespace: dict = {}
    exec(compile(out, "shipped", "exec"), namespace)  # noqa: S102  (our own test source)
    assert namespace["g"]() == "# not a comment" and namespace["__doc__"].startswith("Module.")
