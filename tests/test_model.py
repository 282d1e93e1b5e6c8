"""Tests for model.py: x-transformers weight loading, KV-cache decoding, attention paths and sampling."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import (ATTENTIONS, GPT, CompiledDecoder, FastDropout, GPTConfig, StaticDecoder,  # noqa: E402
                   cheap_dropout, sample_next)

x_transformers = pytest.importorskip("x_transformers")
from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper  # noqa: E402

ATTENTION = ["explicit", "fast", "fused"]


# ----------------------------------------------------------------------------------------------------
# helpers

def small_gpt(attention="explicit", dropout=0.0, **kw) -> GPT:
    cfg = dict(vocab_size=100, max_seq_len=40, dim=64, depth=2, heads=2, dim_head=32, dropout=dropout)
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg))
    model.set_attention(attention)
    return model.eval()


# name: (TransformerWrapper kwargs, Decoder kwargs, batch)
XT_CONFIGS = {
    "reference": (dict(num_tokens=1024, max_seq_len=250, emb_dropout=0.1),
                  dict(dim=256, depth=6, heads=4, attn_dropout=0.1, ff_dropout=0.1), 2),
    "d128_h2_dh32": (dict(num_tokens=300, max_seq_len=100), dict(dim=128, depth=2, heads=2, attn_dim_head=32), 2),
    "one_head_identity_out": (dict(num_tokens=50, max_seq_len=64), dict(dim=64, depth=3, heads=1, attn_dim_head=64), 2),
    "rotary16_h8_dh16": (dict(num_tokens=77, max_seq_len=48),
                         dict(dim=96, depth=2, heads=8, attn_dim_head=16, rotary_emb_dim=16), 2),
}


def build_xt(name):
    wrap_kw, dec_kw, batch = XT_CONFIGS[name]
    dec_kw = dict(dec_kw)
    dec_kw.setdefault("attn_dim_head", 64)
    net = TransformerWrapper(num_tokens=wrap_kw["num_tokens"], max_seq_len=wrap_kw["max_seq_len"],
                             emb_dropout=wrap_kw.get("emb_dropout", 0.0),
                             attn_layers=Decoder(rotary_pos_emb=True, **dec_kw))
    with torch.no_grad():
        n_gamma = 0
        for pname, p in net.named_parameters():
            if pname.endswith("gamma") or pname.endswith("bias"):
                p.normal_()
                n_gamma += pname.endswith("gamma")
    assert n_gamma == 2 * dec_kw["depth"] + 1  # every norm gain was randomised
    return net.eval(), dec_kw["heads"], dec_kw["attn_dim_head"], wrap_kw["max_seq_len"], batch


# ----------------------------------------------------------------------------------------------------
# 1. logits equal x-transformers

@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("name", list(XT_CONFIGS))
def test_logits_match_x_transformers(name, attention):
    """After from_x_transformers, our logits equal x-transformers' (eval, float32, full max_seq_len) to 1e-4,
    with random norm gains (gamma + 1 offset) and biases, for several head/rotary layouts and both attention paths."""
    torch.manual_seed(0)
    net, heads, dim_head, max_len, batch = build_xt(name)
    model = GPT.from_x_transformers(net.state_dict(), heads=heads, dim_head=dim_head, max_seq_len=max_len).eval()
    model.set_attention(attention)
    idx = torch.randint(0, net.num_tokens, (batch, max_len))
    with torch.no_grad():
        want = net(idx)
        got = model(idx)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_reference_config_parameter_count():
    """Our GPT built for the reference config has exactly x-transformers' 5,253,888 parameters."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1024, max_seq_len=250, dim=256, depth=6, heads=4, dim_head=64))
    assert model.num_params() == 5_253_888


def test_rotary_dim_from_x_transformers():
    """The rotary width is read from inv_freq (explicit rotary_emb_dim=16, and the default dim_head // 2)."""
    torch.manual_seed(0)
    net, heads, dim_head, max_len, _ = build_xt("rotary16_h8_dh16")
    assert GPT.from_x_transformers(net.state_dict(), heads, dim_head, max_len).cfg.rotary_dim == 16
    net, heads, dim_head, max_len, _ = build_xt("d128_h2_dh32")
    assert GPT.from_x_transformers(net.state_dict(), heads, dim_head, max_len).cfg.rotary_dim == 16


