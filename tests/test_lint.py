"""The repository stays ruff-clean (lint and format), and the product never imports the oracles."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_check_and_format():
    check = subprocess.run(["ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = subprocess.run(["ruff", "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_product_does_not_import_the_oracles():
    pattern = re.compile(r"^\s*(import|from)\s+(transformers|peft|bitsandbytes)\b", re.MULTILINE)
    offenders = [
        str(p.relative_to(ROOT))
        for d in ("minilora", "kernels")
        for p in (ROOT / d).rglob("*.py")
        if pattern.search(p.read_text(encoding="utf-8"))
    ]
    assert not offenders, (
        f"minilora/ and kernels/ must not import transformers, peft or bitsandbytes: {offenders}"
    )
