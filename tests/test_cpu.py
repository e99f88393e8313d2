"""dtype="auto" on the CPU (minilora.cpu): bf16 where the CPU has fast bf16 matrix instructions,
float32 elsewhere; an explicit dtype always wins. Both answers are tested on any machine by standing
in for torch's capability query and the micro-benchmark; the real query is checked for what it can
be on this machine."""

import pytest
import torch

from minilora import cpu
from minilora.checkpoint import resolve_dtype


@pytest.fixture
def machine(monkeypatch):
    """machine(features, fp32, bf16): a CPU with these bf16 features and matmul rates (GFLOP/s).
    Returns the list of dtypes the benchmark was asked to time."""
    timed = []

    def make(features, fp32=100.0, bf16=100.0):
        rates = {torch.float32: fp32, torch.bfloat16: bf16}
        monkeypatch.setattr(cpu, "bf16_features", lambda: list(features))
        monkeypatch.setattr(cpu, "matmul_gflops", lambda dtype: timed.append(dtype) or rates[dtype])
        cpu.fast_bf16.cache_clear()
        return timed

    yield make
    cpu.fast_bf16.cache_clear()


def test_without_amx_or_avx512_bf16_auto_is_float32_and_nothing_is_timed(machine):
    timed = machine([])
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert timed == []  # a bf16 matmul without the instructions would take seconds
    assert "no AMX or AVX-512-BF16" in cpu.auto_dtype_reason("cpu")


@pytest.mark.parametrize("features", [["AMX", "AVX-512-BF16"], ["AVX-512-BF16"]])
def test_fast_bf16_makes_auto_bf16(machine, features):
    timed = machine(features, fp32=305.0, bf16=2085.0)  # the AMX Xeon of DESIGN.md section 7
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    reason = cpu.auto_dtype_reason("cpu")
    assert "2085 GFLOP/s" in reason and "6.8x" in reason and "bf16 base weights" in reason
    assert sorted(timed, key=str) == [torch.bfloat16, torch.float32]


def test_the_flag_without_the_speed_is_float32(machine):
    machine(["AVX-512-BF16"], fp32=100.0, bf16=cpu.BF16_SPEEDUP * 100.0 - 1)
    assert resolve_dtype("auto", "cpu") == torch.float32
    machine(["AVX-512-BF16"], fp32=100.0, bf16=cpu.BF16_SPEEDUP * 100.0)
    assert resolve_dtype("auto", "cpu") == torch.bfloat16


def test_the_decision_is_taken_once_per_process(machine):
    timed = machine(["AMX"], fp32=300.0, bf16=2000.0)
    for _ in range(3):
        resolve_dtype("auto", "cpu")
        cpu.auto_dtype_reason("cpu")
    assert len(timed) == 2  # float32 and bf16, once


@pytest.mark.parametrize("fast", [True, False])
def test_an_explicit_dtype_overrides_the_decision(machine, fast):
    timed = machine(["AMX"], fp32=300.0, bf16=2000.0 if fast else 1.0)
    assert resolve_dtype("float32", "cpu") == resolve_dtype(torch.float32, "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert timed == []  # asked for nothing


def test_the_real_query_on_this_machine():
    cpu.fast_bf16.cache_clear()
    features = cpu.bf16_features()
    assert set(features) <= {"AMX", "AVX-512-BF16"}
    fast, why = cpu.fast_bf16()
    if not features:  # e.g. the AVX2-only EPYC: float32, said so
        assert not fast and resolve_dtype("auto", "cpu") == torch.float32
        assert torch.backends.cpu.get_cpu_capability() in why
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if fast else torch.float32)
    assert cpu.matmul_gflops(torch.float32, repeats=1) > 0
