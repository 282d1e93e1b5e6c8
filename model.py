"""
The codecgpt Transformer: a decoder-only language model over codec tokens.

    tokens -> embedding -> dropout
           -> depth x [ x = x + Attention(LayerNorm(x)) ; x = x + MLP(LayerNorm(x)) ]
           -> LayerNorm -> Linear -> logits (a score for every possible next token)

It is the reference recipe's x-transformers model (TransformerWrapper + Decoder(rotary_pos_emb=True)), whose
weights load into ours (GPT.from_x_transformers) and give the same logits: LayerNorm with a gain and no bias; an
MLP Linear -> exact GELU -> Linear, 4x wide; causal attention (a position sees itself and the positions before it,
never a later one) that knows where tokens are only through rotary position embeddings on the first `rotary_dim`
dims of every head, in *interleaved* pairs (x0, x1), (x2, x3), ... (GPT-J style).

With the delay and parallel patterns (tokenizer.py) the model reads K token streams side by side: each stream has
its own embedding table (a step's K embeddings are summed) and its own output layer, so one step predicts K tokens.

Sampling (generate) runs the prompt once and keeps every layer's keys and values in a KVCache, so each new token
costs one position instead of the whole sequence again.

Reading order: GPTConfig, rotary, explicit_attention (the textbook formula), Attention, KVCache, MLP, Block,
GPT.forward, GPT.generate and its steps. A first read can skip the last two sections: "Faster paths" (the same
maths, faster) and the x-transformers mapping.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class GPTConfig:
    vocab_size: int = 2049          # token ids the model reads and predicts, per stream (CodecTokenizer.vocab_size)
    max_seq_len: int = 250          # positions the model ever sees (train.py: the tokens of a note, minus one)
    dim: int = 256
    depth: int = 6
    heads: int = 4
    dim_head: int = 64              # like x-transformers, independent of dim: inner width = heads * dim_head
    rotary_dim: int | None = None   # dims of each head that rotate; None = dim_head // 2 like x-transformers
    dropout: float = 0.1            # on embeddings, attention weights and the MLP's hidden layer
    streams: int = 1                # token streams read side by side (CodecTokenizer.streams): 1 for flatten

    def __post_init__(self):
        if self.rotary_dim is None:
            self.rotary_dim = self.dim_head // 2
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.dim_head:
            raise ValueError(f"rotary_dim must be even and in (0, dim_head], got {self.rotary_dim}")


# ----------------------------------------------------------------------------------------------------
# Rotary position embedding

def rotary_tables(max_len: int, dim_head: int, rotary_dim: int, base: float = 10000.0) -> Tensor:
    """Rotations e^(i * position * f_j) as a complex table (max_len, dim_head / 2), one per pair of dims.

    Pair j of a head is the complex number x_2j + i x_2j+1 (interleaved layout), and rotating it by its angle is
    one complex multiplication. Only the first rotary_dim / 2 pairs rotate (frequencies f_j = base^(-2j/rotary_dim));
    the other pairs get the rotation 1 + 0i, which leaves them unchanged, so apply_rotary needs no slicing.
    """
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    angles = torch.zeros(max_len, dim_head // 2)
    angles[:, :rotary_dim // 2] = torch.outer(torch.arange(max_len).float(), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: Tensor, rotations: Tensor) -> Tensor:
    """Rotate each pair (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) by its position's angle.

    x: (B, T, n, dim_head) (n = heads, or 2 * heads for q and k together); rotations: (T, dim_head / 2) from
    rotary_tables at the T absolute positions of x. Computed in float32 (like x-transformers), returned in x's dtype.
    Because q at position i and k at position j are turned by angles i f and j f, their dot product depends only on
    i - j: attention sees how far apart two tokens are.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))    # (B, T, n, dim_head / 2) complex
    return torch.view_as_real(pairs * rotations[:, None]).flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Attention