def test_rotary_tables_match_x_transformers_inv_freq():
    """Our rotation table holds e^(i * position * inv_freq) for x-transformers' inv_freq, one complex number per
    pair of dims (interleaved layout), for every position up to max_seq_len; the pairs that do not rotate hold 1."""
    torch.manual_seed(0)
    net, heads, dim_head, max_len, _ = build_xt("reference")
    inv_freq = net.state_dict()["attn_layers.rotary_pos_emb.inv_freq"]
    model = GPT.from_x_transformers(net.state_dict(), heads=heads, dim_head=dim_head, max_seq_len=max_len)
    angles = torch.outer(torch.arange(max_len).float(), inv_freq.float())
    pairs = inv_freq.numel()
    table = model.rotations
    assert table.shape == (max_len, dim_head // 2) and table.is_complex()
    torch.testing.assert_close(table[:, :pairs].real, angles.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(table[:, :pairs].imag, angles.sin(), atol=1e-6, rtol=0)
    assert (table[:, pairs:] == 1).all()


def test_autoregressive_wrapper_state_dict_loads():
    """The state dict of an AutoregressiveWrapper (keys prefixed 'net.') loads and gives the same logits."""
    torch.manual_seed(1)
    net, heads, dim_head, max_len, batch = build_xt("d128_h2_dh32")
    wrapper = AutoregressiveWrapper(net).eval()
    sd = wrapper.state_dict()
    assert all(k.startswith("net.") for k in sd)
    model = GPT.from_x_transformers(sd, heads=heads, dim_head=dim_head, max_seq_len=max_len).eval()
    idx = torch.randint(0, net.num_tokens, (batch, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), net(idx), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------
# 2. from_x_transformers refuses what it cannot map

def test_refuses_extra_key():
    """An unknown extra weight is refused with a ValueError naming that key."""
    torch.manual_seed(0)
    net, heads, dim_head, max_len, _ = build_xt("one_head_identity_out")
    sd = dict(net.state_dict())
    sd["attn_layers.some_unknown.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="some_unknown"):
        GPT.from_x_transformers(sd, heads=heads, dim_head=dim_head, max_seq_len=max_len)


def test_refuses_missing_key():
    """A state dict missing a needed weight (to_logits) is refused with a ValueError naming it."""
    torch.manual_seed(0)
    net, heads, dim_head, max_len, _ = build_xt("one_head_identity_out")
    sd = dict(net.state_dict())
    del sd["to_logits.weight"]
    with pytest.raises(ValueError, match="to_logits"):
        GPT.from_x_transformers(sd, heads=heads, dim_head=dim_head, max_seq_len=max_len)


def test_refuses_non_rotary_decoder():
    """A Decoder without rotary_pos_emb (absolute position embedding) is refused, mentioning rotary."""
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=50, max_seq_len=32,
                             attn_layers=Decoder(dim=64, depth=1, heads=2, attn_dim_head=32))
    with pytest.raises(ValueError, match="rotary"):
        GPT.from_x_transformers(net.state_dict(), heads=2, dim_head=32, max_seq_len=32)


def test_refuses_wrong_heads():
    """heads * dim_head that does not match to_q's rows is refused, mentioning to_q."""
    torch.manual_seed(0)
    net, heads, dim_head, max_len, _ = build_xt("d128_h2_dh32")   # to_q: 64 rows
    with pytest.raises(ValueError, match="to_q"):
        GPT.from_x_transformers(net.state_dict(), heads=4, dim_head=32, max_seq_len=max_len)
    with pytest.raises(ValueError, match="to_q"):
        GPT.from_x_transformers(net.state_dict(), heads=2, dim_head=64, max_seq_len=max_len)


def test_refuses_non_standard_rotary_base():
    """An inv_freq that is not base 10000 is refused rather than silently loaded."""
    torch.manual_seed(0)
    net, heads, dim_head, max_len, _ = build_xt("d128_h2_dh32")
    sd = dict(net.state_dict())
    sd["attn_layers.rotary_pos_emb.inv_freq"] = sd["attn_layers.rotary_pos_emb.inv_freq"] * 0.5
    with pytest.raises(ValueError, match="inv_freq"):
        GPT.from_x_transformers(sd, heads=heads, dim_head=dim_head, max_seq_len=max_len)


# ----------------------------------------------------------------------------------------------------
# 3. cached decoding equals uncached

def full_logits_and_caches(attention: str, seed: int):
    """A small model, random tokens filling max_seq_len, their uncached logits, and empty caches for them."""
    torch.manual_seed(seed)
    model = small_gpt(attention)
    B, L = 2, model.cfg.max_seq_len
    idx = torch.randint(0, model.cfg.vocab_size, (B, L))
    with torch.no_grad():
        full = model(idx)
    return model, idx, full, model.new_caches(B, L)


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("prompt_len", [7, 1])
@pytest.mark.parametrize("static", [False, True])
def test_cached_decoding_matches_uncached(attention, prompt_len, static):
    """prefill + decode_one_token at every following position gives the full uncached forward's logits: GPT's
    (the cache sliced to the filled prefix) and StaticDecoder's (the position as a tensor, the whole cache masked:
    the static shapes torch.compile and CUDA graphs need)."""
    model, idx, full, _ = full_logits_and_caches(attention, seed=2)
    L = idx.shape[1]
    decoder = StaticDecoder(model) if static else model
    caches = decoder.new_caches(len(idx), L)
    with torch.no_grad():
        last = model.prefill(idx[:, :prompt_len], caches)
        torch.testing.assert_close(last, full[:, prompt_len - 1], atol=1e-5, rtol=0)
        for pos in range(prompt_len, L):
            step = decoder.decode_one_token(idx[:, pos], pos, caches)
            torch.testing.assert_close(step, full[:, pos], atol=1e-5, rtol=0, msg=f"position {pos}")


@pytest.mark.parametrize("attention", ATTENTION)
def test_chunked_cached_forward_matches_uncached(attention):
    """Several queries at pos > 0 against the cache (mask aligned bottom-right, the x-transformers
    issue 187 case) equal the uncached forward."""
    model, idx, full, caches = full_logits_and_caches(attention, seed=3)
    L = idx.shape[1]
    with torch.no_grad():
        for start, end in [(0, 5), (5, 12), (12, 13), (13, 30), (30, L)]:
            got = model(idx[:, start:end], start, caches)
            torch.testing.assert_close(got, full[:, start:end], atol=1e-5, rtol=0, msg=f"chunk {start}:{end}")


@pytest.mark.slow
def test_compiled_decode_generates_like_eager():
    """CompiledDecoder (torch.compile of the static-shape decode; a CUDA graph with mode='reduce-overhead' on
    a GPU) samples exactly the tokens of eager decoding with the same seed, and its logits match within float
    tolerance."""
    torch.manual_seed(21)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = small_gpt("fused", max_seq_len=24, depth=1).to(device)
    compiled = CompiledDecoder(model, mode="reduce-overhead" if device == "cuda" else None)
    prompt = torch.randint(0, 100, (3, 2), device=device)
    for temperature in (0.0, 1.0):
        eager = model.generate(prompt, 20, temperature=temperature,
                               generator=torch.Generator(device).manual_seed(5))
        got = model.generate(prompt, 20, temperature=temperature, decoder=compiled,
                             generator=torch.Generator(device).manual_seed(5))
        assert torch.equal(eager, got)
    with torch.inference_mode():
        caches = compiled.new_caches(3, 21)
        model.prefill(prompt, caches)
        logits = compiled.decode_one_token(prompt[:, -1], 2, caches)
        caches = model.new_caches(3, 21)
        model.prefill(prompt, caches)
        torch.testing.assert_close(logits, model.decode_one_token(prompt[:, -1], 2, caches), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------
# 4. generate with and without the cache

@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("prompt_len", [1, 5])
def test_greedy_generate_cache_equals_no_cache(attention, prompt_len):
    """Greedy generation filling max_seq_len gives identical tokens with and without the KV cache,
    and returns the prompt unchanged at the start."""
    torch.manual_seed(4)
    model = small_gpt(attention)
    B = 3
    prompt = torch.randint(0, model.cfg.vocab_size, (B, prompt_len))
    n_new = model.cfg.max_seq_len - prompt_len + 1   # the model sees exactly max_seq_len positions
    with_cache = model.generate(prompt, n_new, temperature=0, use_kv_cache=True)
    without = model.generate(prompt, n_new, temperature=0, use_kv_cache=False)
    assert with_cache.shape == (B, prompt_len + n_new)
    assert with_cache.dtype == torch.long
    assert torch.equal(with_cache[:, :prompt_len], prompt)
    assert torch.equal(with_cache, without)
    # greedy: every generated token is the argmax of the uncached forward at the previous position
    with torch.no_grad():
        logits = model(with_cache[:, :-1])
    assert torch.equal(with_cache[:, prompt_len:], logits[:, prompt_len - 1:].argmax(-1))


@pytest.mark.parametrize("prompt_len", [1, 5])
def test_sampled_generate_cache_equals_no_cache(prompt_len):
    """Sampling at temperature 1 with the same seeded generator gives identical tokens with and without cache."""
    torch.manual_seed(5)
    model = small_gpt("fused")
    prompt = torch.randint(0, model.cfg.vocab_size, (3, prompt_len))
    n_new = model.cfg.max_seq_len - prompt_len + 1
    a = model.generate(prompt, n_new, temperature=1.0, use_kv_cache=True,
                       generator=torch.Generator().manual_seed(123))
    b = model.generate(prompt, n_new, temperature=1.0, use_kv_cache=False,
                       generator=torch.Generator().manual_seed(123))
    assert torch.equal(a[:, :prompt_len], prompt)
    assert torch.equal(a, b)
    c = model.generate(prompt, n_new, temperature=1.0, use_kv_cache=True,
                       generator=torch.Generator().manual_seed(456))
    assert not torch.equal(a, c)  # the generator actually drives the sampling


def test_generate_restores_training_mode():
    """generate runs in eval mode and puts a model that was training back into training mode."""
    torch.manual_seed(6)
    model = small_gpt(dropout=0.1).train()
    model.generate(torch.zeros(1, 1, dtype=torch.long), 5, temperature=0)
    assert model.training
    model.eval()
    model.generate(torch.zeros(1, 1, dtype=torch.long), 5, temperature=0)
    assert not model.training


# ----------------------------------------------------------------------------------------------------
# 5. explicit vs fused attention

@pytest.mark.parametrize("train", [False, True])
def test_explicit_fast_and_fused_attention_agree(train):
    """The textbook, fast and fused (SDPA) attention paths give the same logits, in eval and in train mode
    (dropout 0)."""
    torch.manual_seed(7)
    model = small_gpt("explicit", dropout=0.0, dim=96, heads=3, dim_head=32).train(train)
    idx = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.max_seq_len))
    with torch.no_grad():
        explicit = model(idx)
        for kind in ("fast", "fused"):
            model.set_attention(kind)
            assert all(b.attn.attend is ATTENTIONS[kind] for b in model.blocks)
            torch.testing.assert_close(model(idx), explicit, atol=1e-5, rtol=0, msg=kind)


def test_fast_attention_switches_every_dropout_to_the_cheap_mask():
    """set_attention("fast") gives every dropout of the model (embedding, attention weights, MLP) the cheap CPU mask,
    'fused' a FastDropout without it, 'explicit' nn.Dropout back; in eval mode a dropout is the identity either way."""
    torch.manual_seed(8)
    model = small_gpt("fast", dropout=0.3)
    dropouts = lambda: [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]  # noqa: E731
    assert len(dropouts()) == 1 + 2 * model.cfg.depth
    assert all(isinstance(d, FastDropout) and d.cheap_mask and d.p == 0.3 for d in dropouts())
    idx = torch.randint(0, model.cfg.vocab_size, (2, 10))
    with torch.no_grad():
        fast_eval = model(idx)
        model.set_attention("fused")
        assert all(isinstance(d, FastDropout) and not d.cheap_mask for d in dropouts())
        model.set_attention("explicit")
        assert all(type(d) is torch.nn.Dropout and d.p == 0.3 and not d.training for d in dropouts())
        torch.testing.assert_close(model(idx), fast_eval, atol=1e-5, rtol=0)
        torch.manual_seed(1)
        a = model.train()(idx)
        model.set_attention("fast")
        torch.manual_seed(1)
        b = model(idx)
    assert not torch.allclose(a, b)   # another random mask: the cheap one was really used


def test_set_attention_rejects_unknown():
    """set_attention refuses an unknown kind."""
    torch.manual_seed(0)
    with pytest.raises(ValueError):
        small_gpt().set_attention("flash")


# ----------------------------------------------------------------------------------------------------
# 6. generate's allowed mask

@pytest.mark.parametrize("use_kv_cache", [True, False])
@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=1.0, top_k=5),
                                      dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_k=15, top_p=0.8),
                                      dict(temperature=0)])
