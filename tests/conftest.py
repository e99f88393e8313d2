import os

import numpy as np
import pytest
import torch

# Without a GPU, run Triton kernels in Triton's CPU interpreter; this must happen before any
# kernel module is imported (triton.jit reads it when the kernels are defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`pytest -n 2`, the README's command) each worker takes one core: two OpenMP
# teams of 2 threads on 2 cores spin against each other. Subprocesses inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _round_to_nearest_even_like_the_gpu() -> bool:
    """Triton's interpreter casts float32 to bfloat16 by truncation; a GPU rounds to nearest even.
    Truncation errs twice as much, always toward zero, so sums of its errors do not cancel (4-6x the
    GPU's error on a LoRA gradient, measured). Make the interpreter round as the GPU does, so the tests
    measure the kernels and not the interpreter. Returns whether the patch applied."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "cast_impl") or not hasattr(interpreter, "TensorHandle"):
        return False
    truncating = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return truncating(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # max -> inf
        rounded = np.where(np.isnan(src.data), (bits >> 16).astype(np.uint16) | 0x40, rounded)  # NaN: NaN
        return interpreter.TensorHandle(rounded, tl.bfloat16)

    cast_impl.rounds_to_nearest_even = True  # tests/test_kernels.py looks for this
    builder.cast_impl = cast_impl
    return True


INTERPRETER_ROUNDS_BF16 = os.environ.get("TRITON_INTERPRET") == "1" and _round_to_nearest_even_like_the_gpu()


@pytest.fixture(autouse=True)
def _auto_is_float32_on_every_cpu(request, monkeypatch):
    """dtype="auto" loads float32 in the tests on every CPU, so the parity tests (which compare with
    float32 references at float32 tolerances) mean the same on an AMX machine as on an AVX2 one.
    tests/test_cpu.py asks the real question, both ways."""
    if request.module.__name__.rpartition(".")[2] != "test_cpu":
        import minilora.cpu

        monkeypatch.setattr(minilora.cpu, "fast_bf16", lambda: (False, "the tests run float32"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on 2 shared cores: OpenMP's thread team costs more than it gives. For a module:
    pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The modules that hold the suite's longest tests (the real 270M, the GPU probe's smoke run), by their
# measured share of `pytest --durations=0`: collected first, each module whole (its fixtures set up
# once), so that under xdist's work stealing a worker never starts a 40-80 s test while the other
# has nothing left to take (test_train.py and test_train_gemma.py used to come last).
SLOW_MODULES = ("test_float16.py", "test_train.py", "test_gguf.py", "test_train_gemma.py", "test_kernels.py")


def pytest_collection_modifyitems(items):
    first = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: first.get(item.path.name, len(SLOW_MODULES)))  # stable: order kept within
