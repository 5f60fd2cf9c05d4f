"""The source distribution: what a build from it needs is in it, and nothing half of a suite.

The tests, benchmarks and examples run from the repository (the tests import ``benchmarks.*``
and ``examples.*``; the benchmarks hold tens of MB of results), so the sdist leaves out
``tests/``: shipping the top-level test files without their helpers and subfolders gave a
suite that fails at import.
"""

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("*.py", "*.cpp", "*.h", "*.cu", "*.cuh")


def _sdist_names(tmp_path) -> set:
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                    "sdist", "-d", str(tmp_path)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    (archive,) = tmp_path.glob("salsa[-_]fused-*.tar.gz")  # setuptools before 69.3 kept the dash
    with tarfile.open(archive) as sdist:
        return {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}


def test_the_sdist_holds_every_source_of_the_package_and_the_extension_and_no_tests(tmp_path):
    names = _sdist_names(tmp_path)
    needed = {"setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"}
    for folder in ("salsa_fused", "csrc"):
        for pattern in SOURCES:
            needed |= {path.relative_to(ROOT).as_posix() for path in (ROOT / folder).rglob(pattern)
                       if "__pycache__" not in path.parts}
    missing = sorted(needed - names)
    assert not missing, f"the sdist lacks {missing}"
    assert not [name for name in names if name.startswith("tests/")], "a partial test suite was shipped"
    assert not [name for name in names if name.endswith((".so", ".pyd", ".o"))], "a build output was shipped"


def test_the_documents_the_readme_links_are_in_the_sdist(tmp_path):
    """The README is the sdist's front page: the docs/ and csrc/ files it links were left out, so its
    links led nowhere in an unpacked sdist (the benchmarks' result files stay in the repository)."""
    links = {target.split("#", 1)[0] for target in re.findall(r"\]\(([^)\s]+)\)", (ROOT / "README.md").read_text())}
    shipped = sorted(link for link in links if link.startswith(("docs/", "csrc/")))
    assert "docs/api.md" in shipped and all((ROOT / link).is_file() for link in shipped), shipped
    missing = sorted(set(shipped) - _sdist_names(tmp_path))
    assert not missing, f"the sdist lacks what the README links: {missing}"


def test_a_wheel_whose_extension_failed_to_build_is_pure_and_ships_no_stale_library(tmp_path):
    """No working compiler: the wheel holds the pure-Python package, tagged py3-none-any, and not a
    library an earlier build left in build/ (it shipped, beside a platform tag, before)."""
    tree = tmp_path / "tree"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes((ROOT / name).read_bytes())
    stale = tree / "build" / f"lib.{sysconfig.get_platform()}-{sys.implementation.cache_tag}" / "salsa_fused"
    stale.mkdir(parents=True)
    (stale / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}").write_bytes(b"an earlier build")
    env = {**os.environ, "CC": "false", "CXX": "false"}
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                           "-w", str(tmp_path / "wheels"), str(tree)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("*.whl")
    assert wheel.name == "salsa_fused-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "Root-Is-Purelib: true" in archive.read("salsa_fused-0.1.0.dist-info/WHEEL").decode()
    assert "salsa_fused/optimizer.py" in names and "salsa_fused/backends/triton_backend.py" in names
    assert not [name for name in names if name.endswith((".so", ".pyd"))], names


def test_every_public_submodule_is_an_attribute_after_a_plain_import():
    """``salsa_fused.presets`` after ``import salsa_fused`` raised AttributeError while
    ``salsa_fused.rules`` worked (imported by the names the package exports). The import leaves
    ``torch._dynamo`` unimported: a ``torch.compiler.disable`` decorator on the optimizer class
    imported it, which doubled the package's import time (2.9 s to 5.5 s on 2 cores)."""
    package = Path(__file__).resolve().parents[1] / "salsa_fused"
    public = sorted(path.stem if path.is_file() else path.name for path in package.iterdir()
                    if not path.name.startswith("_") and (path.suffix == ".py" or (path / "__init__.py").exists()))
    code = ("import salsa_fused, sys\n"
            f"for name in {public!r}:\n"
            "    assert getattr(salsa_fused, name).__name__ == 'salsa_fused.' + name, name\n"
            "assert 'torch._dynamo' not in sys.modules, 'import salsa_fused imported torch._dynamo'\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_package_imports_and_searches_without_numpy():
    """numpy is not a requirement: a bare CUDA torch (a borrowed GPU machine) may lack it. With
    its import blocked, every submodule imports and a searching run ends bitwise as with numpy."""
    package = Path(__file__).resolve().parents[1] / "salsa_fused"
    public = sorted(path.stem if path.is_file() else path.name for path in package.iterdir()
                    if not path.name.startswith("_") and (path.suffix == ".py" or (path / "__init__.py").exists()))
    code = ("import sys, warnings\n"
            "if sys.argv[1] == 'blocked':\n"
            "    sys.modules['numpy'] = None\n"
            "warnings.simplefilter('ignore')\n"
            "import importlib, torch\n"
            "from salsa_fused import FusedSaLSa\n"
            f"for name in {public!r}:\n"
            "    importlib.import_module('salsa_fused.' + name)\n"
            "torch.manual_seed(0)\n"
            "model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))\n"
            "opt = FusedSaLSa(model.parameters(), backend='torch')\n"
            "x = torch.randn(64, 4); y = x.sum(1, keepdim=True).sin()\n"
            "for _ in range(30):\n"
            "    opt.zero_grad(); opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))\n"
            "print(opt.num_forward_evals, opt.step_size.hex(), [p.sum().item().hex() for p in model.parameters()])")
    runs = [subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, timeout=120)
            for how in ("blocked", "imported")]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and int(runs[0].stdout.split()[0]) > 30, runs[0].stdout