def test_generate_respects_allowed(sampling, use_kv_cache):
    """Every generated token lies in the allowed set of its position (even positions 0..9, odd 10..19)."""
    torch.manual_seed(8)
    model = small_gpt("fused")
    B, T0 = 4, 3
    n_new = model.cfg.max_seq_len - T0 + 1
    total = T0 + n_new
    allowed = torch.zeros(total, model.cfg.vocab_size, dtype=torch.bool)
    allowed[0::2, 0:10] = True
    allowed[1::2, 10:20] = True
    prompt = torch.randint(50, 100, (B, T0))   # the prompt itself is outside the allowed sets: kept anyway
    out = model.generate(prompt, n_new, use_kv_cache=use_kv_cache, allowed=allowed,
                         generator=torch.Generator().manual_seed(9), **sampling)
    assert torch.equal(out[:, :T0], prompt)
    new = out[:, T0:]
    pos = torch.arange(T0, total).expand(B, -1)
    assert allowed[pos, new].all(), "a generated token is outside its position's allowed set"


# ----------------------------------------------------------------------------------------------------
# 7. sample_next

def test_sample_next_greedy_variants_are_argmax():
    """temperature 0, top_k=1 and a tiny top_p all return the argmax."""
    torch.manual_seed(10)
    logits = torch.randn(64, 30) * 3
    want = logits.argmax(-1)
    assert torch.equal(sample_next(logits, temperature=0), want)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert torch.equal(sample_next(logits, top_k=1, generator=g), want)
        assert torch.equal(sample_next(logits, top_p=1e-6, generator=g), want)


