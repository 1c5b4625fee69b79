"""The package's import graph: no cycles (function-level imports included) and no private names
imported across modules, so each layer can change without reaching into another's internals."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "evo"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every ``import evo.x`` / ``from evo.x import a, b`` anywhere in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("evo") and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("evo")]
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, names in imports(path):
            # "from evo.search.optim import ga" names a submodule; otherwise the module itself
            for n in names or [""]:
                sub = f"{target}.{n}" if n else target
                dep = sub if sub in modules else target
                if dep in modules and dep != name and not name.startswith(dep + "."):
                    edges[name].add(dep)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    edges = graph()
    assert len(edges) > 30 and edges["evo.loop.driver"] >= {"evo.loop.generation", "evo.cluster.pool"}  # the walk sees the package
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_private_name_is_imported_across_modules():
    offenders = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "experiments").glob("*.py")]:
        for target, names in imports(path):
            offenders += [f"{path.relative_to(ROOT)}: {target}.{n}" for n in names
                          if n.startswith("_") and not n.startswith("__")]
    assert not offenders, offenders


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in edges[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


LOOP = {"evo.loop.driver", "evo.loop.versions", "evo.loop.generation", "evo.loop.steady_state", "evo.cluster.pool"}


def test_layers_artifacts_and_search_never_reach_the_loop():
    """The release, the report, status and the run store are read by the loop, never the other
    way round; optimizers and merge methods know nothing of Ray or the loop (no function-level
    import either: the walk includes them)."""
    edges = graph()
    lower = ["evo.artifacts.release", "evo.artifacts.report", "evo.artifacts.status", "evo.artifacts.store", "evo.artifacts.checkpoint", "evo.loop.selection",
             "evo.scoring.rejection", "evo.search.optim", *[m for m in edges if m.startswith(("evo.search.optim.", "evo.merge."))]]
    offenders = {m: sorted(reachable(edges, m) & LOOP) for m in lower}
    assert not {m: v for m, v in offenders.items() if v}, offenders
    assert reachable(edges, "evo.loop.driver") >= {"evo.loop.steady_state", "evo.loop.generation", "evo.cluster.pool"}  # the walk works


def test_only_the_sources_ask_whether_a_run_follows_a_stream():
    """One loop (``evo.loop.driver``) for fixed data and streams: the question is asked in the config
    (its validation, ``evo.core.validate``), where the evaluators' inputs load (``evo.scoring.sources``) and where the loop's
    versions come from (``evo.loop.versions.version_source``), nowhere else."""
    asking = sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if ".streaming" in p.read_text())
    assert asking == ["evo/core/validate.py", "evo/loop/versions.py", "evo/scoring/sources.py"], asking
    versions = (PACKAGE / "loop" / "versions.py").read_text()
    assert versions.count(".streaming") == 1  # version_source picks the source once


# The declared layer order, ground first (DESIGN.md "Layer order"; docs/architecture.md). A package
# imports only packages of a lower level (or, within its level, without a cycle: checked below).
LAYERS = [
    {"core"},                        # errors, dtypes, filesystem helpers, the config schema
    {"zoo", "data", "merge"},        # models to merge, text -> blocks, merge methods
    {"search", "scoring"},           # genes -> recipes, one candidate's score
    {"cluster", "artifacts"},        # Ray, the run directory and releases
    {"loop"},                        # the loop over data versions; where a run is assembled
    {"cli", "__init__"},             # the `evo` command and the Python API
]
LEVEL = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def package_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for mod, deps in edges.items():
        for dep in deps:
            if package(dep) != package(mod):
                out.setdefault(package(mod), set()).add(package(dep))
    return out


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{mod} -> {dep}" for mod, deps in edges.items() for dep in deps
                  if LEVEL[package(dep)] > LEVEL[package(mod)])


def test_every_package_has_a_declared_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} | {"cli", "__init__"}
    assert packages == set(LEVEL), sorted(packages ^ set(LEVEL))


def test_imports_point_down_the_layer_order():
    """A lower layer never imports a higher one, not even inside a function."""
    edges = graph()
    assert "evo.core.fs" in edges and "evo.loop.experiment" in edges  # the walk sees the ground and the top
    offenders = upward_imports(edges)
    assert not offenders, offenders
    assert not {m for m, deps in edges.items() if package(m) == "core" and any(package(d) != "core" for d in deps)}


def test_no_package_level_cycle():
    cycle = find_cycle(package_edges(graph()) | {p: set() for p in LEVEL})
    assert cycle is None, " -> ".join(cycle)


def test_the_layer_check_sees_an_upward_import():
    """The checks above fail on the kind of edge they forbid (a config reading the zoo; two data
    packages importing each other)."""
    assert upward_imports({"evo.core.config": {"evo.zoo.build"}, "evo.zoo.build": set()}) == \
        ["evo.core.config -> evo.zoo.build"]
    assert find_cycle(package_edges({"evo.data.x": {"evo.zoo.y"}, "evo.zoo.y": {"evo.data.x"}})) is not None


def loop_attributes(path: Path) -> set[str]:
    """Attributes a module reads or calls on a name ``loop`` (a version source's view of the loop)."""
    return {node.attr for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "loop"}


def test_the_loop_view_check_sees_a_stray_attribute(tmp_path):
    (tmp_path / "src.py").write_text("def install(self, loop):\n    loop.pool.update()\n    return loop.space\n")
    assert loop_attributes(tmp_path / "src.py") == {"pool", "space"}


def test_version_sources_use_only_the_loop_view():
    """A version source gets the loop through a narrow interface (``LoopView``): the store, the
    pool, the optimizer, the step, the cache, metrics, the stop flag, the state and a checkpoint
    call. Reaching for anything else of the loop fails here."""
    from evo.loop.version_source import LoopView

    allowed = set(LoopView.__annotations__) | {n for n in vars(LoopView) if not n.startswith("_")}
    used = {name: loop_attributes(PACKAGE / "loop" / f"{name}.py") for name in ("fixed_data", "shard_stream", "version_source")}
    assert used["shard_stream"] >= {"store", "pool", "optimizer", "state", "checkpoint"}  # the walk sees them
    extra = {name: sorted(attrs - allowed) for name, attrs in used.items() if attrs - allowed}
    assert not extra, extra


def experiment_imports() -> dict[str, set[str]]:
    """Which experiment scripts import which (``import bench_search`` / ``from _common import x``),
    function-level imports included."""
    scripts = {p.stem: p for p in (ROOT / "experiments").glob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in scripts}
    for name, path in scripts.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in scripts and node.level == 0:
                edges[name].add(node.module)
            elif isinstance(node, ast.Import):
                edges[name] |= {a.name for a in node.names if a.name in scripts}
    return edges


def test_experiments_share_set_up_without_a_cycle():
    """The scripts share their set-up through ``experiments/_common.py`` and never import each
    other in a cycle (bench_async and bench_search once did)."""
    edges = experiment_imports()
    assert "_common" in edges["bench_search"] and "_common" in edges["quickstart"]  # the walk sees them
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)
