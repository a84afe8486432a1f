"""Layers point down: every import inside mlakit goes to the same layer or a lower one, and no two
packages import each other (directly or round a loop).

The walk reads the source with :mod:`ast` (nothing is imported), so imports inside functions count
as much as those at the top: a lazy import is still a dependency.

The layers, lowest first, and why each sits where it does:

0. ``errors``, ``units`` — leaves: the one exception type, byte-size parsing.
1. ``io``, ``dtypes``, ``config``, ``packaged`` — safe writes/JSON reads, the dtype-name table, the
   frozen configs (which name dtypes) and the alias table of packaged model files; they need only
   errors (and torch).
2. ``rope``, ``layers``, ``paged``, ``native``, ``quant``, ``cache`` — maths and storage the
   attention is built from (RoPE tables, norms/MLP, block pool, C kernels, int8 weights, caches).
3. ``attention`` — MLA and baseline attention, their backends.
4. ``model``, ``generate``, ``kv``, ``optim``, and the package root ``mlakit`` (its public names) —
   the LM, plain generation over it, cache-size arithmetic, and the optimizer, schedule and
   teacher-fitting loop that training, distillation and healing share (healing, in ``convert``,
   sits below ``train``).
5. ``text`` — corpora and tokenizers: text that conversion calibrates on, evaluation scores,
   training learns from and the engine tokenizes, so it sits under all of them.
6. ``convert``, ``interop`` — make MLA models: from GQA sources (Llama family, GGUF), and to/from
   DeepSeek-V3 Hugging Face checkpoints. Neither reads the other.
7. ``eval``, ``engine`` — use models: evaluation measures a conversion against its source (the
   trade-off sweep converts at several ranks; HF sources open through ``convert``'s loader), and
   the engine serves them (it runs GQA sources unconverted through the same loader).
8. ``train`` — the trainer needs only layers <= 5; distillation fine-tunes a *converted* model
   against its source and reports the evaluation harness's numbers before and after, so the
   package sits above ``eval`` (and hence ``convert``) rather than beside it.
9. ``serve`` — HTTP over the engine.
10. ``cli``, ``__main__`` — thin commands over everything.
"""

from __future__ import annotations

import ast
import itertools
from collections import defaultdict
from pathlib import Path

import mlakit

PACKAGE = Path(mlakit.__file__).parent

LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "units"),
    ("io", "dtypes", "config", "packaged"),
    ("rope", "layers", "paged", "native", "quant", "cache"),
    ("attention",),
    ("model", "generate", "kv", "optim", "mlakit"),
    ("text",),
    ("convert", "interop"),
    ("eval", "engine"),
    ("train",),
    ("serve",),
    ("cli", "__main__"),
)
LEVEL: dict[str, int] = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str:
    """The layer unit of a dotted module name: ``mlakit.convert.load`` -> ``convert``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(imported mlakit module, line)`` for every import in ``path``, relative ones resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from mlakit import convert` imports the subpackage, not the root's names
            if target == "mlakit":
                found += [
                    (
                        f"mlakit.{a.name}"
                        if (PACKAGE / a.name).exists() or (PACKAGE / f"{a.name}.py").exists()
                        else "mlakit",
                        node.lineno,
                    )
                    for a in node.names
                ]
            else:
                found.append((target, node.lineno))
    return [(m, line) for m, line in found if m == "mlakit" or m.startswith("mlakit.")]


def _edges() -> dict[tuple[str, str], list[str]]:
    """Package-level import edges ``(from unit, to unit) -> ["file:line", ...]``."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _unit(_module_name(path))
        for target, line in _imports(path):
            dst = _unit(target)
            if dst != src:
                edges[(src, dst)].append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    return edges


def test_every_unit_has_a_layer() -> None:
    units = {_unit(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units - set(LEVEL) == set(), "new package or module: give it a layer in LAYERS"
    assert set(LEVEL) - units == set(), "LAYERS names a unit that no longer exists"


def test_imports_point_down() -> None:
    upward = [
        f"{where}: {src} (layer {LEVEL[src]}) imports {dst} (layer {LEVEL[dst]})"
        for (src, dst), wheres in _edges().items()
        if LEVEL[dst] > LEVEL[src]
        for where in wheres
    ]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_cycles_between_packages() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst in _edges():
        graph[src].add(dst)

    # Tarjan would do; the graph has ~25 nodes, so reachability by DFS from each node is enough
    def reaches(a: str, b: str) -> bool:
        seen, stack = set(), [a]
        while stack:
            n = stack.pop()
            for m in graph[n]:
                if m == b:
                    return True
                if m not in seen:
                    seen.add(m)
                    stack.append(m)
        return False

    cycles = sorted(
        {tuple(sorted((a, b))) for a, b in itertools.permutations(graph, 2) if reaches(a, b) and reaches(b, a)}
    )
    assert not cycles, f"packages that import each other (directly or round a loop): {cycles}"


def test_the_walk_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The checker must be able to fail: an import inside a function counts."""
    edges = _edges()
    assert ("engine", "convert") in edges  # lazy, inside engine.load._load
    assert ("train", "eval") in edges  # lazy, inside train.distill.distill
    assert all(LEVEL[d] <= LEVEL[s] for s, d in edges)
