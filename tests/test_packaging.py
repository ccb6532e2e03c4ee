"""The package declares what it needs: every third-party module the code imports is a dependency
(core) or an extra (a domain's) in ``pyproject.toml``; every console script names a function; each
package ships ``py.typed``; the Hydra configs and open_clip model configs are package data.

The fresh-venv install of a wheel built from the repository and a debug run of each domain is the
``slow`` test at the end (``pytest -m slow tests/test_packaging.py``)."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGES = ("core", "vision", "recsys", "multimodal", "nlp")
OWN = {*PACKAGES, "conf", "hydra_plugins", "tests"}
DOMAIN_EXTRA = {"vision": "vision", "recsys": "recsys", "multimodal": "multimodal", "nlp": "nlp"}
# import name -> distribution where the installed metadata cannot say (a module absent here)
KNOWN = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "open_clip": "open-clip-torch",
         "fbgemm_gpu": "fbgemm-gpu-cpu"}


def _norm(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.match(r"[A-Za-z0-9._-]+", req).group(0))


@functools.cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distribution(module: str) -> str:
    found = _installed().get(module)
    return _norm(found[0] if found else KNOWN.get(module, module))


def third_party_imports(package: str) -> dict[str, set[str]]:
    """``{top-level module: files importing it}`` for the absolute imports in ``package`` that are
    neither the standard library nor the suite's own packages (lazy imports inside functions included)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OWN and top != "__future__":
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def _declared(*extras: str) -> set[str]:
    project = PYPROJECT["project"]
    reqs = list(project["dependencies"]) + list(PYPROJECT["tool"]["moe-suite"]["install-no-deps"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return {_requirement_name(r) for r in reqs}


# optional backends that core imports only when a config chooses them
CORE_OPTIONAL_EXTRAS = ("tracking",)


@pytest.mark.parametrize("package", PACKAGES + ("hydra_plugins",))
def test_every_third_party_import_is_declared(package):
    extra = DOMAIN_EXTRA.get(package)
    declared = _declared(*([extra] if extra else CORE_OPTIONAL_EXTRAS))
    missing = {mod: sorted(files) for mod, files in third_party_imports(package).items()
               if _distribution(mod) not in declared}
    where = f"[project.optional-dependencies] {extra}" if extra else "[project] dependencies (or tracking)"
    assert not missing, f"imported by {package} but not in pyproject.toml's {where}: {missing}"


# libraries the code needs without importing them: (what the code calls, the distribution it needs)
IMPLIED = [("read_parquet(", "pyarrow")]


@pytest.mark.parametrize("package", PACKAGES)
def test_libraries_used_through_another_are_declared(package):
    extra = DOMAIN_EXTRA.get(package)
    declared = _declared(*([extra] if extra else CORE_OPTIONAL_EXTRAS))
    for path in sorted((REPO / package).rglob("*.py")):
        for call, dist in IMPLIED:
            assert call not in path.read_text() or _norm(dist) in declared, f"{path.name} calls {call} and needs {dist}"


def test_core_needs_no_extra():
    """``import core`` and its tools work with the base dependencies: core imports no domain library."""
    domain_only = _declared(*DOMAIN_EXTRA.values()) - _declared()
    used = {mod: files for mod, files in third_party_imports("core").items() if _distribution(mod) in domain_only}
    assert not used, f"core imports libraries of a domain extra: {used}"


def test_the_extras_stay_within_the_tested_pins():
    """Every pinned distribution of requirements/ that the package declares admits the pinned version."""
    from packaging.requirements import Requirement

    pins = {}
    for name in ("base.txt", "nodeps.txt"):
        for line in (REPO / "requirements" / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if "==" in line:
                dist, version = line.split("==")
                pins[_norm(dist)] = version.strip()
    project = PYPROJECT["project"]
    reqs = list(project["dependencies"]) + list(PYPROJECT["tool"]["moe-suite"]["install-no-deps"])
    reqs += [r for extra in project["optional-dependencies"].values() for r in extra if not r.startswith("moe-suite")]
    for req in map(Requirement, reqs):
        pin = pins.get(_norm(req.name))
        if pin is not None:
            assert req.specifier.contains(pin, prereleases=True), f"{req} excludes requirements/' {req.name}=={pin}"


@pytest.mark.parametrize("script,target", sorted(PYPROJECT["project"]["scripts"].items()))
def test_each_console_script_names_a_function(script, target):
    module, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attr)), f"{script} = {target}"


def test_the_domain_commands_run_their_hydra_entry_point(monkeypatch):
    """``moe-<domain>-train`` hands the domain's ``@hydra.main`` function to ``core.run.command_line``."""
    import core.commands

    ran = []
    monkeypatch.setattr(core.commands, "command_line", ran.append)
    for domain in DOMAIN_EXTRA:
        target = PYPROJECT["project"]["scripts"][f"moe-{domain}-train"]
        module, _, attr = target.partition(":")
        getattr(importlib.import_module(module), attr)()
        assert ran[-1] is importlib.import_module(f"{domain}.train").main


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_is_typed(package):
    assert (REPO / package / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["*"]


def test_configs_are_package_data():
    """The globs of ``[tool.setuptools.package-data]`` cover every YAML of ``conf/`` (``pkg://conf``)
    and every open_clip model config JSON."""
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    yamls = sorted((REPO / "conf").rglob("*.yaml"))
    assert yamls
    for path in yamls:
        rel = path.relative_to(REPO / "conf")
        assert any(rel.match(glob) or (glob.startswith("**/") and rel.match(glob[3:])) for glob in data["conf"]), rel
    jsons = sorted((REPO / "multimodal" / "model_configs").glob("*.json"))
    assert jsons and all(p.relative_to(REPO / "multimodal").match(g) for p in jsons for g in data["multimodal"])
    found = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {"conf*", "hydra_plugins*"} <= set(found)


# ------------------------------------------------------- the wheel in a fresh venv (manual, slow)


@pytest.mark.slow
def test_the_wheel_installs_and_trains_each_domain_outside_the_repo(tmp_path):
    """Build the wheel, install it into a new venv (torch from the local wheel store as the Makefile
    does, the rest from the package index) and run ``moe-<domain>-train debug=default`` from a
    directory outside the repository. Needs the network (or a populated pip cache) and minutes."""
    wheel_dir, venv, work, src = tmp_path / "wheel", tmp_path / "venv", tmp_path / "work", tmp_path / "src"
    work.mkdir()
    # built from a copy: setuptools leaves build/ and *.egg-info in the tree it builds
    top_level = {"outputs", "multirun", "data", "build", "dist", "bench_results"}

    def ignored(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n.startswith(".") or n.endswith(".egg-info") or n == "__pycache__"
                or (Path(folder) == REPO and n in top_level)}

    shutil.copytree(REPO, src, ignore=ignored)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w",
                    str(wheel_dir)], check=True, cwd=tmp_path)
    wheel = next(wheel_dir.glob("moe_suite-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    base = {_norm(line.split("==")[0]): line for line in (REPO / "requirements" / "base.txt").read_text().split()
            if "==" in line}
    subprocess.run(pip + [base["torch"], base["torchvision"]], check=True)
    subprocess.run(pip + [f"{wheel}[vision,recsys,multimodal,nlp]"], check=True)
    subprocess.run(pip + ["--no-deps", *PYPROJECT["tool"]["moe-suite"]["install-no-deps"]], check=True)
    for domain in DOMAIN_EXTRA:
        out = subprocess.run([str(venv / "bin" / f"moe-{domain}-train"), "debug=default",
                              f"hydra.run.dir={work / domain}"], cwd=work, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        assert (work / domain / "metrics.json").is_file()
