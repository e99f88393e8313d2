"""Gemma 1, 2 and 3 (text) as one decoder-only Transformer, read from a Hugging Face checkpoint folder.

References: Gemma (Gemma Team 2024, arXiv:2403.08295), Gemma 2 (arXiv:2408.00118), Gemma 3
(arXiv:2503.19786); the numerics follow Hugging Face transformers' GemmaForCausalLM,
Gemma2ForCausalLM and Gemma3ForCausalLM, which is what the checkpoints were validated against.

The generations differ only in flags of GemmaConfig, named for the mechanism (sandwich_norms,
qk_norm, attn_logit_softcapping, final_logit_softcapping, sliding_layers, rope bases and scaling,
query_pre_attn_scalar); the model never asks which generation it is.

Module names are Hugging Face's (`model.layers.3.self_attn.q_proj`), so the state dict's keys are
the checkpoint's keys and adapters get peft's names. The output head is the embedding matrix
(tied weights): there is no lm_head module.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # label value that takes no part in the loss (Hugging Face's convention)


# ----------------------------------------------------------------------------------------------
# Config


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
    # Longest context the checkpoint was trained for (informational; nothing is allocated from it).
    max_position_embeddings: int = 8192
    # Special token ids from config.json (the tokenizer is the authority; these are for reference).
    bos_token_id: int | None = 2
    eos_token_id: tuple[int, ...] = (1,)
    pad_token_id: int | None = 0
    # model_type read from config.json; kept for the record, the model never branches on it.
    model_type: str = "gemma"
    # The keys of config.json this reader did not use (kept so nothing read is silently lost).
    extra: dict = field(default_factory=dict, repr=False, compare=False)

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

    @classmethod
    def from_hf(cls, hf: dict) -> GemmaConfig:
        """Read a Hugging Face config.json dict (transformers 4.x or 5.x dialect)."""
        return _config_from_hf(hf)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> GemmaConfig:
        return cls.from_hf(_read_json(path))


def _read_json(path: str | os.PathLike):
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise ValueError(f"{os.fspath(path)} is not valid JSON ({e}); re-download or fix it") from e


# What each model_type means: the architecture flags (not stored in config.json) and the defaults
# transformers' config classes fill in for absent keys (hub configs rely on them, e.g. the
# text_config of the multimodal Gemma 3 checkpoints lists only a handful of fields).
_ARCH = {
    "gemma": dict(sandwich_norms=False, qk_norm=False, slide_every=None),
    "gemma2": dict(sandwich_norms=True, qk_norm=False, slide_every=2),
    "gemma3_text": dict(sandwich_norms=True, qk_norm=True, slide_every=6),
}
_DEFAULTS = {
    "gemma": dict(
        vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=16, head_dim=256, max_position_embeddings=8192,
        rope_theta=10_000.0, sliding_window=None, attn_logit_softcapping=None,
        final_logit_softcapping=None,
    ),
    "gemma2": dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
        rope_theta=10_000.0, query_pre_attn_scalar=256, sliding_window=4096,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    ),
    "gemma3_text": dict(
        vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=256,
        sliding_window=4096, attn_logit_softcapping=None, final_logit_softcapping=None,
    ),
}  # fmt: skip
# GELU spellings (transformers' ACT2FN names) -> F.gelu's `approximate`.
_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def _gelu_approximate(model_type: str, hf: dict) -> str:
    """The MLP's GELU as transformers reads it: Gemma 1 from `hidden_act`, where the legacy "gelu"
    of the released configs means the tanh form (GemmaConfig rewrites it; the checkpoints were
    trained with it); Gemma 2/3 from `hidden_activation`, where "gelu" is the exact GELU."""
    if model_type == "gemma":
        act = hf.get("hidden_act") or "gelu_pytorch_tanh"
        act = "gelu_pytorch_tanh" if act == "gelu" else act
    else:
        act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in _GELU:
        raise ValueError(f"hidden activation {act!r} is not supported; Gemma uses GELU ({sorted(_GELU)})")
    return _GELU[act]


def _rope(params: dict | None, where: str) -> tuple[float | None, float]:
    """(theta or None, linear factor) from one rope_parameters / rope_scaling dict."""
    if not params:
        return None, 1.0
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return params.get("rope_theta"), 1.0
    if kind == "linear":
        return params.get("rope_theta"), float(params["factor"])
    raise ValueError(
        f"{where}: rope_type {kind!r} is not supported; minilora implements 'default' and 'linear'"
    )


def _config_from_hf(hf: dict) -> GemmaConfig:
    model_type = hf.get("model_type")
    if model_type == "gemma3":  # multimodal checkpoint: the language model's config is nested
        hf = dict(hf.get("text_config") or {})
        model_type = hf.setdefault("model_type", "gemma3_text")
    if model_type not in _ARCH:
        raise ValueError(
            f"model_type {model_type!r} is not a Gemma text model; minilora reads "
            f"{sorted([*_ARCH, 'gemma3'])}"
        )
    arch, c = _ARCH[model_type], {**_DEFAULTS[model_type], **hf}
    if c.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=True (an embedding model) is not supported")
    if c.get("attention_bias"):
        raise ValueError("attention_bias=True is not a Gemma layout; Gemma projections have no bias")
    n = c["num_hidden_layers"]

    # Which layers slide: layer_types decides when present (transformers 5.x writes it), else the
    # generation's pattern: every `slide_every`-th layer (1-based) is full, the others slide.
    if c.get("layer_types") is not None:
        types = list(c["layer_types"])
        unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
        if len(types) != n or unknown:
            raise ValueError(f"layer_types must list {n} of sliding_attention/full_attention, got {types}")
        sliding = [t == "sliding_attention" for t in types]
    else:
        every = c.get("sliding_window_pattern", c.get("_sliding_window_pattern", arch["slide_every"]))
        sliding = [bool(every) and (i + 1) % every != 0 for i in range(n)]
    window = c.get("sliding_window")
    if window is None:
        sliding = [False] * n

    # RoPE: 5.x writes rope_parameters (one dict, or one per layer type); 4.x writes rope_theta,
    # rope_local_base_freq and rope_scaling (which Gemma 3 applies to full layers only).
    theta, local_theta = c.get("rope_theta", 10_000.0), c.get("rope_local_base_freq")
    factor, local_factor = 1.0, 1.0
    rp = c.get("rope_parameters")
    if isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
        t, factor = _rope(rp.get("full_attention"), "rope_parameters.full_attention")
        theta = t if t is not None else theta
        t, local_factor = _rope(rp.get("sliding_attention"), "rope_parameters.sliding_attention")
        local_theta = t if t is not None else local_theta
    elif isinstance(rp, dict):
        t, factor = _rope(rp, "rope_parameters")
        theta = t if t is not None else theta
        local_factor = factor
    else:
        _, factor = _rope(c.get("rope_scaling"), "rope_scaling")
        local_factor = 1.0 if model_type == "gemma3_text" else factor
    if local_theta is None:
        local_theta = theta

    eos = c.get("eos_token_id", 1)
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    used = {f.name for f in fields(GemmaConfig)} | {
        "layer_types", "sliding_window_pattern", "_sliding_window_pattern", "rope_parameters",
        "rope_scaling", "hidden_act", "hidden_activation",
    }  # fmt: skip
    return GemmaConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=n,
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        query_pre_attn_scalar=float(c.get("query_pre_attn_scalar") or c.get("head_dim") or 256),
        sandwich_norms=arch["sandwich_norms"],
        qk_norm=arch["qk_norm"],
        gelu_approximate=_gelu_approximate(model_type, hf),
        attn_logit_softcapping=c.get("attn_logit_softcapping"),
        final_logit_softcapping=c.get("final_logit_softcapping"),
        sliding_window=window,
        sliding_layers=tuple(sliding),
        rope_theta=float(theta),
        rope_local_base_freq=float(local_theta),
        rope_scaling_factor=factor,
        rope_local_scaling_factor=local_factor,
        max_position_embeddings=c.get("max_position_embeddings", 8192),
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=c.get("pad_token_id"),
        model_type=model_type,
        extra={k: v for k, v in c.items() if k not in used},
    )


# ----------------------------------------------------------------------------------------------
# Building blocks


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
    """cos and sin of shape (T, head_dim) for the "rotate half" layout; linear scaling divides the
    frequencies (equivalently the positions) by `factor`. Computed in float32, cast once."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    )
    inv_freq = inv_freq / factor
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hd). Rotates the pair (x[i], x[i + hd/2]) by the position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