def test_sample_next_top_k_stays_in_top_k():
    """Over many draws, top_k=k never returns a token outside the k largest logits, and does use all k."""
    torch.manual_seed(11)
    k = 5
    row = torch.randn(40)
    logits = row.expand(4000, -1)
    top = set(torch.topk(row, k).indices.tolist())
    draws = sample_next(logits, temperature=2.0, top_k=k, generator=torch.Generator().manual_seed(1))
    seen = set(draws.tolist())
    assert seen <= top
    assert seen == top


def test_sample_next_top_p_keeps_smallest_nucleus():
    """top_p keeps exactly the smallest set of most likely tokens whose probability reaches p."""
    torch.manual_seed(12)
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, -1)
    g = torch.Generator().manual_seed(2)
    assert set(sample_next(logits, top_p=0.75, generator=g).tolist()) == {1, 3}
    assert set(sample_next(logits, top_p=0.85, generator=g).tolist()) == {1, 2, 3}
    assert set(sample_next(logits, top_p=0.4, generator=g).tolist()) == {1}
    assert set(sample_next(logits, top_p=1.0, generator=g).tolist()) == {0, 1, 2, 3}


def test_sample_next_follows_distribution():
    """Sampling draws tokens with frequencies close to softmax(logits / temperature) (temperatures 1, 0.5, 3)."""
    torch.manual_seed(13)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().expand(20000, -1)
    for temperature in (1.0, 0.5, 3.0):
        draws = sample_next(logits, temperature, generator=torch.Generator().manual_seed(3))
        freq = torch.bincount(draws, minlength=4).float() / draws.numel()
        want = (probs.log() / temperature).softmax(-1)
        torch.testing.assert_close(freq, want, atol=0.02, rtol=0, msg=f"temperature {temperature}")


