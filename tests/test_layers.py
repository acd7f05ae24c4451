"""The package's layers, read from its imports: what pipeline/ promises in its folders.

    messages < config < fs < data < cache < model < analysis, engines, reporting < the stages

A module may import its own subpackage and any layer below its own; a subpackage never imports a
stage (a module at the top of pipeline/) nor a subpackage on its own floor or above. Read with
ast, function-level imports included, so a lazy import cannot hide a violation.
"""
import ast
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOORS = {"messages": 0, "config": 1, "fs": 2, "data": 3, "cache": 4, "model": 5,
          "analysis": 6, "engines": 6, "reporting": 6}
STAGE_FLOOR = 7  # every other module at the top of pipeline/


def floor_of(module):
    """pipeline.cache.store -> ("cache", 3); pipeline.extract -> ("extract", 6)."""
    part = module.split(".")[1] if "." in module else ""
    return part, FLOORS.get(part, STAGE_FLOOR)


def imports_of(path, module):
    """The pipeline modules that the file at `path` (module `module`) imports, with line numbers."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                origin = f"{base}.{node.module}" if node.module else base
            else:
                origin = node.module or ""
            # a module or a name in one: its floor is the first part after pipeline. either way
            names = [(f"{origin}.{a.name}", node.lineno) for a in node.names]
        else:
            continue
        yield from ((name, line) for name, line in names
                    if name == "pipeline" or name.startswith("pipeline."))


def violations(root):
    """Every import under root/pipeline that runs sideways or up a floor, as readable lines."""
    found = []
    for folder, _, files in os.walk(os.path.join(root, "pipeline")):
        for file in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, file)
            module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
            module = module.removesuffix(".__init__")
            part, floor = floor_of(module)
            if floor == STAGE_FLOOR and module.count(".") <= 1:
                continue  # a stage may import anything below it, and other stages
            for target, line in imports_of(path, module):
                other, other_floor = floor_of(target)
                if other == part or target == "pipeline":
                    continue
                if other_floor >= floor:
                    where = os.path.relpath(path, root)
                    found.append(f"{where}:{line} imports {target} (floor {other_floor}), "
                                 f"from floor {floor}")
    return found


def test_every_import_points_down():
    assert violations(ROOT) == []


@pytest.mark.parametrize("planted, expected", [
    ("from .. import extract", "imports pipeline.extract"),           # a layer imports a stage
    ("from ..reporting import plots", "imports pipeline.reporting.plots"),   # a floor up
    ("from ..engines import featurize", "imports pipeline.engines.featurize"),  # sideways
    ("def f():\n    from .. import report", "imports pipeline.report"),  # a lazy import
])
def test_a_planted_violation_is_found(tmp_path, planted, expected):
    package = tmp_path / "pipeline"
    for folder in ("", "fs", "analysis", "model"):
        (package / folder).mkdir(exist_ok=True)
        (package / folder / "__init__.py").write_text("")
    (package / "config.py").write_text("")
    (package / "fs" / "files.py").write_text("from ..config import UserError\n")
    (package / "analysis" / "outliers.py").write_text(f"from ..fs import files\n{planted}\n")
    found = violations(str(tmp_path))
    assert len(found) == 1 and expected in found[0] and "analysis/outliers.py" in found[0]


def test_the_top_of_pipeline_holds_the_stages_and_few_else():
    top = [f for f in os.listdir(os.path.join(ROOT, "pipeline")) if f.endswith(".py")]
    assert len(top) <= 18, sorted(top)


def test_every_subpackage_says_its_job_and_what_it_may_import():
    for name in FLOORS:
        if name in ("messages", "config"):
            continue
        doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, "pipeline", name,
                                                            "__init__.py")).read()))
        assert doc and "Imports" in doc, f"pipeline/{name}/__init__.py needs its docstring"


def test_the_wheel_holds_every_module(tmp_path):
    """`pip install .` must install the subpackages too, not pipeline/ alone. Built from a copy:
    setuptools writes build/ and *.egg-info beside the sources."""
    source = tmp_path / "source"
    shutil.copytree(os.path.join(ROOT, "pipeline"), source / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path)], check=True, cwd=tmp_path)
    wheel, = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    held = {n for n in zipfile.ZipFile(tmp_path / wheel).namelist() if n.endswith(".py")}
    ours = {os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/")
            for d, _, files in os.walk(os.path.join(ROOT, "pipeline"))
            for f in files if f.endswith(".py")}
    assert ours - held == set()
