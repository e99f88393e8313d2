"""Gemma 1, 2 and 3 (text) as one decoder-only Transformer: the model only. Reading a Hugging Face
checkpoint folder (config.json in both dialects, safetensors) is minilora.checkpoint's job;
`gemma.from_pretrained` is its public name.

References: Gemma (Gemma Team 2024, arXiv:2403.08295), Gemma 2 (arXiv:2408.00118), Gemma 3
(arXiv:2503.19786); the numerics follow Hugging Face transformers' GemmaForCausalLM,
Gemma2ForCausalLM and Gemma3ForCausalLM, which is what the checkpoints were validated against.

The generations differ only in flags of GemmaConfig, named for the mechanism (sandwich_norms,
qk_norm, attn_logit_softcapping, final_logit_softcapping, sliding_layers, rope bases and scaling,
query_pre_attn_scalar); the model never asks which generation it is.

Float16 (GPUs without bfloat16: T4, V100). Gemma's residual stream outgrows float16: in the real
270M it reaches ~1.0e5 by layer 14, past float16's 65,504. With float16 weights the matmuls (and the
LoRA products) run in float16 and these float32 islands keep what would overflow or lose precision:
the residual stream h (`stream_dtype`), the post-norms that write into it, every RMSNorm's
statistics (in every dtype), the attention softmax and soft-caps, the logits and the loss. The
norms that feed a matmul return float16. Float32 and bfloat16 (float32's range) run as they are.

Module names are Hugging Face's (`model.layers.3.self_attn.q_proj`), so the state dict's keys are
the checkpoint's keys and adapters get peft's names. The output head is the embedding matrix
(tied weights): there is no lm_head module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minilora.loss import IGNORE_INDEX, head_product, linear_cross_entropy  # noqa: F401 (IGNORE_INDEX: public here too)

ATTN_BLOCK = 512  # queries per block where attention needs a mask (it sees only the keys it can see)


@dataclass
class GemmaConfig:
    # Rows of the embedding matrix, which is also the output head (tied).
    vocab_size: int
    # Width of the residual stream (d_model).
    hidden_size: int
    # Width of the gated MLP's hidden layer.
    intermediate_size: int
    # Number of decoder layers.
    num_hidden_layers: int
    # Query heads per layer.
    num_attention_heads: int
    # Key/value heads per layer: equal to the query heads (MHA), fewer (GQA) or 1 (MQA).
    num_key_value_heads: int
    # Width of one head; not hidden_size // heads in general (Gemma 7B: 16 x 256 > 3072).
    head_dim: int
    # epsilon inside the RMSNorm square root.
    rms_norm_eps: float = 1e-6
    # Attention scores are multiplied by query_pre_attn_scalar ** -0.5 (Gemma 1: head_dim).
    query_pre_attn_scalar: float = 256.0
    # Gemma 2/3: RMSNorm after attention and around the MLP too ("sandwich"): four norms per layer.
    # Gemma 1: two pre-norms, the second named post_attention_layernorm by Hugging Face.
    sandwich_norms: bool = False
    # Gemma 3: RMSNorm over head_dim on every query and key head, before RoPE.
    qk_norm: bool = False
    # The MLP's GELU, as F.gelu's `approximate`: "tanh" in every released checkpoint, "none" (exact,
    # erf) where a Gemma 2/3 config asks for "gelu".
    gelu_approximate: str = "tanh"
    # Gemma 2: attention logits become cap * tanh(logits / cap); None = no capping.
    attn_logit_softcapping: float | None = None
    # Gemma 2: output logits become cap * tanh(logits / cap); None = no capping.
    final_logit_softcapping: float | None = None
    # Keys visible to a sliding-window layer: query i sees keys j with i - window < j <= i.
    sliding_window: int | None = None
    # One bool per layer: True where the layer uses the sliding window, False for full attention.
    sliding_layers: tuple[bool, ...] = ()
    # RoPE base on full-attention layers.
    rope_theta: float = 10_000.0
    # RoPE base on sliding-window layers (Gemma 3: 10,000 while full layers use 1,000,000).
    rope_local_base_freq: float = 10_000.0
    # Linear RoPE scaling on full-attention layers: positions divided by this factor (1 = none).
    rope_scaling_factor: float = 1.0
    # Linear RoPE scaling on sliding-window layers (1 in every released checkpoint).
    rope_local_scaling_factor: float = 1.0

    def __post_init__(self):
        if not self.sliding_layers:
            self.sliding_layers = (False,) * self.num_hidden_layers
        self.sliding_layers = tuple(bool(s) for s in self.sliding_layers)
        if len(self.sliding_layers) != self.num_hidden_layers:
            raise ValueError(
                f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_hidden_layers} layers"
            )
        if self.sliding_window is None and any(self.sliding_layers):
            raise ValueError("some layers are marked sliding but sliding_window is None")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )


def stream_dtype(dtype: torch.dtype) -> torch.dtype:
    """The residual stream's dtype for the compute dtype: float32 for float16, else the same."""
    return torch.float32 if dtype == torch.float16 else dtype


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + w), computed in float32 and cast back. The stored weight is an offset
    from 1 (zeros init); the product is taken in float32 before the cast (not x.to(bf16) * w)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, base: float, factor: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (..., head_dim) for positions (...,) in the "rotate half" layout; linear
    scaling divides the frequencies (equivalently the positions) by `factor`. Float32, cast once."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    )
    inv_freq = inv_freq / factor
    freqs = positions.float()[..., None] * inv_freq  # (..., hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hd). Rotates the pair (x[i], x[i + hd/2]) by the position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