def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: nn.Module) -> Tensor:
    """softmax(q k^T / sqrt(d)) v, with the scores of keys a query may not see set to -inf first.

    q: (B, heads, Tq, d); k, v: (B, heads, Tk, d); mask: (Tq, Tk) bool, True = may attend, or None = all keys.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])          # (B, heads, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))               # the causal mask: no peeking ahead
    weights = dropout(scores.softmax(dim=-1))                           # each query's weights sum to 1
    return weights @ v                                                  # (B, heads, Tq, d)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads, self.dim_head = cfg.heads, cfg.dim_head
        inner = cfg.heads * cfg.dim_head
        self.qkv = nn.Linear(cfg.dim, 3 * inner, bias=False)  # one matmul for q, k and v
        self.out = nn.Linear(inner, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attend = explicit_attention  # GPT.set_attention may swap in a faster function of the same maths

    def forward(self, x: Tensor, rotations: Tensor, mask: Tensor | None, pos: int = 0,
                cache: KVCache | None = None) -> Tensor:
        """x (B, T, dim) at positions pos.. -> (B, T, dim); mask: (T, keys) bool, or None for every key."""
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, self.dim_head)
        qk = apply_rotary(qkv[:, :, :2].flatten(2, 3), rotations)      # q and k rotated in one call
        q, k = qk.transpose(1, 2).split(self.heads, dim=1)           # (B, heads, T, dim_head) each
        v = qkv[:, :, 2].transpose(1, 2)
        if cache is not None:  # earlier positions' keys and values come from the cache, this call's go into it
            k, v = cache.update(pos, k, v)
        y = self.attend(q, k, v, mask, self.dropout)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))          # heads side by side, then mixed


# ----------------------------------------------------------------------------------------------------
# The key/value cache: what attention keeps of earlier positions while sampling

class KVCache:
    """Preallocated keys and values of one layer: (batch, heads, max_len, dim_head) each."""

    def __init__(self, batch_size: int, heads: int, max_len: int, dim_head: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, heads, max_len, dim_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, heads, T, dim_head) at positions pos.. and return the keys and values of positions
        0 .. pos + T - 1: everything this call's queries may attend to."""
        end = pos + k.shape[2]
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.down = nn.Linear(4 * cfg.dim, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.dropout(F.gelu(self.up(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, bias=False)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, bias=False)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rotations: Tensor, mask: Tensor | None, pos: int = 0,
                cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), rotations, mask, pos, cache)
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------------------------------
# The model