def attention_mask(q_start: int, T: int, k_start: int, S: int, window: int | None, device) -> torch.Tensor:
    """Boolean (T, S), True where query q_start + t may see key k_start + s: causal, and within
    the window (i - window < j <= i) on sliding layers."""
    q = torch.arange(q_start, q_start + T, device=device)[:, None]
    k = torch.arange(k_start, k_start + S, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int, cache: KVCache | None):
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
        S = k.shape[2]

        # The mask: none when every key is visible (one new token, window not exceeded), the
        # causal flag when queries and keys are the same positions within one window, else explicit.
        everything_visible = T == 1 and (self.window is None or self.window >= S)
        plain_causal = k_start == pos and S == T and (self.window is None or self.window >= T)
        mask = (
            None
            if everything_visible or plain_causal
            else attention_mask(pos, T, k_start, S, self.window, x.device)
        )

        if self.softcap is None:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=plain_causal and not everything_visible,
                scale=self.scale, enable_gqa=self.n_kv != self.n_head,
            )  # fmt: skip
        else:
            # Soft-capped logits (Gemma 2) need the scores in hand: tanh between the product and
            # the softmax. Query heads are grouped over their shared key/value head (no copy).
            rep = self.n_head // self.n_kv
            qg = q.view(B, self.n_kv, rep, T, self.head_dim)  # (B, nkv, rep, T, hd)
            att = (qg @ k.unsqueeze(2).transpose(-2, -1)) * self.scale  # (B, nkv, rep, T, S)
            att = softcap(att, self.softcap)
            if mask is None and not everything_visible:
                mask = attention_mask(pos, T, k_start, S, self.window, x.device)
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            att = F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype)
            y = (att @ v.unsqueeze(2)).view(B, self.n_head, T, self.head_dim)  # (B, nh, T, hd)
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

    def forward(self, h, cos, sin, pos: int, cache: KVCache | None = None):
        a = self.self_attn(self.input_layernorm(h), cos, sin, pos, cache)
        if self.sandwich:
            h = h + self.post_attention_layernorm(a)
            h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        else:
            h = h + a
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h


