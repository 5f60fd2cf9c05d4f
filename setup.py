"""Build of salsa_fused: pure Python with Triton kernels; no compiler needed."""

from setuptools import find_packages, setup

setup(
    name="salsa-fused",
    version="0.1.0",
    description="SaLSa (Stable Armijo Line Search Adaptation) for PyTorch on fused multi-tensor kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["salsa_fused", "salsa_fused.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        # examples/pretrain_gpt.py: progress bar and plot
        "examples": ["tqdm", "matplotlib"],
        # every package the tests and the benchmarks they run import; Triton runs the kernels
        # on the CPU interpreter there, so the kernel tests need it on every machine
        "test": ["pytest", "pytest-benchmark", "triton>=3.0", "salsa-optimizer==0.1.0",
                 "transformers", "accelerate", "lightning", "matplotlib", "scikit-learn",
                 "prodigyopt", "schedulefree", "tqdm"],
    },
)