class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        # one embedding table and one output layer per stream, stacked: stream k's ids are rows k * vocab_size..
        self.embed = nn.Embedding(cfg.streams * cfg.vocab_size, cfg.dim)
        self.register_buffer("stream_offsets", torch.arange(cfg.streams)[:, None] * cfg.vocab_size, persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, bias=False)
        self.head = nn.Linear(cfg.dim, cfg.streams * cfg.vocab_size, bias=False)  # not tied to the embedding
        # Offsets, tables and mask follow from the config, so they stay out of the state dict (persistent=False).
        self.register_buffer("rotations", rotary_tables(cfg.max_seq_len, cfg.dim_head, cfg.rotary_dim),
                             persistent=False)
        causal = torch.ones(cfg.max_seq_len, cfg.max_seq_len, dtype=torch.bool).tril()  # row i: keys 0..i
        self.register_buffer("causal_mask", causal, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith("attn.out.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.depth))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_attention(self, kind: str) -> None:
        """'explicit' (explicit_attention, nn.Dropout), or the same maths from "Faster paths": 'fast' (fewer passes,
        a cheaper dropout mask on CPU) or 'fused' (F.scaled_dot_product_attention, flash on CUDA)."""
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {kind!r}")
        for block in self.blocks:
            block.attn.attend = ATTENTIONS[kind]
        swap_dropouts(self, kind)

    def forward(self, idx: Tensor, pos: int = 0, caches: list[KVCache] | None = None) -> Tensor:
        """idx (B, [streams,] T): token ids at positions pos.. -> logits (B, [streams,] T, vocab_size); the logits
        at t score every candidate for the token at t + 1. caches (one KVCache per block) hold earlier positions."""
        T = idx.shape[-1]
        if pos + T > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {pos + T} exceed max_seq_len={self.cfg.max_seq_len}")
        # Queries at positions pos.. and keys from 0: rows pos.. of the lower triangle. One query sees every key.
        mask = self.causal_mask[pos:pos + T, :pos + T] if T > 1 else None
        return self.layers(idx, self.rotations[pos:pos + T], mask, pos, caches)

    def layers(self, idx: Tensor, rotations: Tensor, mask: Tensor | None, pos: int,
               caches: list[KVCache] | None) -> Tensor:
        """forward's body, given the rotations and the mask of idx's positions: embedding, blocks, norm, head."""
        # several streams (B, streams, T): each through its own table, then summed
        x = self.dropout(self.embed(idx + self.stream_offsets).sum(dim=1) if idx.dim() == 3 else self.embed(idx))
        for i, block in enumerate(self.blocks):
            x = block(x, rotations, mask, pos, None if caches is None else caches[i])
        logits = self.head(self.norm(x))
        if idx.dim() == 3:
            logits = logits.view(*x.shape[:2], self.cfg.streams, self.cfg.vocab_size).transpose(1, 2)
        return logits

    # ------------------------------------------------------------------------------------------------
    # Sampling, in gpt-fast's steps: prefill the prompt, then decode one token at a time

    def new_caches(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> list[KVCache]:
        """One empty KVCache per block, for max_len positions."""
        p = self.embed.weight  # the activations' dtype (the head's weight may be int8: quantize_weights)
        return [KVCache(batch_size, self.cfg.heads, max_len, self.cfg.dim_head, dtype or p.dtype, p.device)
                for _ in range(self.cfg.depth)]

    def prefill(self, prompt: Tensor, caches: list[KVCache] | None) -> Tensor:
        """Run the whole prompt once, filling the caches (None: no cache); returns the logits of its last position
        (B, [streams,] vocab)."""
        return self(prompt, 0, caches)[..., -1, :]

    def decode_one_token(self, token: Tensor, pos: int, caches: list[KVCache]) -> Tensor:
        """Run one step's token (B,) or tokens (B, streams) at position pos against the cache; returns its logits
        (B, [streams,] vocab)."""
        return self(token[..., None], pos, caches)[..., -1, :]

    @torch.inference_mode()
    def generate(self, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, use_kv_cache: bool = True,
                 generator: torch.Generator | None = None, allowed: Tensor | None = None,
                 uncond_prompt: Tensor | None = None, cfg_scale: float = 1.0, decoder=None) -> Tensor:
        """Sample max_new_tokens after prompt (B, [streams,] T0) -> (B, [streams,] T0 + max_new_tokens).

        temperature, top_k, top_p: sample_next. allowed (T0 + max_new_tokens, [streams,] vocab) bool: what may be
        sampled at each position (tokenizer.allowed). use_kv_cache=False re-runs the whole sequence for every token,
        like the reference. uncond_prompt and cfg_scale: classifier-free guidance, both prompts in one batch.
        decoder: makes the caches and decodes one token: this model, or a CompiledDecoder (Faster paths).
        """
        guided = uncond_prompt is not None and cfg_scale != 1.0
        self.check_room(prompt, max_new_tokens, uncond_prompt if guided else None)
        B, T0, total = len(prompt), prompt.shape[-1], prompt.shape[-1] + max_new_tokens
        seqs = start_sequences(prompt, total, uncond_prompt if guided else None)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        decoder = decoder or self
        was_training = self.training
        self.eval()
        # The last sampled token is never fed back, so the model sees at most total - 1 positions.
        caches = decoder.new_caches(len(seqs), total - 1, autocast_dtype(prompt.device)) if use_kv_cache else None
        logits = self.prefill(seqs[..., :T0], caches)
        for pos in range(T0, total):
            seqs[..., pos] = next_token(logits, None if allowed is None else allowed[pos],
                                        cfg_scale if guided else None, **sampling)
            if pos + 1 < total:
                logits = (decoder.decode_one_token(seqs[..., pos], pos, caches) if use_kv_cache
                          else self.prefill(seqs[..., :pos + 1], None))     # no cache: the whole sequence again
        self.train(was_training)
        return seqs[:B]

    def check_room(self, prompt: Tensor, max_new_tokens: int, uncond_prompt: Tensor | None) -> None:
        """generate's arguments checked before any work: the positions fit the model, the two prompts match."""
        T0 = prompt.shape[-1]
        if T0 + max_new_tokens - 1 > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({T0}) + new tokens ({max_new_tokens}) need {T0 + max_new_tokens - 1} "
                             f"positions; the model has max_seq_len={self.cfg.max_seq_len}")
        if uncond_prompt is not None and uncond_prompt.shape != prompt.shape:
            raise ValueError(f"uncond_prompt {tuple(uncond_prompt.shape)} must have the prompt's shape "
                             f"{tuple(prompt.shape)}")

    @classmethod
    def from_x_transformers(cls, state_dict: dict[str, Tensor], heads: int, dim_head: int = 64,
                            max_seq_len: int = 250) -> GPT:
        """The reference recipe's x-transformers model as a GPT, every weight copied (gpt_from_x_transformers)."""
        return gpt_from_x_transformers(state_dict, heads, dim_head, max_seq_len)


# ----------------------------------------------------------------------------------------------------
# generate's steps: the token buffer, then choosing each next token

def start_sequences(prompt: Tensor, total: int, uncond_prompt: Tensor | None) -> Tensor:
    """generate's token buffer (B, [streams,] total), the prompt first. With guidance 2B rows: rows B.. start
    with the unconditional prompt and get the same sampled tokens as rows ..B."""
    rows = len(prompt) * (1 if uncond_prompt is None else 2)
    seqs = torch.empty(rows, *prompt.shape[1:-1], total, dtype=torch.long, device=prompt.device)
    seqs[..., :prompt.shape[-1]] = prompt if uncond_prompt is None else torch.cat([prompt, uncond_prompt])
    return seqs


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """What the layers compute in under autocast (bf16), so the caches hold it as it is; None outside autocast."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def next_token(logits: Tensor, allowed: Tensor | None, cfg_scale: float | None, **sampling) -> Tensor:
    """The tokens (rows, [streams]) of one position from its logits (rows, [streams,] vocab), among allowed
    ([streams,] vocab) only; with cfg_scale, guided (both copies of a note get its token). sampling: sample_next's."""
    if cfg_scale is not None:
        logits = classifier_free_guidance(logits, cfg_scale)
    rows = logits.flatten(0, -2)  # one row per token to pick: (B, vocab) or (B * streams, vocab)
    mask = None if allowed is None else allowed.expand(logits.shape).flatten(0, -2)
    token = sample_next(rows, allowed=mask, **sampling).view(logits.shape[:-1])
    return token if cfg_scale is None else torch.cat([token, token])


def classifier_free_guidance(logits: Tensor, scale: float) -> Tensor:
    """logits (2B, ...) of [conditional; unconditional] rows -> (B, ...) = uncond + scale * (cond - uncond).
    scale 0 is unconditional sampling, 1 conditional, above 1 pushes further towards the condition."""
    cond, uncond = logits.float().chunk(2)
    return uncond + scale * (cond - uncond)


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None, allowed: Tensor | None = None) -> Tensor:
    """One token per row of logits (B, vocab) -> (B,), among allowed (vocab,) only: the argmax at temperature 0,
    else a draw from logits_to_probs."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs, ids = logits_to_probs(logits / temperature, top_k, top_p)
    choice = draw(probs, generator)                                     # (B, 1) columns of probs
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


def logits_to_probs(logits: Tensor, top_k: int | None = None, top_p: float | None = None
                    ) -> tuple[Tensor, Tensor | None]:
    """Probabilities (B, n) of the tokens top_k (the k most likely) and top_p (the smallest set whose probability
    reaches p: nucleus sampling) keep, and ids (B, n), the token of each column, or None when column = token."""
    ids = None
    if top_k is not None and top_k < logits.shape[-1]:
        logits, ids = torch.topk(logits, top_k, dim=-1)                 # sorted, most likely first
    if top_p is not None and top_p < 1.0:
        if ids is None:
            logits, ids = torch.sort(logits, dim=-1, descending=True)
        probs = logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (so the most likely one always stays)
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
    return logits.softmax(dim=-1), ids


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One column per row of probs (B, n) -> (B, 1), by inverse CDF: the first column whose cumulative probability
    exceeds a uniform u. torch.multinomial's distribution, cheaper on CPU. right=True skips columns of probability 0."""
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)


