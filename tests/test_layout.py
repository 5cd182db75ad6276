"""The house's layout holds: pipeline/'s floors import downward only, no file needs more than two sibling sub-packages,
the job names no backend, and algorithms/ imports no backend or zoo."""

import ast
from pathlib import Path

import pytest

from backends import BACKEND_NAMES, BACKENDS

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipeline"
SHARED = {"errors", "atomic", "cli"}  # what every floor may use: they import no other part of the pipeline
FLOORS = {"data": 1, "train": 2, "deploy": 3, "job": 4, "analysis": 5}  # the job: the modules in pipeline/ itself


def floor_of(module: str) -> tuple[str, int]:
    """('data', 1) for pipeline.data.*, ('shared', 0) for pipeline.errors, ('job', 4) for pipeline.job, ..."""
    parts = module.split(".")[1:]
    if parts and parts[0] in FLOORS and parts[0] != "job" and (PIPELINE / parts[0]).is_dir():
        return parts[0], FLOORS[parts[0]]
    return ("shared", 0) if parts and parts[0] in SHARED else ("job", FLOORS["job"])


def pipeline_imports(path: Path) -> set[str]:
    """Every pipeline module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            found.add(node.module if node.module != "pipeline" else f"pipeline.{node.names[0].name}")
            for alias in node.names:  # from pipeline.deploy import quantize: the module pipeline.deploy.quantize
                if (PIPELINE / Path(*node.module.split(".")[1:]) / f"{alias.name}.py").is_file():
                    found.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "pipeline"}
    return found


def modules() -> list[Path]:
    return sorted(p for p in PIPELINE.rglob("*.py") if p.name != "__init__.py")


def test_pipeline_is_split_by_job_into_small_sub_packages():
    for package in ("data", "train", "deploy", "analysis"):
        files = list((PIPELINE / package).glob("*.py"))
        assert (PIPELINE / package / "__init__.py").is_file() and 1 < len(files) <= 12, package
    assert len(list(PIPELINE.glob("*.py"))) <= 12


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PIPELINE)))
def test_each_module_imports_downward_and_at_most_two_sibling_sub_packages(path):
    own = floor_of("pipeline." + ".".join(path.relative_to(PIPELINE).with_suffix("").parts))
    if path.parent == PIPELINE and path.stem in SHARED:
        own = ("shared", 0)
    siblings = set()
    for module in pipeline_imports(path):
        name, level = floor_of(module)
        if name == own[0]:
            continue
        assert level < own[1], (
            f"{path.relative_to(ROOT)} ({own[0]}) imports {module} ({name}), a floor at or above its own"
        )
        if name in ("data", "train", "deploy", "analysis"):
            siblings.add(name)
    if path.parent != PIPELINE:  # the job itself drives every floor below it; a floor's files lean on two at most
        assert len(siblings) <= 2, f"{path.relative_to(ROOT)} needs {sorted(siblings)}"


def test_the_job_names_no_backend():
    tree = ast.parse((PIPELINE / "job.py").read_text())
    literals = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert not literals & set(BACKEND_NAMES), literals & set(BACKEND_NAMES)
    # backends.scratch, backends.nni_backend, ...
    pruning_backends = {target.split(":")[0] for target in BACKENDS.values()}
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & pruning_backends, imported & pruning_backends


def test_algorithms_prune_any_model_without_backends_or_the_zoo():
    for path in (ROOT / "algorithms").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in getattr(node, "names", [])]
            )
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                assert not any(n.split(".")[0] in ("backends", "models", "pipeline", "bench") for n in names), path.name
