"""Peak memory of loading the real Gemma 3 270M: minilora vs transformers.

    python benchmarks/bench_load.py [--model DIR]

Each loader runs in a fresh subprocess. The figure is the process's peak resident memory (VmHWM)
after loading minus its resident memory after the imports, so library code is not counted; the
ratio is to the model's size in its dtype (float32 here, as dtype="auto" gives on CPU). It is
taken twice: right after loading, and after one forward pass of 6 tokens, because a loader that
leaves float32 weights mapped from the file (transformers does) reads them in only when used. Three
cases: the converted folder as it is (float32 safetensors); a bfloat16 copy of it, the usual hub
dtype, upcast to float32 while loading; and the float32 folder quantized to NF4 while loading
(minilora's quantize="nf4", transformers' load_in_4bit with bitsandbytes), where the model's size is
its quantized size (packed weights and their quantization state, embedding and norms in float32) and
minilora's goal is that size plus one weight read in float32 before it is quantized.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, torch
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
loader, path, quantize = sys.argv[1], sys.argv[2], {"nf4": "nf4", "none": None}[sys.argv[3]]
if loader == "minilora":
    import minilora
    load = lambda: minilora.gemma.from_pretrained(path, dtype=torch.float32, quantize=quantize)
else:
    import transformers
    kw = dict(quantization_config=transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32), device_map="cpu") if quantize else {}
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
before = status("VmRSS")
model = load()
peak = status("VmHWM")
with torch.inference_mode():  # touches every weight: a lazily mapped file is read in here
    model(torch.tensor([[2, 818, 5279, 529, 7001, 563]]))
used = status("VmHWM")
tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
size = sum(t.numel() * t.element_size() for t in tensors)
print(json.dumps({"peak": peak - before, "used": used - before, "size": size}))
"""


def measure(loader: str, path: str, quantize: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, loader, path, quantize], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bf16_copy(path: str, out: str) -> None:
    """The same checkpoint with every tensor stored as bfloat16."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    for name in os.listdir(path):
        if name != "model.safetensors" and os.path.isfile(os.path.join(path, name)):
            shutil.copy(os.path.join(path, name), out)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    args = p.parse_args()
    from minilora.gguf import default_model_dir

    path = str(args.model or default_model_dir())
    gib = 2**30
    with tempfile.TemporaryDirectory() as tmp:
        bf16_copy(path, tmp)
        cases = [("float32 file -> float32", path, "none"), ("bfloat16 file -> float32", tmp, "none")]
        cases += [("float32 file -> NF4 linear weights (float32 compute)", path, "nf4")]
        for label, folder, quantize in cases:
            results = {loader: measure(loader, folder, quantize) for loader in ("minilora", "transformers")}
            size = results["minilora"]["size"]
            print(f"{label}: model {size / gib:.2f} GiB")
            for loader, r in results.items():
                print(
                    f"  {loader:>13}: peak after loading {r['peak'] / gib:.2f} GiB = {r['peak'] / size:.2f}x "
                    f"the model; after one forward {r['used'] / gib:.2f} GiB = {r['used'] / size:.2f}x"
                )
            for key, when in (("peak", "after loading"), ("used", "after a forward")):
                ratio = results["minilora"][key] / results["transformers"][key]
                print(f"  minilora / transformers, {when}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