# ----------------------------------------------------------------------------------------------------
# Faster paths: the same maths as above, measured faster (bench.py, docs/speed.md). Skip on a first read.
# GPT.set_attention swaps in fast_attention or fused_attention and FastDropout; generate(decoder=CompiledDecoder)
# decodes with the static shapes that torch.compile and CUDA graphs need; quantize_weights gives a copy whose weights
# take fewer bytes (int8, bfloat16: nearly the same maths).

def fast_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: nn.Module) -> Tensor:
    """explicit_attention in fewer passes over the scores: the mask becomes a bias of 0 / -inf that baddbmm adds
    while it multiplies (bias + scale * q k^T), instead of a matmul, a scale and a masked_fill one after another."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    bias = torch.zeros(Tq, Tk, dtype=q.dtype, device=q.device)
    if mask is not None:
        bias = bias.masked_fill(~mask, float("-inf"))
    scores = torch.baddbmm(bias, q.reshape(B * H, Tq, D), k.reshape(B * H, Tk, D).transpose(1, 2), alpha=D ** -0.5)
    weights = dropout(scores.softmax(dim=-1))  # on bf16 scores the kernel sums in float32, as x-transformers' .float()
    return (weights @ v.reshape(B * H, Tk, D)).view(B, H, Tq, D)


def fused_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: nn.Module) -> Tensor:
    """explicit_attention in one F.scaled_dot_product_attention call (flash on CUDA). With as many queries as keys
    the mask is the square triangle: is_causal, which skips masked blocks (it is aligned top-left: not with a cache)."""
    causal = mask is not None and q.shape[2] == k.shape[2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                          dropout_p=dropout.p if dropout.training else 0.0)


ATTENTIONS = {"explicit": explicit_attention, "fast": fast_attention, "fused": fused_attention}
ATTENTION_KINDS = tuple(ATTENTIONS)


class FastDropout(nn.Dropout):
    """nn.Dropout that returns x at once when there is nothing to drop (every call while sampling), and with
    cheap_mask draws its mask on CPU from a quarter of F.dropout's random numbers (cheap_dropout)."""

    def __init__(self, p: float, cheap_mask: bool = False):
        super().__init__(p)
        self.cheap_mask = cheap_mask

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if self.cheap_mask and x.device.type == "cpu" and self.p < 1:
            return cheap_dropout(x, self.p)
        return super().forward(x)