def _oldest_python() -> tuple:
    """The oldest Python ``setup.py`` declares (``python_requires=">=3.X"``), as ``(3, X)``."""
    (declared,) = re.findall(r'python_requires=">=(\d+)\.(\d+)"', (ROOT / "setup.py").read_text())
    return tuple(int(part) for part in declared)


def _package_sources():
    return sorted(path for path in (ROOT / "salsa_fused").rglob("*.py") if "__pycache__" not in path.parts)


def test_the_package_uses_no_syntax_or_runtime_typing_newer_than_the_oldest_python_it_declares():
    """Only one interpreter (3.11) has a torch wheel here, so the package is never run on the oldest Python
    ``setup.py`` admits. What that Python would refuse at import is checked instead: its grammar
    (``ast.parse(feature_version=...)``: ``match``, for one), ``X | Y`` of types evaluated at run time (in
    ``isinstance``, or in annotations of a module without ``from __future__ import annotations``) and the
    3.10 keywords ``zip(strict=)`` and ``dataclass(kw_only=, slots=)``."""
    oldest = _oldest_python()
    found = []
    for path in _package_sources():
        name = path.relative_to(ROOT).as_posix()
        try:
            ast.parse(path.read_text(), name, feature_version=oldest)
        except SyntaxError as error:
            found.append(f"{name}:{error.lineno}: {error.msg}")
            continue
        tree = ast.parse(path.read_text(), name)
        lazy_annotations = any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
                               and any(alias.name == "annotations" for alias in node.names) for node in tree.body)
        if oldest >= (3, 10):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                called = getattr(node.func, "id", getattr(node.func, "attr", None))
                if called in ("isinstance", "issubclass") and len(node.args) == 2 \
                        and isinstance(node.args[1], ast.BinOp):
                    found.append(f"{name}:{node.lineno}: a type union X | Y in {called}")
                keywords = {keyword.arg for keyword in node.keywords}
                if called == "zip" and "strict" in keywords or called == "dataclass" and keywords & {"kw_only", "slots"}:
                    found.append(f"{name}:{node.lineno}: {called}({', '.join(sorted(keywords))}) is 3.10+")
            annotation = getattr(node, "annotation", None) if isinstance(node, (ast.arg, ast.AnnAssign)) else \
                getattr(node, "returns", None) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if annotation is not None and not lazy_annotations \
                    and any(isinstance(part, ast.BinOp) for part in ast.walk(annotation)):
                found.append(f"{name}:{node.lineno}: an annotation X | Y evaluated at import")
    assert not found, f"newer than Python {oldest[0]}.{oldest[1]}: {found}"


def test_the_oldest_python_it_declares_compiles_every_module_where_that_interpreter_is_installed():
    """Where that interpreter is on the machine (pyenv's, on this project's CI), it compiles each module:
    ``ast``'s ``feature_version`` above is best-effort, that interpreter's own grammar is the real one."""
    oldest = _oldest_python()
    version = f"{oldest[0]}.{oldest[1]}"
    candidates = sorted(str(path) for path in Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")).glob(
        f"versions/{version}.*/bin/python{version}")) + [shutil.which(f"python{version}")]

    def runs(path) -> bool:  # pyenv's shim is on PATH where the version is not selected, and fails
        return bool(path) and subprocess.run([path, "-c", "pass"], capture_output=True, timeout=60).returncode == 0

    interpreter = next((path for path in candidates if runs(path)), None)
    if interpreter is None:
        pytest.skip(f"no Python {version} interpreter on this machine (pyenv's or on PATH)")
    code = ("import sys\n"
            "for path in sys.argv[1:]:\n"
            "    compile(open(path, encoding='utf-8').read(), path, 'exec')\n"
            "print(sys.version_info[:2])")
    done = subprocess.run([interpreter, "-c", code, *map(str, _package_sources())], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(oldest), done.stdout
