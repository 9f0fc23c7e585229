"""Dependencies point down, one folder a layer: costmodel <- planning <- distributed <- kernels <- schedulers <-
executors <- runtime <- simulator (the cost model the trainer chooses per step with) <- (train, adapters) <- bench
<- (launch, cli). Checked twice: statically, every import statement of every module
(function-level imports included), and by importing each layer alone in a fresh interpreter."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the folders that import as distattn.<name> (pyproject.toml's package-dir)
FOLDERS = {"distattn": "distattn", "kernels": "distattn.kernels", "parallel": "distattn.parallel",
           "launch": "distattn.launch", "cluster": "distattn.cluster", "configs": "distattn.configs"}

# lowest first, one folder a layer; a module belongs to the longest prefix that matches it
LAYERS = [
    ("foundation", ["distattn.costmodel", "distattn.extras", "distattn.configs"]),
    ("planning", ["distattn.planning"]),
    ("distributed", ["distattn.distributed"]),
    ("kernels", ["distattn.kernels"]),
    ("schedules", ["distattn.schedulers"]),
    ("executors", ["distattn.executors"]),
    ("api", ["distattn.runtime"]),
    # the cost model: the simulator, which the trainer and adapters choose per step with (distattn.choose)
    ("sim", ["distattn.sim"]),
    # the integrations: each imports the layers below, none imports another
    ("train", ["distattn.train"]),
    ("adapters", ["distattn.parallel", "distattn.compat"]),
    ("cluster", ["distattn.cluster"]),
    # the benchmarks time the trainer, the adapters and the simulator, so they sit above all three
    ("bench", ["distattn.bench"]),
    ("entry points", ["distattn.launch", "distattn.cli"]),
]
INTEGRATIONS = ("train", "adapters", "cluster")
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def layer_of(module: str) -> str | None:
    if module == "distattn":  # the package resolves its names lazily
        return "foundation"
    best = None
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (name, len(prefix))
    return best[0] if best else None


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((package, *parts))] = path
    return out


def imports_of(module: str, path: Path) -> set[str]:
    """Every distattn module ``module`` imports, at any depth of its code."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    known = modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            named = {f"{base}.{a.name}" for a in node.names}   # `from . import x` may name a module
            found |= named
            if not named <= known.keys():   # (importing submodules alone takes nothing from the package)
                found.add(base)
    return {m for m in found if m in known and m != module}


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer_of(m) is None] == []


def test_no_import_points_up_or_across_integrations():
    bad = []
    for module, path in modules().items():
        mine = layer_of(module)
        for target in imports_of(module, path):
            theirs = layer_of(target)
            up = RANK[theirs] > RANK[mine]
            across = mine in INTEGRATIONS and theirs in INTEGRATIONS and theirs != mine
            if up or across:
                bad.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert bad == [], "\n".join(bad)


def test_only_the_cli_imports_cluster_measurement():
    """The network profile CAD plans on is core data (``distattn.costmodel.network``); ``distattn.cluster``
    measures clusters and only its own subcommands and the cluster layer itself reach it."""
    bad = [f"{module} imports {target}" for module, path in modules().items()
           if not module.startswith(("distattn.cluster", "distattn.cli", "distattn.launch"))
           for target in imports_of(module, path) if target.startswith("distattn.cluster")]
    assert bad == [], bad


def _loaded_after_import(module: str) -> list[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('distattn'))))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["distattn.costmodel.cost", "distattn.planning.masks", "distattn.distributed.spawn",
                                    "distattn.kernels.merge", "distattn.kernels", "distattn.schedulers.ring",
                                    "distattn.schedulers.cad", "distattn.executors", "distattn.runtime.api"])
def test_a_layer_imports_alone(module):
    """Importing the core loads nothing above it: no trainer, adapter, bench, simulator or CLI."""
    mine = RANK[layer_of(module)]
    above = [m for m in _loaded_after_import(module) if RANK[layer_of(m)] > mine]
    assert above == [], above


# other things that share a scheduler's name: the "zigzag" layout, the launcher's "local" backend
OTHER_NAMESAKES = ("backend", "kind", "layout")


def _scheduler_name_branches(source: str, names: set[str]) -> list[int]:
    """``x == "usp"``, ``name in ("ulysses", ...)``, ``"cad" != y``: comparisons with a scheduler's name
    (unless what is compared is a namesake: a layout's kind, a launcher backend)."""
    def named(node) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(named(e) for e in node.elts)

    hits = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = (node.left, *node.comparators)
        others = " ".join(ast.unparse(x) for x in operands if not named(x))
        if any(named(x) for x in operands) and not any(word in others for word in OTHER_NAMESAKES):
            hits.append(node.lineno)
    return hits


def test_no_scheduler_name_branches_outside_the_registry():
    """What a scheduler needs known lives in its registry entry or its schedule (``distattn/schedulers/__init__.py``,
    docs/concepts.md, "One token's way through the code"): no code outside ``distattn/schedulers/`` branches on
    a scheduler's name."""
    from distattn.schedulers import LOCAL, NAMES

    names = {*NAMES, LOCAL.name}
    found = [f"{path.relative_to(ROOT)}:{line}" for module, path in modules().items()
             if not module.startswith("distattn.schedulers")
             for line in _scheduler_name_branches(path.read_text(), names)]
    assert found == [], found
    # the check itself sees such branches, and not their namesakes
    probe = ('a = p.scheduler == "usp"\nif name in ("ring", "x"):\n'
             '    b = args.backend == "local"\nc = kind != "zigzag"\n')
    assert _scheduler_name_branches(probe, names) == [1, 2]


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def test_no_import_circles():
    """No two modules import each other, directly or round a loop, at any depth of their code (an
    import inside a function counts: a circle is cut at its cause, not hidden)."""
    everything = modules()
    graph = {module: imports_of(module, path) for module, path in everything.items()}
    assert _circles(graph) == []
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]   # the check sees one


def test_moved_benchmarks_keep_their_old_names():
    """``python -m distattn.train.bench_*`` runs the module's new home in ``distattn.bench`` (for one release)."""
    import importlib.util

    legacy = sorted((ROOT / "distattn" / "train" / "legacy").glob("bench_*.py"))
    assert len(legacy) >= 9
    for path in legacy:
        target = path.read_text().split('run_module("', 1)[1].split('"', 1)[0]
        assert importlib.util.find_spec(f"distattn.train.{path.stem}") is not None, path.stem
        assert importlib.util.find_spec(target) is not None, target
    done = subprocess.run([sys.executable, "-m", "distattn.train.bench_planning", "--help"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0 and "distattn.bench.plan_ahead" in done.stdout + done.stderr, done.stderr[-2000:]