class _Body(nn.Module):
    """Hugging Face's `model.` level: embed_tokens, layers, norm."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if not weight.is_meta:  # nn.Embedding's own init; skipped on meta, where the first normal_
            nn.init.normal_(weight)  # imports ~900 torch modules (+146 MB resident) for nothing
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# ----------------------------------------------------------------------------------------------
# The model


class Gemma(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.model = _Body(config)
        self.gradient_checkpointing = False  # recompute each layer in backward (saves activations)
        self.name_or_path: str | None = None

    def enable_gradient_checkpointing(self, on: bool = True) -> None:
        self.gradient_checkpointing = on

    def new_cache(self) -> KVCache:
        return KVCache(self.config)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        last_logits_only: bool = False,
    ) -> torch.Tensor:
        """input_ids (B, T). Returns float32 logits (B, T, vocab) (or (B, 1, vocab) with
        last_logits_only), or with labels (B, T) the mean cross-entropy of predicting labels[t + 1]
        at position t over the labels that are not -100 (shifted inside, as in Hugging Face).
        With a cache, the tokens continue the cached sequence and their keys are appended."""
        c = self.config
        B, T = input_ids.shape
        pos = cache.seen if cache is not None else 0
        emb = self.model.embed_tokens
        h = emb(input_ids)  # (B, T, d)
        # sqrt(d) rounded to the activation dtype first, as the reference does (55.5 in bf16 for d=3072).
        h = h * torch.tensor(c.hidden_size**0.5, dtype=h.dtype)
        positions = torch.arange(pos, pos + T, device=input_ids.device)
        # cos/sin per layer kind: False = full attention, True = sliding window.
        rope = {
            False: rope_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_scaling_factor, h.dtype),
            True: rope_cos_sin(
                positions, c.head_dim, c.rope_local_base_freq, c.rope_local_scaling_factor, h.dtype
            ),
        }
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.model.layers):
            cos, sin = rope[c.sliding_layers[i]]
            if recompute:
                h = checkpoint(layer, h, cos, sin, pos, use_reentrant=False)
            else:
                h = layer(h, cos, sin, pos, cache)
        if cache is not None:
            cache.seen += T
        h = self.model.norm(h)  # (B, T, d)

        if labels is None:
            if last_logits_only:
                h = h[:, -1:]
            return self.head(h)
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        # Position t predicts token t + 1; the head runs only where that label counts.
        targets = labels[:, 1:]  # (B, T-1)
        keep = targets != IGNORE_INDEX
        if not keep.any():
            # No label in the batch: a zero that still belongs to the graph (backward works).
            return h.sum() * 0.0
        logits = self.head(h[:, :-1][keep])  # (N, vocab)
        return F.cross_entropy(logits, targets[keep])

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Tied output head: h @ embed_tokens.weight.T, soft-capped, float32. h: (..., d)."""
        logits = F.linear(h, self.model.embed_tokens.weight).float()  # (..., vocab)
        return softcap(logits, self.config.final_logit_softcapping)


