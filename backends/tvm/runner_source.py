"""The board runner as it goes into an artifact: its code without docstrings and comments.

board_runner.py is documented for whoever reads graphc's source; every TVM artifact carries a
copy as its __main__.py (deflated: zipimport reads no other compression). Its docstrings and
comments were ~1 kB of each artifact (digits CNN: 3.6 of 37.8 kB). The copy keeps the code,
the argparse help (`python3 model.graphc --help`) and a module docstring that names the
source. Lines are dropped whole (docstrings, comment lines, blank lines) or lose a trailing
comment, so the code is the source's code: tests/backends/test_runner_source.py compares
the two ASTs.
"""

from __future__ import annotations

import ast
import io
import tokenize

HEADER = ('"""{summary}\n\nShipped without docstrings and comments: graphc\'s '
          'backends/tvm/board_runner.py is the documented source."""\n')


def shipped(source: str) -> str:
    """source (a module) without comments, docstrings and blank lines; its first docstring
    line, the summary that argparse shows, stays."""
    tree = ast.parse(source)
    drop = set()
    for node in ast.walk(tree):
        doc = _docstring(node)
        if doc is not None:
            drop.update(range(doc.lineno, doc.end_lineno + 1))
    lines = source.splitlines()
    for line, col in _comments(source):
        lines[line - 1] = lines[line - 1][:col].rstrip()
    kept = [text for i, text in enumerate(lines, 1) if i not in drop and text.strip()]
    summary = ast.get_docstring(tree).split("\n")[0] if ast.get_docstring(tree) else ""
    return HEADER.format(summary=summary) + "\n".join(kept) + "\n"


def _docstring(node: ast.AST) -> ast.Expr | None:
    if not isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return None
    first = node.body[0] if node.body else None
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        return None
    # a body that is only a docstring keeps it (dropping it would leave no statement)
    return first if len(node.body) > 1 or isinstance(node, ast.Module) else None


def _comments(source: str) -> list[tuple[int, int]]:
    """(line, column) where each comment starts."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return [t.start for t in tokens if t.type == tokenize.COMMENT]
