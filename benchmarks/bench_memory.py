"""Will the seeds' fine-tunes fit a 16 GB card? Predicted peak GPU memory of each seed setup with a
bf16 base and with a 4-bit (NF4) base, AdamW and 8-bit AdamW.

    python benchmarks/bench_memory.py [--seq 512] [--skip-real]

Every model is built on the meta device from its config in tests/configs/ (no weights, no GPU).
Terms of the predicted peak, in bytes:
- weights: every parameter in bf16 (2 bytes); or NF4 (double-quantized, bitsandbytes' format: the
  packed codes, one uint8 absmax per 64 weights, one float32 per 256 absmax, the two code tables and
  the JSON) for every linear weight, with the embedding (= the tied head) and the norms in bf16.
  The NF4 formula is checked against Linear4bit.state_dict() of real layers.
- adapter: the LoRA parameters (float32) and their gradients (float32).
- optimizer: AdamW 8 bytes per adapter parameter; AdamW8bit 2 bytes, plus two float32 absmax per 256
  (tensors under 4096 values keep float32 moments, 8 bytes).
- activations: what autograd keeps from forward to backward, counted with saved-tensor hooks at the
  setup's own dimensions and compute dtype (fp16), batch 1, every position labelled: one forward of
  the meta model (shapes and dtypes, no data). The fused attention kernel is counted as the CPU and
  CUDA flash kernels keep it (q, k, v, output, float32 log-sum-exp); the meta device would otherwise
  run the unfused math path. With gradient checkpointing: each layer's input, plus one layer's
  activations while it is recomputed. This is the real 270M's measurement scaled to each setup's
  dimensions, done exactly: on the real Gemma 3 270M (real tensors, CPU, float32) the same count is
  taken from the real kernels and must equal the meta count of its config (checked below, unless
  --skip-real), and a real training step's measured peak is printed next to the prediction.
- transient: one chunk of minilora.loss's output head (loss_chunk_bytes; the full logits never
  exist), and one dequantized weight (the largest) in the compute dtype.
Not counted: the CUDA context and the allocator's slack (a few hundred MB; 1 GiB is reserved for
them below) and the KV/rope caches (small).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import torch
from torch import nn

import minilora as ml
from minilora import gemma as gemma_module
from minilora.checkpoint import config_from_hf
from minilora.gemma import Gemma
from minilora.loss import CHUNK_BYTES
from minilora.quant import Linear4bit

CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "configs"
GB, GIB, CARD, RESERVE = 1e9, 2**30, 16e9, 2**30
QKV, QKVO = ["q_proj", "k_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_SEVEN = [*QKVO, "gate_proj", "up_proj", "down_proj"]
# The seeds (issue 10): fp16 on 14-16 GB cards; sequence length and batch where the seed does not say: 512, 1
SETUPS = [
    ("gemma-7b, r=4 on q/k/v", "gemma-7b.json", 4, QKV),
    ("codegemma-7b, r=4 on q/k/v", "codegemma-7b.json", 4, QKV),
    ("gemma-2-9b, r=16 on all seven", "gemma-2-9b.json", 16, ALL_SEVEN),
    ("gemma-3-1b, r=8 on q/k/v/o", "gemma-3-1b-it.json", 8, QKVO),
    ("gemma-3-1b, r=16 on q/k/v/o", "gemma-3-1b-it.json", 16, QKVO),
]


def nf4_bytes(shape) -> int:
    """Bytes of one double-quantized NF4 weight in bitsandbytes' format (minilora.quant)."""
    n = math.prod(shape)
    blocks = math.ceil(n / 64)
    json_bytes = 170  # the quant_state JSON, as uint8
    return (n + 1) // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 16 + 4 * 256 + json_bytes


def check_nf4_formula() -> None:
    for shape in ((64, 640), (1024, 640), (2048, 640), (33, 65)):
        layer = Linear4bit.from_linear(torch.randn(shape))
        real = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
        assert abs(real - nf4_bytes(shape)) <= 8, (shape, real, nf4_bytes(shape))  # JSON length varies


def optimizer_bytes(params, eight_bit: bool) -> int:
    if not eight_bit:
        return sum(8 * p.numel() for p in params)
    return sum(2 * p.numel() + 8 * math.ceil(p.numel() / 256) if p.numel() >= 4096 else 8 * p.numel()
               for p in params)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Activations: what autograd saves for backward
