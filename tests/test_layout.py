"""The package's shape: no import cycles, and dependencies that point one way.

Every import in fleet/ is walked (module level and inside functions: a lazy import still makes the
two modules depend on each other). Layers, lowest first: the shared leaves (config, rng, atomic),
then the simulated phones and the privacy maths, the learning task, the round, the audits, running
and tracking, the benchmarks. A module imports its own layer or lower ones; phones and privacy
never import Ray.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "fleet": 0,
    "fleet.config": 0,
    "fleet.rng": 0,
    "fleet.atomic": 0,
    "fleet.phones": 1,
    "fleet.privacy": 1,
    "fleet.learning": 2,
    "fleet.round": 3,
    "fleet.audits": 4,
    "fleet.runtime": 5,
    "fleet.__main__": 5,
    "fleet.bench": 6,
}


def modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "fleet").rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The fleet modules `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def third_party(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
    return found


def layer(name: str) -> int:
    best = max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)
    return LAYERS[best]


GRAPH = {name: imports(path, set(modules())) - {name} for name, path in modules().items()}


def test_no_import_cycles():
    """Tarjan's strongly connected components: any with two or more modules is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_dependencies_point_down(name):
    upward = sorted(d for d in GRAPH[name] if layer(d) > layer(name))
    assert not upward, f"{name} (layer {layer(name)}) imports {upward}"


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if layer(n) == 1))
def test_phones_and_privacy_know_nothing_of_ray(name):
    assert "ray" not in third_party(modules()[name])


def test_the_checker_finds_a_cycle_and_an_upward_import():
    """The checks above can fail: a synthetic graph with both."""
    global GRAPH
    saved = GRAPH
    try:
        GRAPH = {"fleet.phones.a": {"fleet.runtime.b"}, "fleet.runtime.b": {"fleet.phones.a"}}
        with pytest.raises(AssertionError):
            test_no_import_cycles()
        with pytest.raises(AssertionError, match="imports"):
            test_dependencies_point_down("fleet.phones.a")
    finally:
        GRAPH = saved


def test_modules_stay_small():
    """One concern each: under about 400 lines, with the few named here still to split."""
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    over = {n: k for n, k in long.items() if k > 420}
    assert not over


def test_functions_fit_on_a_screen():
    """About 60 lines at most (65 with the signature's wrapping), whole package."""
    over = set()
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > 65:
                    over.add(f"{name}.{node.name}")
    assert over == set(), "split these"


def _mechanism_names() -> set[str]:
    from fleet.privacy.mechanisms import MECHANISMS

    return {name for name, cls in MECHANISMS.items() if cls.dp}


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if not n.startswith("fleet.privacy")))
def test_no_mechanism_name_is_compared_outside_privacy(name):
    """A rule of a mechanism re-typed elsewhere is where a new mechanism goes wrong: outside
    fleet/privacy/ nothing compares a mechanism's name (or a config's `mechanism`) with anything;
    it asks the registry or the mechanism object."""
    names = _mechanism_names()
    found = []
    for node in ast.walk(ast.parse(modules()[name].read_text())):
        if not isinstance(node, ast.Compare):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Constant) and sub.value in names:
                found.append(f"line {node.lineno}: {sub.value!r}")
            if isinstance(sub, ast.Attribute) and sub.attr == "mechanism":
                found.append(f"line {node.lineno}: .mechanism")
    assert not found


def test_the_checker_finds_a_mechanism_name_compared(tmp_path, monkeypatch):
    planted = tmp_path / "planted.py"
    planted.write_text('def f(cfg):\n    return cfg.privacy.mechanism == "dp_ftrl"\n')
    monkeypatch.setitem(GRAPH, "fleet.runtime.planted", set())
    monkeypatch.setattr(sys.modules[__name__], "modules", lambda: {"fleet.runtime.planted": planted})
    with pytest.raises(AssertionError):
        test_no_mechanism_name_is_compared_outside_privacy("fleet.runtime.planted")


def test_noise_is_drawn_only_by_the_mechanisms():
    """The noise source is built once (the registry's `build`) and drawn from only inside the
    mechanism classes; the noise benchmark times it on its own."""
    built, drawn = set(), set()
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id == "NoiseSource":
                    built.add(name)
                if isinstance(f, ast.Attribute) and f.attr == "add" and "noise" in ast.unparse(f.value):
                    drawn.add(name)
    assert built == {"fleet.privacy.mechanisms", "fleet.bench.noise"}
    assert drawn and all(n.startswith("fleet.privacy.mechanisms.") or n == "fleet.bench.noise" for n in drawn)
