"""The README's demo command runs and shows the whole LoRA life cycle working."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_lora_demo_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "lora_demo.py")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    before, after = map(float, re.search(r"mse ([\d.]+) -> ([\d.]+)", out.stdout).groups())
    assert after < 0.2 * before
    reloaded = float(re.search(r"reloaded: mse ([\d.]+)", out.stdout).group(1))
    assert abs(reloaded - after) < 1e-4
    assert "restored bit for bit: True" in out.stdout


def readme_python_blocks(real_model: bool) -> list[str]:
    """The README's python blocks; those that start with "# real model" need the real Gemma 3 270M."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    return [code for code in blocks if code.startswith("# real model") == real_model]


def test_readme_usage_example_runs(tmp_path, monkeypatch):
    blocks = readme_python_blocks(real_model=False)
    assert blocks, "README.md has no python usage example"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


@pytest.mark.slow
def test_readme_gemma_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf")
    blocks = readme_python_blocks(real_model=True)
    assert blocks, "README.md has no Gemma usage example"
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the example reads examples/data/
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "out" / "dates" / "adapter" / "adapter_model.safetensors").is_file()
    assert capsys.readouterr().out.strip()  # the generated text


def test_readme_says_what_the_default_model_is_and_where_a_runs_files_are():
    # issue 9 (9): a newcomer's chat-format task on the default model needed more steps than expected
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())  # lines joined
    assert "It is the *pretrained* Gemma 3 270M, not the instruction-tuned one" in readme
    for name in ("`args.json`", "`metrics.jsonl`", "`checkpoint/`", "`adapter/`", "`runs/train_gemma`"):
        assert name in readme.split("The run's files are in `--out`")[1][:600], name