def cheap_dropout(x: Tensor, p: float) -> Tensor:
    """F.dropout(x, p) from a quarter of the random draws: each 16-bit quarter of a random int64 is a uniform int16,
    and an element is dropped when it is among the lowest p * 2^16 values. Kept ones are scaled by 1 / (1 - p)."""
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, 2**63 - 1).view(torch.int16)
    keep = bits[:n].view(x.shape) >= round(p * 2**16) - 2**15
    return x * keep.to(x.dtype).mul_(1 / (1 - p))


def swap_dropouts(model: nn.Module, kind: str) -> None:
    """Every dropout of model becomes an nn.Dropout for 'explicit', else a FastDropout, with the cheap mask for
    'fast' only."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Dropout):
                new = nn.Dropout(child.p) if kind == "explicit" else FastDropout(child.p, cheap_mask=kind == "fast")
                setattr(module, name, new.train(child.training))


class StaticKVCache(KVCache):
    """A KVCache's buffers, written at tensor positions and read whole (the caller masks): the same shapes at every
    position. An int position (GPT.prefill's prompt) goes in as in KVCache."""

    def __init__(self, cache: KVCache):
        self.k, self.v = cache.k, cache.v

    def update(self, pos: int | Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(pos, Tensor):
            return super().update(pos, k, v)
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


class StaticDecoder:
    """GPT.decode_one_token with the same shapes at every position, for GPT.generate(decoder=...): the position is
    a 1-element tensor and attention covers the whole cache, later slots masked. torch.compile then makes one graph
    for every position (CompiledDecoder)."""

    def __init__(self, model: GPT):
        self.model = model
        self.key, self.caches, self.positions = None, None, None

    def new_caches(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> list[KVCache]:
        """Empty StaticKVCaches, kept for the next generate of the same shape, as a CUDA graph reads and writes
        fixed addresses (safe: a slot is always written before a query reads it)."""
        # (inference-mode tensors, as generate makes, cannot be written outside inference mode)
        key = (batch_size, max_len, dtype, torch.is_inference_mode_enabled())
        if key != self.key:
            self.caches = [StaticKVCache(cache) for cache in self.model.new_caches(batch_size, max_len, dtype)]
            for cache in self.caches:
                torch._dynamo.mark_static_address(cache.k)
                torch._dynamo.mark_static_address(cache.v)
            self.key = key
            self.positions = torch.arange(max_len + 1, device=self.caches[0].k.device)
        return self.caches

    def decode_one_token(self, token: Tensor, pos: int, caches: list[KVCache]) -> Tensor:
        return self.step(token, self.positions[pos:pos + 1], caches)

    def step(self, token: Tensor, pos: Tensor, caches: list[KVCache]) -> Tensor:
        """GPT.decode_one_token at a 1-element tensor position, against the whole cache."""
        model = self.model
        mask = model.causal_mask[pos, :caches[0].k.shape[2]]           # (1, cache slots): keys up to pos
        return model.layers(token[..., None], model.rotations[pos], mask, pos, caches)[..., -1, :]


class CompiledDecoder(StaticDecoder):
    """StaticDecoder's step through torch.compile (gpt-fast's recipe). With mode="reduce-overhead" on CUDA the
    graph is also recorded as a CUDA graph: one launch per token instead of one per kernel. On a CPU (mode None)
    inductor's C++ wrapper calls the step's kernels from C++ instead of Python: a step is over a hundred kernels of
    a few microseconds each, so the Python between them would be a large share of it."""

    def __init__(self, model: GPT, mode: str | None = None):
        super().__init__(model)
        on_cpu = mode is None and model.embed.weight.device.type == "cpu"
        options = {"cpp_wrapper": True} if on_cpu else None
        self.compiled_step = torch.compile(self.step, mode=mode, options=options, fullgraph=True, dynamic=False)

    def decode_one_token(self, token: Tensor, pos: int, caches: list[KVCache]) -> Tensor:
        # .clone(): a CUDA graph's output lives in memory that its next replay overwrites
        return self.compiled_step(token, self.positions[pos:pos + 1], caches).clone()


# Weights in fewer bytes, for decoding. At batch 1 a decoding step reads every weight matrix once to multiply it by
# one vector, so a step costs at least the weights' bytes over the memory's bandwidth (bench.py measures that floor
# on the machine it runs on): weights in half or a quarter of the bytes lower the floor by as much.

WEIGHT_FORMATS = ("float32", "bfloat16", "int8")


class Int8Linear(nn.Module):
    """nn.Linear with its weight in int8, one float scale per output channel (weight ~ int8 * scale), activations
    left in float: gpt-fast's weight-only int8. On a CPU torch's _weight_int8pack_mm multiplies by the int8 weight
    directly; its vectorized kernel takes bf16 activations (float32 ones take a scalar path, measured 10x slower),
    so the input is rounded to bf16 for the product only. Elsewhere (CUDA) the weight is converted to the
    activations' dtype in the product, as gpt-fast does, which torch.compile (sample.py --compile) fuses."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127          # the largest weight of a row maps to 127
        self.register_buffer("weight", torch.round(w / scales[:, None]).to(torch.int8))
        self.register_buffer("scales", scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        # The CPU kernel's copy of the scales, made once here and after a load_state_dict, not at every token
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16), persistent=False)
        self.register_load_state_dict_post_hook(Int8Linear.scales_loaded)

    @staticmethod
    def scales_loaded(module: Int8Linear, incompatible_keys) -> None:
        module.scales_bf16.copy_(module.scales)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu":
            rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            y = torch._weight_int8pack_mm(rows, self.weight, self.scales_bf16).to(x.dtype)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def quantize_weights(model: GPT, kind: str) -> GPT:
    """A copy of model for sampling whose weights take fewer bytes: 'int8' (every Linear an Int8Linear; the
    embedding stays float, as a step reads one row of it, not the whole table), 'bfloat16' (every weight in bf16,
    the activations and the cache with them; worth it only where bf16 is native: cli.native_bf16) or 'float32'
    (a plain copy). Its state_dict loads into quantize_weights(GPT(cfg), kind)."""
    if kind not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {kind!r}")
    model = copy.deepcopy(model).eval()
    if kind == "int8":
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, Int8Linear(child))
    elif kind == "bfloat16":
        for p in model.parameters():   # parameters only: the rotary table is complex and must stay so
            p.data = p.data.to(torch.bfloat16)
    return model


# ----------------------------------------------------------------------------------------------------
# The reference recipe's checkpoint: an x-transformers state dict, key by key (skip on a first read)

def gpt_from_x_transformers(state_dict: dict[str, Tensor], heads: int, dim_head: int = 64,
                            max_seq_len: int = 250) -> GPT:
    """Build a GPT from a state dict of x-transformers' TransformerWrapper(attn_layers=Decoder(
    rotary_pos_emb=True)) (or of an AutoregressiveWrapper around one) and copy every weight.

    heads and dim_head cannot be told apart from the weights (to_q is (heads * dim_head, dim)), so they are
    given. Raises ValueError naming what does not map when the state dict has anything else.
    """
    sd = {k.removeprefix("net."): v for k, v in state_dict.items()}
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in sd:
            raise ValueError(f"x-transformers state dict has no {key!r}: not a rotary Decoder we can map")
        used.add(key)
        return sd[key]

    vocab_size, dim = take("token_emb.emb.weight").shape
    depth = 0
    while f"attn_layers.layers.{2 * depth}.1.to_q.weight" in sd:
        depth += 1
    if depth == 0:
        raise ValueError("x-transformers state dict has no attention layers (attn_layers.layers.0.1.to_q.weight)")
    inner = sd["attn_layers.layers.0.1.to_q.weight"].shape[0]
    if inner != heads * dim_head:
        raise ValueError(f"to_q has {inner} outputs but heads * dim_head = {heads} * {dim_head}")
    if "attn_layers.rotary_pos_emb.inv_freq" not in sd:
        raise ValueError("x-transformers state dict has no rotary_pos_emb: only rotary decoders map to GPT")
    inv_freq = take("attn_layers.rotary_pos_emb.inv_freq")
    rotary_dim = 2 * inv_freq.numel()
    expected = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    if not torch.allclose(inv_freq.float().cpu(), expected):
        raise ValueError("rotary inv_freq is not base 10000 (xpos / rescaled rotary are not supported)")

    cfg = GPTConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, dim=dim, depth=depth, heads=heads,
                    dim_head=dim_head, rotary_dim=rotary_dim, dropout=0.0)
    model = GPT(cfg)
    new = {"embed.weight": take("token_emb.emb.weight"),
           "norm.weight": take("attn_layers.final_norm.gamma") + 1,  # x-transformers stores gain - 1
           "head.weight": take("to_logits.weight")}
    for i in range(depth):
        a, f, b = f"attn_layers.layers.{2 * i}", f"attn_layers.layers.{2 * i + 1}", f"blocks.{i}"
        new[f"{b}.norm1.weight"] = take(f"{a}.0.0.gamma") + 1
        new[f"{b}.attn.qkv.weight"] = torch.cat([take(f"{a}.1.to_{n}.weight") for n in "qkv"])
        # With one head and dim == dim_head, x-transformers has no to_out (Identity).
        new[f"{b}.attn.out.weight"] = (take(f"{a}.1.to_out.weight") if f"{a}.1.to_out.weight" in sd
                                       else torch.eye(dim))
        new[f"{b}.norm2.weight"] = take(f"{f}.0.0.gamma") + 1
        for ours, theirs in (("up", "ff.0.0"), ("down", "ff.2")):
            new[f"{b}.mlp.{ours}.weight"] = take(f"{f}.1.{theirs}.weight")
            new[f"{b}.mlp.{ours}.bias"] = take(f"{f}.1.{theirs}.bias")
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"x-transformers state dict has weights GPT cannot map: {', '.join(unused[:8])}"
                         + (" ..." if len(unused) > 8 else ""))
    try:
        model.load_state_dict(new, strict=True)
    except RuntimeError as e:  # shape mismatch, e.g. an MLP that is not 4x wide
        raise ValueError(f"x-transformers weights do not fit GPT({cfg}): {e}") from None
    return model
