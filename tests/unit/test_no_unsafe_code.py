"""No code path in ``tandem/`` may turn bytes from the network (or a file) into code.

tandem's wire formats are msgpack (msgspec Structs) and JSON; weights are safetensors. This test
keeps it that way: it fails on any mention of ``pickle`` / ``marshal`` / ``shelve`` (and their
cousins ``dill``, ``cloudpickle``, ``jsonpickle``), on builtin ``eval(`` / ``exec(``, on
``yaml.load(`` / ``yaml.unsafe_load``, on ``numpy.load(..., allow_pickle=True)`` and on
``torch.load(`` without ``weights_only=True``. Methods that merely share a name (``model.eval()``)
are fine. Checked twice: a text scan of every source file (comments and docstrings included, so a
new dependency on these cannot hide) and an AST scan of the calls.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "tandem"
SOURCES = sorted(p for p in PACKAGE.rglob("*") if p.suffix in (".py", ".pyx", ".pyi", ".c", ".h"))

#: Forbidden anywhere in the text (word boundaries; ``eval(``/``exec(`` only as builtins).
TEXT_PATTERNS = {
    "pickle": re.compile(r"pickle", re.IGNORECASE),  # pickle, cPickle, cloudpickle, jsonpickle
    "marshal": re.compile(r"\bmarshal\b"),
    "shelve": re.compile(r"\bshelve\b"),
    "dill": re.compile(r"\bimport\s+dill\b|\bfrom\s+dill\b"),
    "eval(": re.compile(r"(?<![\w.])eval\s*\("),
    "exec(": re.compile(r"(?<![\w.])exec\s*\("),
    "yaml.load(": re.compile(r"\byaml\s*\.\s*(?:load|unsafe_load|full_load|load_all)\s*\("),
    "__import__(": re.compile(r"(?<![\w.])__import__\s*\("),
}


def test_the_scan_sees_the_package() -> None:
    names = {p.name for p in SOURCES}
    assert {"runtime.py", "launcher.py", "messages.py", "weights.py"} <= names


@pytest.mark.parametrize("name", sorted(TEXT_PATTERNS))
def test_no_unsafe_deserialization_or_eval_in_the_text(name: str) -> None:
    pattern = TEXT_PATTERNS[name]
    hits = [
        f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
        for path in SOURCES
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, f"{name} in tandem/:\n" + "\n".join(hits)


def _dotted(node: ast.expr) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw_true(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords
    )


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for mod in mods:
                if mod.split(".")[0] in {
                    "pickle",
                    "cPickle",
                    "_pickle",
                    "marshal",
                    "shelve",
                    "dill",
                    "cloudpickle",
                }:
                    out.append((node.lineno, f"import {mod}"))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in ("eval", "exec", "builtins.eval", "builtins.exec", "__import__"):
            out.append((node.lineno, f"{name}()"))
        elif name == "torch.load" or name.endswith(".torch.load"):
            if not _kw_true(node, "weights_only"):
                out.append((node.lineno, "torch.load() without weights_only=True"))
        elif name.split(".")[-1] in ("load", "loads") and name.split(".")[0] in ("np", "numpy"):
            if _kw_true(node, "allow_pickle"):
                out.append((node.lineno, f"{name}(allow_pickle=True)"))
        elif name.startswith("yaml.") and name.split(".")[-1] in (
            "load",
            "unsafe_load",
            "full_load",
            "load_all",
        ):
            out.append((node.lineno, f"{name}()"))
    return out


def test_no_unsafe_calls_in_the_code() -> None:
    hits = []
    for path in SOURCES:
        if path.suffix != ".py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        hits += [f"{path.relative_to(PACKAGE.parent)}:{line}: {what}" for line, what in _unsafe_calls(tree)]
    assert not hits, "unsafe calls in tandem/:\n" + "\n".join(hits)


def test_the_scanners_catch_what_they_should() -> None:
    """The checks above can fail: each forbidden form is caught, the look-alikes are not."""
    bad = (
        "import pickle\nimport marshal as m\nx = eval('1')\nexec('y=1')\n"
        "torch.load(f)\nnp.load(f, allow_pickle=True)\nyaml.load(s)\n"
    )
    whats = [w for _, w in _unsafe_calls(ast.parse(bad))]
    assert whats == [
        "import pickle",
        "import marshal",
        "eval()",
        "exec()",
        "torch.load() without weights_only=True",
        "np.load(allow_pickle=True)",
        "yaml.load()",
    ]
    ok = "model.eval()\ntorch.load(f, weights_only=True)\nnp.load(f)\nyaml.safe_load(s)\n"
    assert _unsafe_calls(ast.parse(ok)) == []
    for line in ok.splitlines():
        assert not any(p.search(line) for p in TEXT_PATTERNS.values()), line
    assert TEXT_PATTERNS["eval("].search("x = eval(s)")
    assert TEXT_PATTERNS["pickle"].search("import cloudpickle")
