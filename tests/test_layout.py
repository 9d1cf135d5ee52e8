"""The package's layers import one way, as the README's Layout section says:
each module may import only from its own layer or the layers below it.

The check reads every module's import statements (function-level ones
included), so a new upward import fails here rather than in review."""
import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "xlegacy"

# Lowest first.  A module belongs to the first layer whose names match it:
# a subpackage ("stream") or a top-level module ("format").
LAYERS = [
    ("facts", {"_version", "_ffi", "errors", "format", "fileio", "options", "v2"}),
    ("kernels", {"kernels"}),
    ("stream", {"stream", "_typing"}),
    ("decoders", {"cpu", "pfnset"}),
    ("outputs", {"outputs"}),
    ("images", {"image", "checkpoints", "overlay"}),
    ("commands", {"report", "inspector", "restorer", "converter", "verifier", "pagemap", "translate"}),
    ("front", {"volatility", "testing", "bench", "__init__"}),
    ("cli", {"cli", "__main__"}),
]
RANK = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}

# Deliberate exceptions, each imported lazily inside one function, with why.
ALLOWED = {
    # LegacyStream.pages() is the documented entry to the page index; the
    # index (numpy) lives above the stream layer and loads only when called.
    ("stream.reader", "pagemap"),
}


def _module(path):
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _type_only(tree):
    """Nodes inside `if TYPE_CHECKING:`: imports for annotations, which
    never run, so they bind no layer to another."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imports(path):
    mod = _module(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skip = _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg.split(".") if pkg else []
            base = base[:len(base) - (node.level - 1)]
            if node.module:
                yield ".".join(base + [node.module])
            else:
                yield from (".".join(base + [a.name]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("xlegacy."):
            yield node.module[len("xlegacy."):]
        elif isinstance(node, ast.Import):
            yield from (a.name[len("xlegacy."):] for a in node.names
                        if a.name.startswith("xlegacy."))


def _rank(mod):
    head = mod.split(".")[0] if mod else "__init__"
    if head not in RANK:
        raise AssertionError(f"{mod!r} belongs to no layer: add it to LAYERS in {__file__}")
    return RANK[head]


MODULES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    mod = _module(path)
    upward = []
    for target in _imports(path):
        head = target.split(".")[0]
        if head in ("__version__",):      # `from .. import __version__`
            continue
        if _rank(target) > _rank(mod) and (mod, head) not in ALLOWED:
            upward.append(target)
    assert not upward, f"{mod} imports from a higher layer: {upward}"


def test_stream_layer_has_no_numpy_at_import():
    # The framing layer is what convert and info run on; numpy costs their
    # start-up, so the stream modules import it only inside functions.
    for path in sorted((SRC / "stream").glob("*.py")):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top for a in n.names] + \
                [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert "numpy" not in names, f"{path.name} imports numpy at module level"