# ----------------------------------------------------------------------------------------------------
@contextmanager
def saved_tensors(model: nn.Module, meta: bool):
    """Records every tensor autograd saves (minus the model's own parameters and buffers) as
    (layer index or None, tensor); on meta, the fused attention is counted as its kernels keep it."""
    records, layer = [], [None]
    own = {id(t) for t in (*model.parameters(), *model.buffers())}
    own_ptrs = (
        {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        if not meta
        else set()
    )

    def pack(t):
        base = t._base if t._base is not None else t
        if (
            id(t) not in own
            and id(base) not in own
            and (meta or t.untyped_storage().data_ptr() not in own_ptrs)
        ):
            records.append((layer[0], base))
        return t

    def flash(q, k, v, mask=None, is_causal=False, scale=None, enable_gqa=False):  # what flash keeps
        out = q * 1.0  # (B, nh, T, hd); saves nothing itself
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        # k, v: views of the shared key/value heads where expanding needs no copy (as pack records them)
        records.extend((layer[0], t if t._base is None else t._base) for t in (q, k, v, out, lse))
        if mask is not None:  # a boolean mask is kept as an additive one in q's dtype
            records.append((layer[0], torch.empty(mask.shape, dtype=q.dtype, device=q.device)))
        return out

    def fused_ce(h, weight, targets, softcap=None):  # what minilora.loss keeps: dh (labelled rows, d)
        labelled = targets.numel()  # every position labelled
        records.append((None, torch.empty(labelled, h.shape[-1], dtype=h.dtype, device=h.device)))
        records.append((None, torch.empty(targets.shape, dtype=torch.bool, device=h.device)))  # h[labelled]
        return h.sum() * 0.0

    hooks = [m.register_forward_pre_hook(lambda _, __, i=i: layer.__setitem__(0, i))
             for i, m in enumerate(model.model.layers)]  # fmt: skip
    hooks.append(model.model.norm.register_forward_pre_hook(lambda *_: layer.__setitem__(0, None)))
    patches = (
        (mock.patch.object(gemma_module.F, "scaled_dot_product_attention", flash),
         mock.patch.object(gemma_module, "linear_cross_entropy", fused_ce))
        if meta else (nullcontext(), nullcontext())
    )  # fmt: skip
    try:
        with patches[0], patches[1], torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield records
    finally:
        for h in hooks:
            h.remove()


def activation_bytes(model: Gemma, seq: int, meta: bool) -> tuple[list[int], int]:
    """(bytes saved by each layer, bytes saved outside the layers: embedding, final norm, head and
    loss) for one forward of batch 1 x seq tokens, every position labelled."""
    device = "meta" if meta else "cpu"
    ids = torch.zeros(1, seq, dtype=torch.long, device=device)
    with saved_tensors(model, meta) as records:
        model(ids, labels=ids)  # the training loss, every position labelled (minilora.loss)
    unique, per_layer, rest = {}, [0] * len(model.model.layers), 0
    for layer, t in records:
        key = id(t) if meta else t.untyped_storage().data_ptr()
        if key not in unique:
            unique[key] = t.numel() * t.element_size()
            if layer is None:
                rest += unique[key]
            else:
                per_layer[layer] += unique[key]
    return per_layer, rest


def meta_model(config_file: str, r: int, targets, dtype=torch.float16):
    hf = json.loads((CONFIGS / config_file).read_text())
    with torch.device("meta"):
        model = Gemma(config_from_hf(hf)).to(dtype)
    ml.inject(model, ml.LoRAConfig(r=r, alpha=2 * r, targets=targets))
    return model


# ----------------------------------------------------------------------------------------------------
# The prediction
# ----------------------------------------------------------------------------------------------------
def predict(model: Gemma, seq: int, checkpointing: bool, meta=True) -> dict:
    """Bytes of each term of the predicted peak (see the module docstring)."""
    params = {id(p): p for p in model.parameters()}.values()
    adapter = [p for p in params if p.requires_grad]
    linear = [
        (m.out_features, m.in_features) for m in model.modules() if isinstance(m, (nn.Linear, ml.LoRALinear))
    ]
    dense = sum(p.numel() for p in params if not p.requires_grad)
    elem = model.model.embed_tokens.weight.element_size()
    per_layer, rest = activation_bytes(model, seq, meta)
    d = model.config.hidden_size
    if checkpointing:  # each layer's input kept, one layer recomputed at a time
        acts = len(per_layer) * seq * d * elem + max(per_layer) + rest
    else:
        acts = sum(per_layer) + rest
    linear_params = sum(math.prod(s) for s in linear)
    return dict(
        bf16=2 * dense,
        nf4=sum(nf4_bytes(s) for s in linear) + 2 * (dense - linear_params),
        adapter=8 * sum(p.numel() for p in adapter),  # float32 parameters and gradients
        adamw=optimizer_bytes(adapter, False),
        adamw8bit=optimizer_bytes(adapter, True),
        activations=acts,
        transient=loss_chunk_bytes(model, seq, elem) + max(math.prod(s) for s in linear) * elem,
        trainable=sum(p.numel() for p in adapter),
    )


def loss_chunk_bytes(model: Gemma, seq: int, elem: int) -> int:
    """One chunk of minilora.loss: its float32 (rows, vocab) logits (softmax and gradient in place),
    the soft-cap's slope next to them, and the gradient cast to a 16-bit compute dtype."""
    vocab, cap = model.config.vocab_size, model.config.final_logit_softcapping
    rows = min(seq, max(1, CHUNK_BYTES // (8 * vocab)))  # minilora.loss's chunk size
    return rows * vocab * (4 * (2 if cap else 1) + (elem if elem < 4 else 0))


def table(seq: int) -> None:
    print(f"| setup (fp16, batch 1, seq {seq}; trainable parameters) | weights bf16 / NF4 | adapter + "
          "grads | AdamW / 8-bit | activations per token, plain / checkpointing | predicted peak, bf16 + "
          "AdamW | NF4 + AdamW8bit |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    fits = lambda peak: peak + RESERVE <= CARD
    verdicts = []
    for name, config, r, targets in SETUPS:
        model = meta_model(config, r, targets)
        plain, ckpt_p = predict(model, seq, False), predict(model, seq, True)
        peaks = {}
        for weights, optim in (("bf16", "adamw"), ("nf4", "adamw8bit")):
            peaks[weights] = [p[weights] + p[optim] + p["adapter"] + p["activations"] + p["transient"]
                              for p in (plain, ckpt_p)]  # fmt: skip
        show = lambda two: " / ".join(f"{x / GB:.1f}" + ("" if fits(x) else " ✗") for x in two) + " GB"
        mb = lambda *keys, p=plain: " / ".join(f"{p[k] / 1e6:.0f}" for k in keys) + " MB"
        print(f"| {name} ({plain['trainable']:,}) | {plain['bf16'] / GB:.2f} / {plain['nf4'] / GB:.2f} GB | "
              f"{mb('adapter')} | {mb('adamw', 'adamw8bit')} | "
              f"{plain['activations'] / seq / 1e3:.0f} / {ckpt_p['activations'] / seq / 1e3:.0f} kB | "
              f"{show(peaks['bf16'])} | {show(peaks['nf4'])} |")  # fmt: skip
        need = "with checkpointing" if not fits(peaks["nf4"][0]) else ""
        verdicts.append((name, fits(min(peaks["bf16"])), fits(min(peaks["nf4"])), need))
    print(f"(plain / with gradient checkpointing; ✗: over a 16 GB card once {RESERVE / GIB:.0f} GiB is kept "
          "for the CUDA context and the allocator)")  # fmt: skip
    print(
        "does not fit in bf16, even with checkpointing:",
        ", ".join(n for n, b, _, _ in verdicts if not b) or "none",
    )
    print("fits with NF4 + AdamW8bit:", ", ".join(f"{n} {need}".strip() for n, _, q, need in verdicts if q))
    print("does not fit with NF4:", ", ".join(n for n, _, q, _ in verdicts if not q) or "none")


# ----------------------------------------------------------------------------------------------------
# The check on the real Gemma 3 270M
# ----------------------------------------------------------------------------------------------------
def vm(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(key + ":")).split()[1]) * 1024


def real_270m(seq: int) -> None:
    from minilora.gguf import default_model_dir

    model = ml.gemma.from_pretrained(default_model_dir(), quantize="nf4")  # float32 compute on the CPU
    ml.inject(model, ml.LoRAConfig(r=8, alpha=16, targets=QKVO))
    real = activation_bytes(model, seq, meta=False)
    counted = activation_bytes(meta_model("gemma-3-270m.json", 8, QKVO, torch.float32), seq, meta=True)
    print(f"real 270M, float32, seq {seq}: saved per layer {real[0][0] / seq / 1e3:.1f} kB/token, outside "
          f"the layers {real[1] / seq / 1e3:.1f} kB/token; the meta count: {counted[0][0] / seq / 1e3:.1f} "
          f"and {counted[1] / seq / 1e3:.1f}")  # fmt: skip
    assert real == counted, "the meta count differs from the real kernels' saved tensors"
    # A fixed mmap threshold: glibc's moving one would keep the first step's freed blocks resident
    # (VmRSS before the second step would include them, and its peak over it would read too low).
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD: 128 kB, never raised
    opt = ml.AdamW8bit([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(10, 200_000, (1, seq), generator=torch.Generator().manual_seed(0))
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        for _ in range(2):  # the second step: the optimizer's state exists already
            before = vm("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            model(ids, labels=ids).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        p = predict(model, seq, ckpt, meta=False)
        predicted = p["adapter"] // 2 + p["activations"] + p["transient"]  # gradients: the parameters exist
        peak = vm("VmHWM") - before
        acts = p["activations"]
        print(f"real 270M step, checkpointing {ckpt}: peak over the resident model {peak / 1e6:.0f} MB; "
              f"predicted {predicted / 1e6:.0f} MB (activations {acts / 1e6:.0f} MB)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--skip-real", action="store_true", help="skip the check on the real Gemma 3 270M")
    args = ap.parse_args()
    check_nf4_formula()
    if not args.skip_real:
        real_270m(args.seq)
    table(args.seq)


if __name__ == "__main__":
    main()