# ----------------------------------------------------------------------------------------------
# Loading


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """ "auto": bf16 on a CUDA GPU that supports it, float32 elsewhere (CPUs here have no fast
    bf16; fp16 overflows Gemma's activations)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    named = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    if dtype not in named:
        raise ValueError(f"dtype {dtype!r} is not one of 'auto', {sorted(named)} or a torch.dtype")
    return named[dtype]


# safetensors' dtype names -> torch dtypes (the checkpoints use BF16, F16 or F32).
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_CHUNK_BYTES = 16 << 20  # conversion buffer when the stored dtype differs from the target


def _safetensors_header(path: str) -> tuple[dict, int]:
    """The tensors' table of a .safetensors file (name -> dtype, shape, data_offsets) and where the
    data starts. Format: 8-byte little-endian header length, JSON header, raw little-endian data.
    A file too short for the data its header promises is an error here, before anything is read."""
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little")
        if len(raw) < 8 or n <= 0 or n > 100_000_000:
            raise ValueError(f"{path} is not a safetensors file ({len(raw)} bytes, header length {n})")
        raw = f.read(n)
        if len(raw) < n:
            raise ValueError(f"{path} is truncated inside its header (re-download this file)")
        try:
            header = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"{path}: the safetensors header is corrupted ({e}); re-download it") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object; re-download it")
    header.pop("__metadata__", None)
    size, data_start = os.path.getsize(path), 8 + n
    cut = [(e["data_offsets"], k) for k, e in header.items() if data_start + e["data_offsets"][1] > size]
    if cut:
        offsets, name = min(cut)  # the first tensor, in file order, whose data is not all there
        raise ValueError(
            f"{path} is truncated: tensor {name} ends at byte {data_start + offsets[1]} but the file "
            f"has {size} bytes (re-download this file)"
        )
    return header, data_start


def _read_tensor(f, data_start: int, entry: dict, name: str, dtype: torch.dtype, device) -> torch.Tensor:
    """Read one tensor from an open safetensors file straight into a new (shape, dtype, device)
    tensor. With plain reads (no mmap) only the result is resident: a mapped file's touched pages
    would count toward RSS and double the loading peak."""
    stored = _ST_DTYPES.get(entry["dtype"])
    if stored is None:
        raise ValueError(f"{name}: stored dtype {entry['dtype']} is not a floating type minilora loads")
    shape, (begin, end) = entry["shape"], entry["data_offsets"]
    numel = math.prod(shape)
    if end - begin != numel * stored.itemsize:
        raise ValueError(f"{name}: {end - begin} bytes stored for shape {shape} of {entry['dtype']}")
    f.seek(data_start + begin)
    on_cpu = torch.device(device).type == "cpu"
    if stored == dtype and on_cpu:
        out = torch.empty(shape, dtype=dtype)
        _readinto(f, out.view(-1).view(torch.uint8), name)
        return out
    out = torch.empty(shape, dtype=dtype, device=device)
    flat, step = out.view(-1), max(1, _CHUNK_BYTES // stored.itemsize)
    buf = torch.empty(min(step, max(numel, 1)), dtype=stored)
    for i in range(0, numel, step):
        part = buf[: min(step, numel - i)]
        _readinto(f, part.view(torch.uint8), name)
        flat[i : i + part.numel()].copy_(part)
    return out


def _readinto(f, dst: torch.Tensor, name: str) -> None:
    view, done = memoryview(dst.numpy()), 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise ValueError(f"{name}: {f.name} ends before the tensor's data does (truncated download?)")
        done += got


def _weight_files(path: str) -> dict[str, str]:
    """name -> shard file, from model.safetensors.index.json or a single model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        weight_map = _read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = {k: os.path.join(path, v) for k, v in weight_map.items()}
        missing = sorted({v for v in files.values() if not os.path.isfile(v)})
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {missing}")
        return files
    if os.path.isfile(single):
        header, _ = _safetensors_header(single)
        return {k: single for k in header}
    found = sorted(os.listdir(path))
    raise FileNotFoundError(
        f"no weights in {path}: expected model.safetensors or model.safetensors.index.json "
        f"(found {found[:10]}); .bin/.pth/.gguf files are not read (minilora.gguf imports a GGUF file)"
    )


