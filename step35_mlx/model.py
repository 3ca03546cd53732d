"""The Step 3.5 Flash graph: trunk, LM head and the MTP modules' weights.

Parameter names mirror the Hugging Face checkpoint (``model.layers.N.moe.gate_proj``,
``model.layers.N.share_expert.*``, ...). The only renames are for the MTP layers,
which live at ``model.mtp.J`` instead of ``model.layers.{num_hidden_layers + J}``
(see ``loader.hf_to_internal``).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache, Mask, SlidingKVCache, window_mask
from .config import LayerSpec, ModelConfig
from .layers.attention import Attention
from .layers.mlp import MLP
from .layers.moe import MoE
from .layers.norms import ZeroCenteredRMSNorm
from .streams import split_dense_ffn, split_linear, split_moe_ffn

DEFAULT_SLACK = 8
MTP_HIDDEN_VARIANTS = ("pre_norm", "post_norm")


def _uncached_mask(T: int, window: int | None) -> Mask:
    if T == 1:
        return None
    if window is None or T <= window:
        return "causal"
    pos = mx.arange(T)
    return window_mask(pos, pos, window)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``a = x + attn(norm(x))``, ``y = a + ffn(norm(a))``; FFN dense or MoE + shared expert."""

    def __init__(self, config: ModelConfig, spec: LayerSpec):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.is_sliding = spec.is_sliding
        self.is_moe = spec.is_moe
        self.input_layernorm = ZeroCenteredRMSNorm(H, eps)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(H, eps)
        self.self_attn = Attention(H, spec, eps, gated=config.use_head_wise_attn_gate)
        if spec.is_moe:
            self.moe = MoE(
                H, config.moe_intermediate_size, config.moe_num_experts, config.moe_top_k,
                config.moe_router_scaling_factor, config.norm_expert_weight, spec.swiglu_limit,
            )
            self.share_expert = MLP(H, config.share_expert_dim, spec.swiglu_limit_shared)
        else:
            self.mlp = MLP(H, config.intermediate_size, spec.swiglu_limit_shared)
        # Tensor parallelism (step35_mlx.distributed): the group the FFN's partial sums are added over.
        self.ffn_group = None

    side_stream = None  # a second stream for independent FFN work (see ``streams.use_two_streams``)

    def ffn(self, x: mx.array) -> mx.array:
        if not self.is_moe:
            y = self.mlp(x) if self.side_stream is None else split_dense_ffn(self.mlp, x, self.side_stream)
        elif self.side_stream is not None:
            y = split_moe_ffn(self, x, self.side_stream)
        else:
            y = self.moe(x) + self.share_expert(x)
        return y if self.ffn_group is None else mx.distributed.all_sum(y, group=self.ffn_group)

    def __call__(self, x: mx.array, mask: Mask = None, cache: Any = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.ffn(self.post_attention_layernorm(h))


class SharedHead(nn.Module):
    """An MTP module's own output head (``transformer.shared_head`` in the checkpoint)."""

    def __init__(self, hidden_size: int, vocab_size: int, eps: float):
        super().__init__()
        self.norm = ZeroCenteredRMSNorm(hidden_size, eps)
        self.output = nn.Linear(hidden_size, vocab_size, bias=False)

    def __call__(self, h: mx.array) -> mx.array:
        return self.output(self.norm(h))


class MTPLayer(DecoderLayer):
    """MTP module ``depth``: a decoder layer fed by ``eh_proj([enorm(e), hnorm(h)])``, with its own head.

    Row t embeds token ``t + depth + 1`` and sits at that token's position, so the
    attention's RoPE positions are shifted by ``depth + 1`` against the cache offset.
    """

    def __init__(self, config: ModelConfig, spec: LayerSpec, depth: int):
        super().__init__(config, spec)
        H, eps = config.hidden_size, config.rms_norm_eps
        self.window = config.sliding_window if spec.is_sliding else None
        self.enorm = ZeroCenteredRMSNorm(H, eps)
        self.hnorm = ZeroCenteredRMSNorm(H, eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.shared_head = SharedHead(H, config.vocab_size, eps)
        self.self_attn.position_shift = depth + 1

    def step(self, embeds: mx.array, hidden: mx.array, cache: Any = None) -> mx.array:
        """Decoder-layer output (before ``shared_head.norm``) for rows pairing ``embeds`` with ``hidden``."""
        x = self.eh_proj(mx.concatenate([self.enorm(embeds), self.hnorm(hidden)], axis=-1))
        T = x.shape[1]
        mask = cache.make_mask(T) if cache is not None else _uncached_mask(T, self.window)
        return self(x, mask, cache)


def check_token_ids(tokens: mx.array, vocab_size: int) -> None:
    """``ValueError`` unless ``tokens`` is a 2-D ``[batch, length]`` integer array of ids in ``[0, vocab_size)``."""
    if not isinstance(tokens, mx.array) or tokens.ndim != 2:
        shape = tuple(tokens.shape) if hasattr(tokens, "shape") else type(tokens).__name__
        raise ValueError(f"tokens must be a 2-D [batch, length] array of token ids, got {shape}; "
                         "pass one sequence as tokens[None]")
    if not mx.issubdtype(tokens.dtype, mx.integer):
        raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    if tokens.size == 0:
        raise ValueError("tokens is empty")
    lo, hi = mx.min(tokens).item(), mx.max(tokens).item()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab_size})")


