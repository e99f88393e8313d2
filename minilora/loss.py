"""Cross-entropy of a linear output head that never holds the full logits.

    loss = mean over labelled rows i of  logsumexp(s_i) - s_i[y_i],   s_i = softcap(h_i W^T)

The rows go through in chunks whose float32 (rows, vocab) temporaries fit CHUNK_BYTES; a chunk's
logits live only while the chunk is processed. The gradient of a mean cross-entropy is known in
the forward, up to the upstream scalar: dL/dz = (softmax(s) - onehot(y)) * softcap'(z) / N. So
each chunk writes its rows of dh = dz W (and adds dz^T h to dW when the head trains) while its
logits are in hand, and the backward only scales them. This is Liger Kernel's fused linear
cross-entropy (Hsu et al. 2024, arXiv:2410.10989); Cut Cross-Entropy (Wijmans et al. 2024,
arXiv:2411.09009) instead keeps the per-row logsumexp and recomputes the logits in the backward:
the same memory (dh is the size of the h it would keep) for one more vocabulary-wide product,
the step's largest on a CPU, so minilora takes the first.

A head kept packed (a GGUF file's embedding, minilora.ggml.Embedding: frozen) is never dequantized
whole: each chunk of rows reads it a slice of vocabulary rows at a time, once for the logits and
once for dh = dz W.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label value that takes no part in the loss (Hugging Face's convention)
CHUNK_BYTES = 512 << 20  # a chunk's temporaries: two float32 (rows, vocab) tensors at most


def linear_cross_entropy(
    h: torch.Tensor,
    weight,
    targets: torch.Tensor,
    softcap: float | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of softcap(h @ weight.T) against targets, over the targets that are not
    -100 (only those rows reach the head). h (..., d), weight (vocab, d) or a frozen packed head
    (with num_embeddings and chunks(dtype)), targets (...,); float32 (float64 for float64 inputs).
    chunk_size: rows per chunk (default: from CHUNK_BYTES). No target at all: a zero that still
    belongs to the graph."""
    keep = targets != IGNORE_INDEX
    if not keep.any():
        return h.sum() * 0.0
    h, targets = h[keep], targets[keep]  # (N, d), (N,)
    dense = isinstance(weight, torch.Tensor)
    chunk = chunk_size or max(1, CHUNK_BYTES // (8 * (weight.shape[0] if dense else weight.num_embeddings)))
    grads = torch.is_grad_enabled() and (h.requires_grad or (dense and weight.requires_grad))
    return _LinearCrossEntropy.apply(h, weight, targets, softcap, chunk, grads)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, softcap, chunk: int, grads: bool):
        N, acc = h.shape[0], torch.promote_types(h.dtype, torch.float32)  # float32 at least
        dh = torch.empty_like(h, dtype=acc) if grads and ctx.needs_input_grad[0] else None  # (N, d)
        dw = torch.zeros_like(weight, dtype=acc) if grads and ctx.needs_input_grad[1] else None  # (V, d)
        total = sum(
            _chunk(h[i : i + chunk], weight, targets[i : i + chunk, None], softcap, acc, N, grads,
                   None if dh is None else dh[i : i + chunk], dw)
            for i in range(0, N, chunk)
        )  # fmt: skip
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = getattr(weight, "dtype", None)
        return total / N

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        dh = None if dh is None else dh * grad.to(dh.dtype)
        dw = None if dw is None else (dw * grad).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None


def _chunk(h, weight, y, softcap, acc, N: int, grads: bool, dh, dw) -> torch.Tensor:
    """One chunk of rows, h (c, d), y (c, 1): returns its summed loss; with grads, writes its rows
    of dh (c, d) and adds its share of dw. Its (c, V) tensors are freed when it returns."""
    s = _logits(h, weight, acc)  # (c, V)
    slope = None
    if softcap is not None:
        s.div_(softcap).tanh_()  # tanh(z / cap), in place
        slope = s.square().neg_().add_(1.0) if grads else None  # (c, V) d softcap(z)/dz = 1 - tanh^2
        s.mul_(softcap)
    top = s.amax(dim=-1, keepdim=True)  # (c, 1)
    loss = (top - s.gather(1, y)).sum()
    p = s.sub_(top).exp_()  # (c, V) exp(s - max), in place
    norm = p.sum(dim=-1, keepdim=True)  # (c, 1)
    loss += norm.log().sum()  # logsumexp(s) - s[y], summed
    if grads:
        dz = p.div_(norm).scatter_add_(1, y, torch.full_like(norm, -1.0))  # softmax - onehot(y)
        if slope is not None:
            dz.mul_(slope)
        if dw is not None:
            dw.addmm_(dz.T, h.to(acc), alpha=1.0 / N)  # (V, d)
        if dh is not None:  # 1 / N after the product, into float32: dz / N underflows float16 (N large)
            dz = dz.to(h.dtype)
            if dz.dtype != acc and dz.device.type == "cpu":  # torch 2.13's CPU bf16/fp16 mm with K = vocab
                dz = dz.T.contiguous().T  # runs 12-57x faster with dz column-major (RESULTS.md, float16)
            dh.copy_(_times_weight(dz, weight)).div_(N)  # (c, d)
    return loss


def _logits(h, weight, acc) -> torch.Tensor:
    """h (c, d) @ W.T in acc: (c, V); a packed head a slice of vocabulary rows at a time."""
    if isinstance(weight, torch.Tensor):
        return head_product(h, weight).to(acc)
    s = h.new_empty(h.shape[0], weight.num_embeddings, dtype=acc)
    for start, w in weight.chunks(h.dtype):
        s[:, start : start + w.shape[0]] = h @ w.T
    return s


def head_product(h: torch.Tensor, weight: torch.Tensor, contiguous: bool = False) -> torch.Tensor:
    """h (..., d) @ W.T -> (..., V) for a vocabulary-wide W (V, d). On the CPU computed as (W h^T)^T,
    the same sums stored column-major: at 262k x 640, 1.4x faster than h W^T for 128 rows and 2-4x
    for 8-32 (float32, AVX2; RESULTS.md). contiguous: row-major, copied where that still pays (up
    to 256 rows), else h W^T."""
    rows = h.shape[:-1].numel()
    if h.device.type != "cpu" or (contiguous and rows > 256):
        return h @ weight.T
    out = (weight @ h.reshape(rows, -1).T).T  # (rows, V), column-major
    out = out.contiguous() if contiguous else out
    return out.view(*h.shape[:-1], weight.shape[0])  # splitting the rows' dimension: a view


def _times_weight(dz, weight) -> torch.Tensor:
    """dz (c, V) @ W: (c, d); a packed head a slice of vocabulary rows at a time, the slices'
    products summed in float32 at least (bf16 partial sums would round once per slice)."""
    if isinstance(weight, torch.Tensor):
        return dz @ weight
    acc = torch.promote_types(dz.dtype, torch.float32)
    out = dz.new_zeros(dz.shape[0], weight.embedding_dim, dtype=acc)
    for start, w in weight.chunks(dz.dtype):
        out += dz[:, start : start + w.shape[0]] @ w
    return out