def test_sample_next_reproducible_with_generator():
    """The same seeded generator gives the same draws; a different seed gives different ones."""
    torch.manual_seed(14)
    logits = torch.randn(200, 50)
    a = sample_next(logits, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = sample_next(logits, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    c = sample_next(logits, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), temperature=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
       top_k=st.one_of(st.none(), st.integers(1, 40)), top_p=st.one_of(st.none(), st.floats(0.01, 1.0)))
def test_sample_next_respects_allowed(seed, temperature, top_k, top_p):
    """Whatever temperature / top_k / top_p, sampled tokens are allowed, even when the allowed tokens are the
    least likely ones."""
    torch.manual_seed(seed)
    vocab = 30
    logits = torch.randn(256, vocab) * 4
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[torch.randperm(vocab)[: int(torch.randint(1, vocab, ()))]] = True
    logits[:, allowed] -= 20   # the allowed tokens are the unlikely ones
    out = sample_next(logits, temperature, top_k, top_p, torch.Generator().manual_seed(seed), allowed)
    assert out.shape == (256,)
    assert allowed[out].all()
    if temperature == 0 or top_k == 1:
        assert torch.equal(out, logits.masked_fill(~allowed, float("-inf")).argmax(-1))


# ----------------------------------------------------------------------------------------------------
# 8. length limits

def test_generate_rejects_too_many_positions():
    """generate raises ValueError when the prompt plus new tokens need more than max_seq_len positions."""
    torch.manual_seed(15)
    model = small_gpt()
    L = model.cfg.max_seq_len
    for T0 in (1, 5):
        prompt = torch.zeros(2, T0, dtype=torch.long)
        for cache in (True, False):
            # generate's own up-front check (its message names the new tokens), not a failure deep in forward
            with pytest.raises(ValueError, match="new tokens"):
                model.generate(prompt, L - T0 + 2, temperature=0, use_kv_cache=cache)
    with pytest.raises(ValueError, match="new tokens"):
        model.generate(torch.zeros(1, L + 1, dtype=torch.long), 1, temperature=0)


def test_forward_rejects_too_long():
    """forward raises ValueError for more than max_seq_len positions, also counting pos."""
    torch.manual_seed(16)
    model = small_gpt()
    L = model.cfg.max_seq_len
    with torch.no_grad():
        model(torch.zeros(1, L, dtype=torch.long))   # exactly max_seq_len is fine
        with pytest.raises(ValueError, match="max_seq_len"):
            model(torch.zeros(1, L + 1, dtype=torch.long))
        caches = model.new_caches(1, L + 5)
        with pytest.raises(ValueError, match="max_seq_len"):
            model(torch.zeros(1, 3, dtype=torch.long), L - 2, caches)


# ----------------------------------------------------------------------------------------------------
# 9. shapes and dtypes

@pytest.mark.parametrize("attention", ATTENTION)
def test_forward_shape_and_dtype(attention):
    """The model maps LongTensor (B, T) token ids to float32 logits (B, T, vocab)."""
    torch.manual_seed(17)
    model = small_gpt(attention)
    idx = torch.randint(0, model.cfg.vocab_size, (3, 11), dtype=torch.long)
    with torch.no_grad():
        out = model(idx)
    assert out.shape == (3, 11, model.cfg.vocab_size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_gptconfig_rejects_bad_rotary_dim():
    """GPTConfig refuses an odd or too large rotary_dim and defaults it to dim_head // 2."""
    assert GPTConfig(dim_head=32).rotary_dim == 16
    with pytest.raises(ValueError):
        GPTConfig(dim_head=32, rotary_dim=7)
    with pytest.raises(ValueError):
        GPTConfig(dim_head=32, rotary_dim=34)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cheap_dropout_matches_f_dropout_statistics(p):
    """The cheap CPU dropout (16 random bits per element) keeps each element with probability 1 - p, independently,
    scales kept ones by 1 / (1 - p) like F.dropout, and passes gradients through the same mask."""
    torch.manual_seed(22)
    x = torch.rand(1_000_000) + 0.5          # no zeros, so zeros in the output are dropped elements
    x.requires_grad_(True)
    y = cheap_dropout(x, p)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.003
    torch.testing.assert_close(y[kept], x[kept].detach() / (1 - p))
    pairs = kept.view(-1, 2).float()          # neighbours share a 64-bit draw: still independent
    assert abs((pairs[:, 0] * pairs[:, 1]).mean().item() - (1 - p) ** 2) < 0.003
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / (1 - p))
    for q, want in ((0.0, x), (1.0, torch.zeros_like(x))):   # the edges go to nn.Dropout
        d = FastDropout(q, cheap_mask=True).train()
        assert torch.equal(d(x), want)