class Step35Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, config.layer(i)) for i in range(config.num_hidden_layers)]
        self.norm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mtp = [
            MTPLayer(config, config.layer(config.num_hidden_layers + j), depth=j)
            for j in range(config.num_nextn_predict_layers)
        ]


class Model(nn.Module):
    """``model(tokens, cache)`` -> logits ``[B, T, V]``; ``forward_hidden`` -> pre-final-norm hidden."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Step35Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Which trunk hidden feeds MTP module 0 is disputed between runtimes (spec §9); explicit here.
        self.mtp_hidden = "pre_norm"

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def make_cache(self, slack: int = DEFAULT_SLACK, kv_bits: int | None = None,
                   kv_group_size: int = 64) -> list[KVCache | SlidingKVCache]:
        """One cache per trunk layer; sliding rings keep ``window + slack`` slots for exact rollback.

        ``kv_bits`` (4 or 8) stores keys and values quantized, full and sliding layers alike.
        """
        return self._caches(self.layers, slack, kv_bits, kv_group_size)

    def _caches(self, layers, slack, kv_bits, kv_group_size):
        window = self.config.sliding_window
        return [
            SlidingKVCache(window, slack, kv_bits, kv_group_size) if l.is_sliding else KVCache(kv_bits, kv_group_size)
            for l in layers
        ]

    def _masks(self, T: int, cache: list | None) -> tuple[Mask, Mask]:
        """(full mask, sliding mask), computed once per forward from the first cache of each kind."""
        kinds = [l.is_sliding for l in self.layers]
        masks = []
        for sliding in (False, True):
            if sliding not in kinds:
                masks.append(None)
            elif cache is None:
                masks.append(_uncached_mask(T, self.config.sliding_window if sliding else None))
            else:
                masks.append(cache[kinds.index(sliding)].make_mask(T))
        return masks[0], masks[1]

    def forward_hidden(self, tokens: mx.array, cache: list | None = None,
                       input_embeddings: mx.array | None = None) -> mx.array:
        """Run the trunk on ``tokens`` ``[B, T]``; returns the hidden state before the final norm.

        Refuses (``ValueError``) token arrays that are not 2-D integer arrays or hold ids outside
        ``[0, vocab_size)``, which would read outside the embedding table. The check reads the ids
        on the host; decoding loops whose ids come from the sampler call :meth:`trunk` instead.
        ``input_embeddings`` ``[B, T, H]`` replaces the token embeddings (image features merged in).
        """
        check_token_ids(tokens, self.config.vocab_size)
        return self.trunk(tokens, cache, input_embeddings)

    def trunk(self, tokens: mx.array, cache: list | None = None,
              input_embeddings: mx.array | None = None) -> mx.array:
        """:meth:`forward_hidden` without the id check, so a lazily sampled token stays lazy."""
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} entries; the model has {len(self.layers)} layers")
        h = self.model.embed_tokens(tokens) if input_embeddings is None else input_embeddings
        full_mask, sliding_mask = self._masks(tokens.shape[1], cache)
        for i, layer in enumerate(self.layers):
            h = layer(h, sliding_mask if layer.is_sliding else full_mask, cache[i] if cache else None)
        return h

    def shard(self, group: mx.distributed.Group | None = None, mode: str = "tensor",
              split: list[int] | None = None) -> "Model":
        """This model split across ``group`` (``step35_mlx.distributed``): ``mode`` tensor or expert
        split it in place and return it; pipeline returns this rank's stage (``split``: layers per rank)."""
        from .distributed.loading import shard_model

        return shard_model(self, group or mx.distributed.init(), mode, split)

    head_side_stream = None  # a second CPU stream for half the LM head's rows (``streams.use_two_streams``)

    def logits(self, hidden: mx.array) -> mx.array:
        """Final norm + LM head on a pre-norm hidden state."""
        h = self.model.norm(hidden)
        return self.lm_head(h) if self.head_side_stream is None else split_linear(self.lm_head, h, self.head_side_stream)

    def __call__(self, tokens: mx.array, cache: list | None = None,
                 input_embeddings: mx.array | None = None) -> mx.array:
        return self.logits(self.forward_hidden(tokens, cache, input_embeddings))

    # ---- multi-token prediction -------------------------------------------------------

    @property
    def num_mtp(self) -> int:
        return len(self.model.mtp)

    def make_mtp_cache(self, slack: int = DEFAULT_SLACK, kv_bits: int | None = None,
                       kv_group_size: int = 64) -> list[KVCache | SlidingKVCache]:
        """One cache per MTP module, by each module's own attention type."""
        return self._caches(self.model.mtp, slack, kv_bits, kv_group_size)

    def mtp_input(self, hidden: mx.array) -> mx.array:
        """The trunk hidden that feeds MTP module 0, per ``mtp_hidden`` ("pre_norm" or "post_norm")."""
        if self.mtp_hidden not in MTP_HIDDEN_VARIANTS:
            raise ValueError(f"mtp_hidden must be one of {MTP_HIDDEN_VARIANTS}, got {self.mtp_hidden!r}")
        return self.model.norm(hidden) if self.mtp_hidden == "post_norm" else hidden

    def mtp_step(self, depth: int, tokens: mx.array, prev: mx.array, cache: Any = None) -> mx.array:
        """Module ``depth`` on rows pairing ``tokens`` (the tokens it embeds) with the previous stage's rows."""
        layer = self.model.mtp[depth]
        return layer.step(self.model.embed_tokens(tokens), prev, cache)

    def mtp_head(self, depth: int, z: mx.array) -> mx.array:
        return self.model.mtp[depth].shared_head(z)

    def mtp_logits(self, tokens: mx.array, hidden: mx.array) -> list[mx.array]:
        """Teacher-forced logits of every MTP module, ``[B, T - k - 1, V]`` for module k.

        Module k at row t takes ``embed(tokens[t + k + 1])`` and the previous stage's row t
        (``mtp_input(hidden)`` for k = 0, module k - 1's output for k > 0) and predicts
        token ``t + k + 2``.
        """
        prev = self.mtp_input(hidden)
        out = []
        T = tokens.shape[1]
        for k in range(self.num_mtp):
            n = T - k - 1
            if n <= 0:
                out.append(mx.zeros((tokens.shape[0], 0, self.config.vocab_size)))
                continue
            prev = self.mtp_step(k, tokens[:, k + 1 : k + 1 + n], prev[:, :n])
            out.append(self.mtp_head(k, prev))
        return out
