"""The source tree is the import tree: fastdiff.a.b is fastdiff/a/b.py of the checkout (no package-dir remap), a
plain checkout on PYTHONPATH imports (the evaluation tools and reference models too), and every package in the tree
ships in the wheel (setuptools lists them explicitly)."""

import importlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
TOOL = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _folder(package: str) -> Path:
    """Where setuptools takes `package` from: the path its dotted name spells."""
    return ROOT / Path(*package.split("."))


def test_nothing_is_remapped():
    assert not TOOL.get("package-dir"), TOOL["package-dir"]


def test_every_package_is_listed_and_exists():
    listed = set(TOOL["packages"])
    for package in listed:
        assert (_folder(package) / "__init__.py").is_file(), f"{package}: no {_folder(package)}/__init__.py"
    folder = ROOT / "fastdiff"
    for init in folder.rglob("__init__.py"):
        rel = init.parent.relative_to(folder)
        if "__pycache__" in rel.parts:
            continue
        name = ".".join(["fastdiff", *rel.parts])
        assert name in listed, f"{name} ({init.parent}) is missing from [tool.setuptools] packages"


def test_every_module_is_the_file_its_name_spells():
    """Import every listed package; each fastdiff.* module then loaded lies at fastdiff/<dotted path> of this
    checkout (a package-dir remap, or a stale install, puts it elsewhere)."""
    for package in TOOL["packages"]:
        importlib.import_module(package)
    loaded = {n: m for n, m in sys.modules.items() if n.startswith("fastdiff.")}
    assert {"fastdiff.kernels.runtime", "fastdiff.configs", "fastdiff.eval.reference"} <= set(loaded)
    for name, module in loaded.items():
        path = Path(module.__file__).resolve()
        spelled = ROOT / Path(*name.split("."))
        assert path in (spelled.with_suffix(".py"), spelled / "__init__.py"), f"{name} is {path}, not under {spelled}"


def test_a_plain_checkout_on_pythonpath_imports(tmp_path):
    """No install: `python -S` reads no .pth file, so the editable finder is not there; site-packages only supplies
    the dependencies (torch, diffusers)."""
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sorted(paths)])}
    code = ("import sys, fastdiff, fastdiff.kernels, fastdiff.configs, fastdiff.attention.dispatch\n"
            "from fastdiff.eval import reference, tiny\n"
            "assert not any('editable' in repr(f).lower() for f in sys.meta_path), sys.meta_path\n"
            "assert reference.load('ref-digits') is not None\n"
            "print(fastdiff.__file__, fastdiff.kernels.__file__, ','.join(fastdiff.presets()))")
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    init, kernels, presets = out.stdout.split()
    assert Path(init) == ROOT / "fastdiff" / "__init__.py" and Path(kernels) == ROOT / "fastdiff/kernels/__init__.py"
    assert presets.split(",") == sorted(p.stem for p in (ROOT / "fastdiff" / "configs").glob("*.yaml"))


def _imported_by(modules: str) -> set[str]:
    """fastdiff.* modules loaded by importing `modules` in a fresh interpreter, the package's __init__ (the public
    face, which imports everything) left out: the parent package is a bare module over fastdiff/."""
    code = ("import sys, types\n"
            f"pkg = types.ModuleType('fastdiff'); pkg.__path__ = [{str(ROOT / 'fastdiff')!r}]\n"
            "sys.modules['fastdiff'] = pkg\n"
            f"import {modules}\n"
            "from fastdiff.config import FastDiffConfig\n"
            "FastDiffConfig(sparse={'backend': 'gather'}).validate()\n"
            "print(' '.join(sorted(n for n in sys.modules if n.startswith('fastdiff.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(out.stdout.split())


def test_cost_and_config_sit_below_mechanisms_planner_and_dispatch():
    cost = sorted(f"fastdiff.cost.{p.stem}" for p in (ROOT / "fastdiff" / "cost").glob("*.py") if p.stem != "__init__")
    loaded = _imported_by(", ".join(["fastdiff.cost", *cost, "fastdiff.config"]))
    assert {"fastdiff.cost.model", "fastdiff.cost.estimate", "fastdiff.config", "fastdiff.adapters.base"} <= loaded
    above = [n for n in loaded if n.split(".")[1] in ("mechanisms", "planner", "session", "attention", "kernels")]
    assert not above, f"fastdiff.cost / fastdiff.config import {above}"