def _entry(header: dict, stored: str, file: str) -> dict:
    if stored not in header:
        raise ValueError(f"{file} does not contain {stored}, which the index maps to it")
    return header[stored]


# Multimodal Gemma 3 checkpoints hold the language model under another prefix, next to the vision
# tower, which a text model does not use.
_RENAMES = (("language_model.model.", "model."), ("model.language_model.", "model."),
            ("language_model.lm_head.", "lm_head."))  # fmt: skip
_SKIP = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def from_pretrained(
    path: str | os.PathLike, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu"
) -> Gemma:
    """Build the Gemma model of a Hugging Face checkpoint folder (config.json + safetensors).

    Each tensor is read straight into its final dtype and device, on a model built on the meta
    device, so the peak memory is the model plus one conversion buffer. device="meta" builds from
    config.json alone. Loading is strict: missing, unexpected and mis-shaped tensors are errors.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        raise NotADirectoryError(
            f"{path!r} is a file; pass the checkpoint folder that holds config.json and the weights"
        )
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path!r} has no config.json; is it a Hugging Face checkpoint folder?")
    hf = _read_json(config_path)
    config = GemmaConfig.from_hf(hf)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = Gemma(config).to(dtype)
    model.name_or_path, model.config = path, config
    if device.type == "meta":
        return model

    files = _weight_files(path)
    multimodal = hf.get("model_type") == "gemma3"
    names: dict[str, tuple[str, str]] = {}  # our name -> (stored name, file)
    for stored, file in files.items():
        name = stored
        if multimodal:
            if stored.startswith(_SKIP):
                continue
            for old, new in _RENAMES:
                if stored.startswith(old):
                    name = new + stored[len(old) :]
        names[name] = (stored, file)
    expected = dict(model.named_parameters())
    tied_head = names.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit a {config.model_type} model built from its config.json:\n"
            f"  missing tensors ({len(missing)}): {missing[:20]}\n"
            f"  unexpected tensors ({len(unexpected)}): {unexpected[:20]}"
        )

    by_file: dict[str, list[str]] = {}
    for name, (_, file) in names.items():
        by_file.setdefault(file, []).append(name)
    for file, group in by_file.items():
        header, data_start = _safetensors_header(file)
        with open(file, "rb", buffering=0) as f:
            for name in group:
                stored = names[name][0]
                entry, want = _entry(header, stored, file), tuple(expected[name].shape)
                if tuple(entry["shape"]) != want:
                    raise ValueError(
                        f"{stored}: checkpoint shape {tuple(entry['shape'])}, model expects {want}"
                    )
                tensor = _read_tensor(f, data_start, entry, stored, dtype, device)
                module_name, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor))
    if tied_head is not None:
        stored, file = tied_head
        header, data_start = _safetensors_header(file)
        with open(file, "rb", buffering=0) as f:
            head = _read_tensor(f, data_start, _entry(header, stored, file), stored, dtype, device)
        if not torch.equal(head, model.model.embed_tokens.weight):
            raise ValueError(
                f"{stored} differs from model.embed_tokens.weight; minilora's Gemma ties the output "
                "head to the embedding and cannot load a separate head"
            )
    return model
