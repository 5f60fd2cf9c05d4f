"""The source distribution: what a build from it needs is in it, and nothing half of a suite.

The tests, benchmarks and examples run from the repository (the tests import ``benchmarks.*``
and ``examples.*``; the benchmarks hold tens of MB of results), so the sdist leaves out
``tests/``: shipping the top-level test files without their helpers and subfolders gave a
suite that fails at import.
"""

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("*.py", "*.cpp", "*.h", "*.cu", "*.cuh")


def _sdist_names(tmp_path) -> set:
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                    "sdist", "-d", str(tmp_path)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    (archive,) = tmp_path.glob("salsa_fused-*.tar.gz")
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
