"""Compile minilora's Triton kernels for an H100/H200 (sm_90) on the CPU, as the JIT specialises them for
bf16 Gemma shapes, and print one JSON list with a report per compiled kernel:

    kernel, config, wgmma (tensor-core instructions), async_loads (pipelined copies), addptr and
    narrow_offsets (pointer offsets that are not int64), fma (fused multiply-adds in the PTX), shared
    (bytes), estimate (the pruning's shared-memory estimate), regs, stack and local (bytes of stack
    frame / local memory: spills).

Also the GGUF dequantization kernel (kernels/ggml_dequant.py), once per block format, launched as
its wrapper launches it (without FMA contraction).

Registers and spills come from the cubin through the cuobjdump that Triton ships. Run by
tests/test_kernels.py in a subprocess (without TRITON_INTERPRET); exit status 3 means this Triton's
ahead-of-time API differs. Two processes compile in parallel.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch
import triton

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print("AOT-API", e)
    sys.exit(3)

import minilora.kernels  # noqa: F401

from minilora.ggml import BLOCK_TYPES

L = sys.modules["minilora.kernels.lora_linear"]
G = sys.modules["minilora.kernels.ggml_dequant"]
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

M, N, K = 4096, 1024, 1152
BF, F32, U8 = "*bf16", "*fp32", "*u8"
META = dict(FP64=False, UPCAST=False, PRECISION="tf32")


def mm_args(r: int, ptr: str) -> dict:
    """forward layout: w = W.T, lo = xa (float32), b_lr = B.T (float32 adapters)"""
    ptrs = dict(
        x_ptr=ptr, w_ptr=ptr, bias_ptr=ptr, out_ptr=ptr, lo_ptr=F32, a_ptr=F32, b_ptr=F32, bits_ptr=U8
    )
    return dict(
        ptrs, M=M, N=N, K=K, R=r, m_bucket=M, stride_xm=K, stride_xk=1, stride_wk=1, stride_wn=K,
        stride_lom=r, stride_lor=1, stride_ak=1, stride_ar=K, stride_br=1, stride_bn=r, stride_om=N,
        stride_on=1, stride_bits=K // 8, lo_scale=2.0,
    )  # fmt: skip


def jobs() -> list[tuple]:
    out = []
    configs = [L._config(*c) for c in L._MM_CONFIGS]
    # every config the pruning keeps: bf16 with the heaviest rank-r term (R_PAD = 128, the dropout mask),
    # bf16 with the in-loop shrink (R_PAD = 32, N = 256: the configs that cover it), float32 (TF32)
    variants = [(BF, 2, 128, False, N), (BF, 2, 32, True, 256), ("*fp32", 4, 128, False, N)]
    for ptr, elsize, r_pad, fuse, n in variants:
        for cfg in L._keep_configs(configs, N=n, r_pad=r_pad, fuse=fuse, elsize=elsize, limit=L._SMEM_H100):
            kw = cfg.kwargs
            c = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_stages, cfg.num_warps)
            meta = dict(kw, R_PAD=r_pad, LORA=2 if fuse else 1, KEEP=not fuse, HAS_BIAS=elsize == 4, **META)
            args = dict(mm_args(r_pad - 1, ptr), N=n, stride_om=n)
            out.append(("_mm_kernel", args, meta, cfg.num_warps, cfg.num_stages, (c, r_pad, fuse, elsize)))
    x = fake_bf16_input()
    for r_pad in (16, 128):
        cfg = L._launch_config("shrink", M=M, N=r_pad, K=K, r_pad=r_pad, x=x)
        shrink = dict(
            x_ptr=BF, a_ptr=F32, out_ptr=F32, bits_ptr=U8, seed_ptr="*i64", M=M, K=K, R=r_pad - 1, k_per_split=512,
            stride_xm=K, stride_xk=1, stride_ar=K, stride_ak=1, stride_os=M * r_pad, stride_om=r_pad, stride_or=1,
            stride_bits=K // 8, scale=2.0, p=0.1,
        )  # fmt: skip
        d_a = dict(
            shrink, M=K, K=M, stride_xm=1, stride_xk=K, stride_ar=1, stride_ak=r_pad, stride_om=1, stride_or=K
        )
        tiles = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], R_PAD=r_pad, **META)
        for mask, args in ((1, shrink), (2, d_a)):
            out.append(
                ("_shrink_kernel", args, dict(tiles, MASK=mask), cfg["num_warps"], cfg["num_stages"], None)
            )
        cfg = L._launch_config("dy", M=M, N=N, K=N, r_pad=r_pad, x=x)
        dy = dict(
            dy_ptr=BF, b_ptr=F32, xa_ptr=F32, dyb_ptr=F32, db_ptr=F32, M=M, N=N, R=r_pad - 1, n_per_split=512,
            stride_dym=N, stride_dyn=1, stride_bn=r_pad, stride_br=1, stride_xam=r_pad, stride_xar=1,
            scale=2.0, xa_scale=2.0,
        )  # fmt: skip
        tiles = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], R_PAD=r_pad, **META)
        out.append(("_dy_kernel", dy, tiles, cfg["num_warps"], cfg["num_stages"], None))
    out.append(
        (
            "_bits_kernel",
            dict(bits_ptr=U8, seed_ptr="*i64", M=M, K=K, p=0.1),
            dict(BLOCK_M=32, BLOCK_K=64),
            4,
            3,
            None,
        )
    )
    for name, values, size in BLOCK_TYPES.values():  # bf16 out, the rows of an (M, K) weight
        meta = dict(TYPE=name, BYTES=size, VALUES=values, BLOCKS=G.VALUES_PER_PROGRAM // values)
        args = dict(packed_ptr=U8, out_ptr=BF, n_blocks=M * K // values)
        out.append(("_dequant_blocks_kernel", args, meta, 4, 3, None))
    return out


def fake_bf16_input():
    """What _launch_config reads of x: a bf16 tensor on a 132-SM GPU (an H100 SXM or H200 has 132)."""
    L._num_sms = lambda index: 132
    return type("X", (), dict(dtype=torch.bfloat16, device=torch.device("cuda", 0)))()


def compile_one(job) -> dict:
    name, args, meta, warps, stages, smem = job
    fn = getattr(L, name, None) or getattr(G, name)
    sig, consts, attrs = {}, dict(meta), {}
    for i, arg in enumerate(fn.arg_names):
        v = args.get(arg, meta.get(arg))
        if arg in meta or v == 1:  # the JIT turns ints equal to 1 into constants
            sig[arg], consts[arg] = "constexpr", v
        elif isinstance(v, str):
            sig[arg], attrs[(i,)] = v, [["tt.divisibility", 16]]
        else:
            sig[arg] = "fp32" if isinstance(v, float) else "i32"
            if isinstance(v, int) and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs)
    options = dict(num_warps=warps, num_stages=stages)
    if fn is G._dequant_blocks_kernel:
        options["enable_fp_fusion"] = False  # as dequantize_ggml_triton launches it
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    res = {key.lower(): int(v) for key, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage)}
    ir = k.asm["ttgir"]
    # tt.addptr %ptr, %offset : <pointer type>, <offset type>: any offset type but i64 may wrap
    offsets = re.findall(r"tt\.addptr [^:\n]*: [^,\n]+, (\S+)", k.asm["ttir"])
    report = dict(
        kernel=name, config=[warps, stages, {k: v for k, v in meta.items() if k not in META}],
        wgmma=ir.count("warp_group_dot"), async_loads=ir.count("async_copy_global_to_local"),
        addptr=len(offsets), narrow_offsets=[t for t in offsets if not re.search(r"i64>?$", t)],
        fma=k.asm["ptx"].count("fma.rn"),
        shared=k.metadata.shared, **res,
    )  # fmt: skip
    if smem:
        (bm, bn, bk, st, _), r_pad, fuse, elsize = smem
        report["estimate"] = L._smem_bytes(bm, bn, bk, st, r_pad, fuse, elsize)
    return report


if __name__ == "__main__":
    try:
        with ProcessPoolExecutor(max_workers=2) as pool:
            reports = list(pool.map(compile_one, jobs()))
    except TypeError as e:  # another Triton's internal API: nothing to check here
        print("AOT-API", e)
        sys.exit(3)
    print(json.dumps(reports))
