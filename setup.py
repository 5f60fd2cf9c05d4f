"""Build of salsa_fused: pure Python with Triton kernels, plus the optional C++/CUDA
extension ``salsa_fused._C`` (csrc/, built with ninja) when torch and a compiler are there.

Without them (or when the build fails) the install still succeeds, pure Python, and says
in one line what was not built. ``pip install --no-build-isolation .`` lets the build see
the installed torch; ``SALSA_FUSED_JIT=1`` compiles the extension at first use instead.
"""

import os
import runpy
import sys

from setuptools import find_packages, setup

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

# Compiler flags and sources: salsa_fused/_build_flags.py (shared with the JIT build).
BUILD = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "salsa_fused", "_build_flags.py"))


def _extension_build():
    """(ext_modules, cmdclass) for the extension, or ([], {}) with a notice why not."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("salsa_fused: C++ extension not built (torch not importable at build time: an isolated build; "
              "use pip install --no-build-isolation, with torch, setuptools, wheel and ninja installed first; in "
              "an editable install of a checkout, SALSA_FUSED_JIT=1 also builds it at import)", file=sys.stderr)
        return [], {}

    sources = [BUILD["PYTHON_MODULE_SOURCE"]] + BUILD["CPU_SOURCES"]

    def cpu_extension():
        return cpp_extension.CppExtension("salsa_fused._C", sources, extra_compile_args={"cxx": BUILD["CXX_FLAGS"]},
                                          extra_link_args=BUILD["LINK_FLAGS"])

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """BuildExtension (ninja) that builds the CPU part alone when the CUDA part fails (an nvcc whose
        CUDA differs from torch's, say), and leaves a pure-Python install when compiling fails."""

        def run(self):
            # a run that raised left the compiler's name replaced by an object and inplace cleared: a retry
            # starts from both as they were
            compiler, inplace = self.compiler, self.inplace
            try:
                return super().run()
            except Exception as error:  # no compiler, failed compile: the package works without it
                failure = error
            if any(source.endswith(".cu") for extension in self.extensions for source in extension.sources):
                print(f"salsa_fused: the CUDA part of the C++ extension not built ({type(failure).__name__}: "
                      f"{failure}); building its CPU part alone", file=sys.stderr)
                cpu = cpu_extension()
                for extension in self.extensions:  # setuptools' own fields on it stay (finalize_options set them)
                    for field in ("sources", "include_dirs", "library_dirs", "libraries", "extra_compile_args",
                                  "extra_link_args", "define_macros", "language"):
                        setattr(extension, field, getattr(cpu, field))
                self.compiler, self.inplace = compiler, inplace
                try:
                    return super().run()
                except Exception as error:
                    failure = error
            print(f"salsa_fused: C++ extension not built ({type(failure).__name__}: {failure}); "
                  "the torch and triton backends remain", file=sys.stderr)
            self.distribution.extension_not_built = True
            for extension in self.extensions:  # an earlier build's library must not ship as this one's
                stale = self.get_ext_fullpath(extension.name)
                if not self.inplace and os.path.exists(stale):
                    os.remove(stale)

    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None \
        and os.environ.get("SALSA_FUSED_NO_CUDA") != "1"
    if with_cuda:
        extension = cpp_extension.CUDAExtension(
            "salsa_fused._C", sources + BUILD["CUDA_SOURCES"],
            extra_compile_args={"cxx": BUILD["CXX_FLAGS"], "nvcc": BUILD["NVCC_FLAGS"]},
            extra_link_args=BUILD["LINK_FLAGS"])
    else:
        extension = cpu_extension()
    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


class WheelTaggedByItsContents(bdist_wheel):
    """A wheel whose extension failed to build holds pure Python: tagged ``py3-none-any`` and
    ``Root-Is-Purelib``, not for the build machine's interpreter and platform."""

    def get_tag(self):
        if getattr(self.distribution, "extension_not_built", False):
            self.root_is_pure = True
        return super().get_tag()


ext_modules, cmdclass = _extension_build()
cmdclass["bdist_wheel"] = WheelTaggedByItsContents

setup(
    name="salsa-fused",
    version="0.1.0",
    description="SaLSa (Stable Armijo Line Search Adaptation) for PyTorch on fused multi-tensor kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["salsa_fused", "salsa_fused.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        # examples/pretrain_gpt.py: progress bar and plot
        "examples": ["tqdm", "matplotlib"],
        # every package the tests and the benchmarks they run import; Triton runs the kernels
        # on the CPU interpreter there, so the kernel tests need it on every machine
        "test": ["pytest", "numpy", "pytest-timeout", "pytest-benchmark", "triton>=3.0", "salsa-optimizer==0.1.0",
                 "transformers", "accelerate", "lightning", "matplotlib", "scikit-learn",
                 "prodigyopt", "schedulefree", "prodigy-plus-schedule-free", "tqdm"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