def attention_mask(q_start: int, T: int, k_start: int, S: int, window: int | None, device) -> torch.Tensor:
    """Boolean (T, S), True where query q_start + t may see key k_start + s: causal, and within
    the window on sliding layers (GemmaConfig.sliding_window)."""
    q = torch.arange(q_start, q_start + T, device=device)[:, None]
    k = torch.arange(k_start, k_start + S, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


def attend(q, k, v, q_start: int, k_start: int, window: int | None, scale: float, cap: float | None,
           seg: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Causal attention of queries at positions q_start.. (q: (B, nh, T, hd)) over keys and values
    at k_start.. (k, v: (B, nkv, S, hd)); returns (B, nh, T, hd). seg (B, T): example index of each
    token of a packed row (no cache); attention stays within an example.

    A plain causal layer is SDPA's causal path. Otherwise the queries go in blocks of ATTN_BLOCK,
    each against the keys it can see (window, causality), with a (block, keys) mask: memory stays
    linear in T, and a sliding layer's work too."""
    T, S = q.shape[2], k.shape[2]
    if seg is None and cap is None and k_start == q_start and S == T and (window is None or window >= T):
        return _attend_block(q, k, v, None, scale, cap, causal=True)
    out = []
    for t in range(0, T, ATTN_BLOCK):
        first, n = q_start + t, min(ATTN_BLOCK, T - t)  # the block's first query position, its size
        lo = k_start if window is None else max(k_start, first - window + 1)  # keys lo .. hi - 1
        hi = min(k_start + S, first + n)
        mask = attention_mask(first, n, lo, hi - lo, window, q.device)  # (n, hi - lo)
        if seg is not None:  # (B, 1, n, hi - lo): and within the same example
            mask = mask & (seg[:, None, first : first + n, None] == seg[:, None, None, lo:hi])
        keys = slice(lo - k_start, hi - k_start)
        args = (q[:, :, t : t + n], k[:, :, keys], v[:, :, keys])
        if cap is not None and torch.is_grad_enabled():  # backward keeps one block's scores, not all
            out.append(checkpoint(_attend_block, *args, mask, scale, cap, use_reentrant=False))
        else:
            out.append(_attend_block(*args, mask, scale, cap))
    return torch.cat(out, dim=2)  # (B, nh, T, hd)


def _attend_block(q, k, v, mask, scale: float, cap: float | None, causal: bool = False):
    """softmax(softcap(q k^T * scale) where mask, else -inf) v. mask: None, (T, S) or (B, 1, T, S)."""
    if cap is None:  # key/value heads shared by query heads: expanded (a view for one kv head),
        # as SDPA's CPU backward with enable_gqa takes ~3x longer (torch 2.13, measured)
        k, v = (x[:, :, None].expand(-1, -1, q.shape[1] // x.shape[1], -1, -1).flatten(1, 2) for x in (k, v))
        return F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, scale=scale)  # (B, nh, T, hd)
    # Soft-capped logits (Gemma 2) need the scores in hand: tanh between the product and the
    # softmax. Query heads are grouped over their shared key/value head (no copy of k, v).
    (B, nh, T, hd), (nkv, S) = q.shape, k.shape[1:3]
    att = q.view(B, nkv, nh // nkv, T, hd) @ k.unsqueeze(2).transpose(-2, -1)  # (B, nkv, rep, T, S)
    att = softcap(att.view(B, nh, T, S).to(stream_dtype(q.dtype)) * scale, cap)  # (B, nh, T, S)
    acc = torch.promote_types(q.dtype, torch.float32)  # the softmax in float32 at least
    att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1, dtype=acc).to(q.dtype)
    return (att.view(B, nkv, nh // nkv, T, S) @ v.unsqueeze(2)).view(B, nh, T, hd)  # (B, nh, T, hd)


class KVCache:
    """Keys and values of the tokens seen so far, one (B, n_kv, S, hd) pair per layer.

    A sliding-window layer keeps only its last `window - 1` keys: the next query, at position p,
    sees keys p - window + 1 .. p, and p itself arrives with the query. Full layers keep all.
    """

    def __init__(self, config: GemmaConfig):
        self.keep = [config.sliding_window - 1 if s else None for s in config.sliding_layers]
        self.k: list[torch.Tensor | None] = [None] * config.num_hidden_layers
        self.v: list[torch.Tensor | None] = [None] * config.num_hidden_layers
        self.seen = 0  # tokens processed so far = position of the next token

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Append this step's k, v (B, n_kv, T, hd); return all keys and values to attend to and
        the position of the first of them. Stores the trimmed result."""
        start = self.seen - self.stored(layer)  # position of the oldest key kept
        if self.k[layer] is not None:
            k = torch.cat((self.k[layer], k), dim=2)  # (B, n_kv, S, hd)
            v = torch.cat((self.v[layer], v), dim=2)
        keep = self.keep[layer]
        if keep is not None and k.shape[2] > keep:
            self.k[layer], self.v[layer] = k[:, :, k.shape[2] - keep :], v[:, :, v.shape[2] - keep :]
        else:
            self.k[layer], self.v[layer] = k, v
        return k, v, start

    def stored(self, layer: int) -> int:
        return 0 if self.k[layer] is None else self.k[layer].shape[2]


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        c, hd = config, config.head_dim
        self.layer, self.n_head, self.n_kv, self.head_dim = (
            layer,
            c.num_attention_heads,
            c.num_key_value_heads,
            hd,
        )
        self.scale = c.query_pre_attn_scalar**-0.5
        self.softcap = c.attn_logit_softcapping
        self.window = c.sliding_window if c.sliding_layers[layer] else None
        self.q_proj = nn.Linear(c.hidden_size, self.n_head * hd, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * hd, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * hd, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(hd, c.rms_norm_eps)
            self.k_norm = RMSNorm(hd, c.rms_norm_eps)

    def forward(self, x, cos, sin, pos: int, cache: KVCache | None, seg: torch.Tensor | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_start = pos
        if cache is not None:
            k, v, k_start = cache.update(self.layer, k, v)  # (B, nkv, S, hd)
        y = attend(q, k, v, pos, k_start, self.window, self.scale, self.softcap, seg)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh * hd)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate=self.approximate) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.sandwich = config.sandwich_norms
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(d, eps)
        # Gemma 1 names its pre-MLP norm post_attention_layernorm (it comes after the attention
        # block); with sandwich norms it normalises the attention output instead.
        self.post_attention_layernorm = RMSNorm(d, eps)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(d, eps)
            self.post_feedforward_layernorm = RMSNorm(d, eps)

    def forward(self, h, cos, sin, pos: int, cache: KVCache | None = None, seg: torch.Tensor | None = None):
        dt = self.input_layernorm.weight.dtype  # the matmuls'; h is float32 under float16 (docstring)
        a = self.self_attn(self.input_layernorm(h).to(dt), cos, sin, pos, cache, seg)
        if self.sandwich:  # the post-norms read and return h's dtype: their outputs outgrow float16 too
            h = h + self.post_attention_layernorm(a.to(h.dtype))
            m = self.mlp(self.pre_feedforward_layernorm(h).to(dt))
            h = h + self.post_feedforward_layernorm(m.to(h.dtype))
        else:
            h = h + a
            h = h + self.mlp(self.post_attention_layernorm(h).to(dt))
        return h


class Gemma(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if not weight.is_meta:  # nn.Embedding's own init; skipped on meta, where the first normal_
            nn.init.normal_(weight)  # imports ~900 torch modules (+146 MB resident) for nothing
        self.model = nn.ModuleDict(dict(  # Hugging Face's `model.` level, for the checkpoint's names
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight),
            layers=nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))  # fmt: skip
        self.gradient_checkpointing = False  # recompute each layer in backward (saves activations)
        self.name_or_path: str | None = None

    def new_cache(self) -> KVCache:
        return KVCache(self.config)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_logits_only: bool = False,
    ) -> torch.Tensor:
        """input_ids (B, T). Returns float32 logits (B, T, vocab) (or (B, 1, vocab) with
        last_logits_only), or with labels (B, T) the mean cross-entropy of predicting labels[t + 1]
        at position t over the labels that are not -100 (shifted inside, as in Hugging Face).
        With a cache, the tokens continue the cached sequence and their keys are appended.
        positions (B, T), for packed rows (no cache): each token's position in its own example; a 0
        starts the next example, which attends only to itself."""
        c = self.config
        B, T = input_ids.shape
        pos = cache.seen if cache is not None else 0
        h = self.model.embed_tokens(input_ids)  # (B, T, d)
        dt = h.dtype  # the compute dtype; the residual stream is stream_dtype(dt)
        # sqrt(d) rounded to the activation dtype first, as the reference does (55.5 in bf16 for d=3072).
        h = h.to(stream_dtype(dt)) * torch.tensor(c.hidden_size**0.5, dtype=dt)
        seg = None if positions is None else (positions == 0).cumsum(dim=1)  # (B, T) example index
        if positions is None:
            positions = torch.arange(pos, pos + T, device=input_ids.device)[None]  # (1, T)
        # (base, scaling factor) and then cos/sin per layer kind: False = full attention, True = sliding.
        bases = {
            False: (c.rope_theta, c.rope_scaling_factor),
            True: (c.rope_local_base_freq, c.rope_local_scaling_factor),
        }
        rope = {kind: rope_cos_sin(positions[:, None], c.head_dim, *bases[kind], dt) for kind in bases}
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.model.layers):
            cos, sin = rope[c.sliding_layers[i]]  # (B or 1, 1, T, hd)
            if recompute:
                h = checkpoint(layer, h, cos, sin, pos, None, seg, use_reentrant=False)
            else:
                h = layer(h, cos, sin, pos, cache, seg)
        if cache is not None:
            cache.seen += T
        h = self.model.norm(h).to(dt)  # (B, T, d)

        if labels is None:
            return self.head(h[:, -1:] if last_logits_only else h)
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        # Position t predicts token t + 1; the head runs only where that label counts, in chunks.
        # A packed GGUF embedding goes in as it is: the loss dequantizes it a chunk of rows at a time.
        emb, cap = self.model.embed_tokens, c.final_logit_softcapping
        weight = emb.weight if isinstance(emb, nn.Embedding) else emb
        return linear_cross_entropy(h[:, :-1], weight, labels[:, 1:], cap)  # mean over the labels

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Tied output head: h @ embed_tokens.weight.T, soft-capped, float32. h: (..., d)."""
        emb = self.model.embed_tokens  # an nn.Embedding, or a packed GGUF one (dequantized per chunk)
        if isinstance(emb, nn.Embedding):
            logits = head_product(h, emb.weight, contiguous=True)
        else:
            logits = emb.head(h)
        return softcap(logits.float(), self.config.final_logit_softcapping)


def compile_norms(model: nn.Module) -> int:
    """torch.compile (inductor) every RMSNorm of `model` in place: its float32 upcast, square, mean,
    rsqrt, scale and cast back become one fused loop forward and one backward. Returns how many.
    Opt-in: on the AVX2 EPYC (2026-11-28, one thread) a step's CPU time fell by ~2% for ~30 s of
    compiling; compiling whole layers lost (1.97 s vs 1.5 s a step, 90 s to compile); see
    benchmarks/RESULTS.md. Same loss and gradients as eager (tests/test_gemma.py)."""
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    for m in norms:
        m.compile()
    return len(norms)


# Loading lives in checkpoint.py, which imports this module; this is its public name.
from minilora.checkpoint import from_pretrained  # noqa: E402, F401
