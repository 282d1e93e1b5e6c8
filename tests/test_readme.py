"""The README's pointers into the code stay true: every `file.py` `name` it gives names a function or class of that
file (found with ast, so edits above it do not matter), and a pointer followed by (`text`) names one whose code, not
its comments or docstrings, holds text: the "Where to look first" answers cannot silently go stale when code moves."""
import ast
import re

from conftest import ROOT

POINTER = re.compile(r"`(\w+\.py)` `([\w.]+)`(?: \(`([^`]+)`\))?")


def definition(tree: ast.Module, dotted: str) -> ast.AST | None:
    """The function or class `dotted` (Class.method, or a top-level name) in tree, or None."""
    node = tree
    for name in dotted.split("."):
        node = next((child for child in node.body if isinstance(child, (ast.FunctionDef, ast.ClassDef))
                     and child.name == name), None)
        if node is None:
            return None
    return node


def code_of(node: ast.AST) -> str:
    """node's code as ast.unparse writes it: without comments, and here without docstrings."""
    for inner in ast.walk(node):
        body = getattr(inner, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            inner.body = body[1:] or [ast.Pass()]
    return ast.unparse(node)


def test_readme_pointers_name_what_they_say():
    readme = (ROOT / "README.md").read_text()
    pointers = POINTER.findall(readme)
    assert len(pointers) >= 5, "the 'Where to look first' table lost its `file.py` `name` answers"
    assert sum(bool(holds) for _, _, holds in pointers) >= 2, "the pointers lost what they say the code holds"
    for file, name, holds in pointers:
        node = definition(ast.parse((ROOT / file).read_text()), name)
        assert node is not None, f"README points to {name} in {file}, which has no such function or class"
        assert holds in code_of(node), f"README says {file} {name} holds {holds!r}; its code does not"
