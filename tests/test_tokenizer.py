"""The codebook-interleaving tokenizer: exact inverse for every pattern, level ranges, the delay's holes, what may
be sampled where, and the reference's layout."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data import CODEBOOK_SIZE
from tokenizer import PATTERNS, CodecTokenizer


@st.composite
def codes_strategy(draw, levels=(1, 2, 4, 8)):
    levels = draw(st.sampled_from(levels))
    batch = draw(st.integers(1, 3))
    frames = draw(st.integers(0, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CODEBOOK_SIZE, (batch, levels, frames), generator=g)


@settings(max_examples=200, deadline=None)
@given(codes=codes_strategy(), layout=st.sampled_from(["levels", "shared"]))
def test_decode_inverts_encode(codes, layout):
    """decode(encode(codes)) == codes for 1, 2, 4, 8 levels, any length, both layouts."""
    tok = CodecTokenizer(codes.shape[1], layout=layout)
    tokens = tok.encode(codes)
    assert tokens.shape == (codes.shape[0], 1 + codes.shape[1] * codes.shape[2])
    assert (tokens[:, 0] == tok.bos).all()
    assert torch.equal(tok.decode(tokens), codes)


@settings(max_examples=100, deadline=None)
@given(codes=codes_strategy())
def test_each_position_holds_its_levels_ids(codes):
    """Token at position p >= 1 is a code of level (p - 1) % levels, in that level's own id range; BOS is no code."""
    levels = codes.shape[1]
    tok = CodecTokenizer(levels)
    tokens = tok.encode(codes)
    assert tok.vocab_size == levels * CODEBOOK_SIZE + 1 and tok.bos == levels * CODEBOOK_SIZE
    for p in range(1, tokens.shape[1]):
        level = (p - 1) % levels
        assert ((tokens[:, p] >= level * CODEBOOK_SIZE) & (tokens[:, p] < (level + 1) * CODEBOOK_SIZE)).all()
        frame = (p - 1) // levels
        assert torch.equal(tokens[:, p] - level * CODEBOOK_SIZE, codes[:, level, frame])  # frame-major order
    assert not (tokens[:, 1:] == tok.bos).any()


@settings(max_examples=50, deadline=None)
@given(codes=codes_strategy())
def test_allowed_mask_matches_levels(codes):
    """allowed() permits exactly the ids of each position's level, and the encoded tokens are always allowed."""
    tok = CodecTokenizer(codes.shape[1])
    tokens = tok.encode(codes)
    allowed = tok.allowed(tokens.shape[1])
    assert allowed.shape == (tokens.shape[1], tok.vocab_size)
    assert not allowed[0].any()
    assert (allowed[1:].sum(1) == CODEBOOK_SIZE).all()
    assert not allowed[:, tok.bos].any()
    assert allowed.gather(1, tokens.T)[1:].all()


def test_shared_layout_is_the_reference_linearisation():
    """Shared layout = the tutorial: codes.permute(0, 2, 1).reshape(-1) after start token 0, and back with
    tokens.view(1, -1, 2).transpose(1, 2)."""
    codes = torch.randint(0, CODEBOOK_SIZE, (1, 2, 125))
    tok = CodecTokenizer(2, layout="shared")
    tokens = tok.encode(codes)
    assert tok.bos == 0 and tok.vocab_size == 1024
    assert torch.equal(tokens[0, 1:], codes[0].permute(1, 0).reshape(-1))
    assert torch.equal(tok.decode(tokens), tokens[:, 1:].view(1, -1, 2).transpose(1, 2))


def test_decode_rejects_tokens_of_the_wrong_level():
    """A level-1 id at a level-0 position, or BOS in the body, is not silently turned into a code."""
    tok = CodecTokenizer(2)
    tokens = tok.encode(torch.zeros(1, 2, 3, dtype=torch.long))
    bad = tokens.clone()
    bad[0, 1] = CODEBOOK_SIZE + 5  # position 1 holds level 0
    with pytest.raises(ValueError):
        tok.decode(bad)
    bad = tokens.clone()
    bad[0, 2] = tok.bos
    with pytest.raises(ValueError):
        tok.decode(bad)


def test_unfinished_frame_is_dropped():
    """A stream that stops in the middle of a frame decodes to its whole frames."""
    tok = CodecTokenizer(4)
    codes = torch.randint(0, CODEBOOK_SIZE, (2, 4, 5))
    tokens = tok.encode(codes)[:, :-2]
    assert torch.equal(tok.decode(tokens), codes[:, :, :4])


# ----------------------------------------------------------------------------------------------------
# patterns: flatten, delay, parallel

@settings(max_examples=300, deadline=None)
@given(codes=codes_strategy(levels=(1, 2, 4, 8, 16, 32)), pattern=st.sampled_from(PATTERNS),
       conditions=st.booleans())
def test_every_pattern_is_an_exact_inverse(codes, pattern, conditions):
    """decode(encode(codes)) == codes for every pattern and 1 to 32 levels, with and without conditions; the stream
    has the pattern's number of steps, and the same prefix in every stream."""
    B, K, T = codes.shape
    tok = CodecTokenizer(levels=K, pattern=pattern, conditions=conditions)
    tokens = tok.encode(codes, pitch=60 if conditions else None)
    steps = {"flatten": K * T, "delay": T + K - 1, "parallel": T}[pattern]
    if pattern == "flatten":
        assert tokens.shape == (B, tok.prefix + steps) and tok.streams == 1
    else:
        assert tokens.shape == (B, K, tok.prefix + steps) and tok.streams == K
        assert (tokens[:, :, :tok.prefix] == tokens[:, :1, :tok.prefix]).all()
    assert tok.steps(T) == steps and tok.frames(steps) == T
    assert torch.equal(tok.decode(tokens), codes)
    assert (tokens < tok.vocab_size).all() and (tokens[..., 0] == tok.bos).all()


@settings(max_examples=100, deadline=None)
@given(codes=codes_strategy(levels=(1, 2, 3, 8)))
def test_delay_shifts_level_k_by_k_steps_and_fills_the_holes_with_empty(codes):
    """Stream k holds EMPTY for its first k steps, then its codes in order, then EMPTY to the end; EMPTY is no code
    and no other special token."""
    B, K, T = codes.shape
    tok = CodecTokenizer(levels=K, pattern="delay")
    body = tok.encode(codes)[..., tok.prefix:]
    assert tok.empty == CODEBOOK_SIZE and tok.empty not in (tok.bos, *tok.unknown.tolist())
    for k in range(K):
        assert (body[:, k, :k] == tok.empty).all()
        assert torch.equal(body[:, k, k:k + T], codes[:, k])
        assert (body[:, k, k + T:] == tok.empty).all()


def test_parallel_holds_frame_t_of_every_level_at_step_t():
    codes = torch.randint(0, CODEBOOK_SIZE, (2, 4, 9))
    tok = CodecTokenizer(levels=4, pattern="parallel")
    assert torch.equal(tok.encode(codes)[..., tok.prefix:], codes)


@settings(max_examples=60, deadline=None)
@given(codes=codes_strategy(levels=(1, 2, 4, 8)), pattern=st.sampled_from(PATTERNS))
def test_allowed_is_each_steps_level_and_only_empty_in_the_holes(codes, pattern):
    """allowed() permits every encoded token; at a code step exactly the 1024 codes of its level (never EMPTY); at a
    hole of the delay pattern only EMPTY; in the prefix nothing. With given codes, their steps allow only them."""
    B, K, T = codes.shape
    tok = CodecTokenizer(levels=K, pattern=pattern, conditions=True)
    tokens = tok.encode(codes)
    allowed = tok.allowed(tokens.shape[-1])
    rows = allowed if pattern == "flatten" else allowed.transpose(0, 1)        # ([levels,] steps, vocab)
    picked = rows.gather(-1, tokens.transpose(0, -1) if pattern == "flatten" else tokens[0][..., None])
    assert picked[..., tok.prefix:, :].all() if pattern != "flatten" else picked[tok.prefix:].all()
    assert not allowed[:tok.prefix].any()
    per_step = allowed[tok.prefix:].sum(-1)
    if pattern == "delay":
        holes = (tokens[0, :, tok.prefix:] == tok.empty).T                      # (steps, levels)
        assert (per_step[holes] == 1).all() and allowed[tok.prefix:][holes][:, tok.empty].all()
        assert (per_step[~holes] == CODEBOOK_SIZE).all() and not allowed[tok.prefix:][~holes][:, tok.empty].any()
    else:
        assert (per_step == CODEBOOK_SIZE).all()
    if T >= 2:
        given_rows = tok.allowed(tokens.shape[-1], given=codes[0, :, :2])[tok.prefix:]
        known = tok.interleave(codes[:1, :, :2] + tok._offsets(None), fill=-1)[0]
        known = known if pattern == "flatten" else known.T
        sure = given_rows[:len(known)][known >= 0]
        assert (sure.sum(-1) == 1).all() and sure[torch.arange(len(sure)), known[known >= 0]].all()


def test_prompt_holds_the_whole_steps_of_a_recording():
    """prompt(): BOS, the conditions, then every step made only of the recording's codes; with the delay pattern
    the later steps that still hold some of them are left to allowed(given=...)."""
    codes = torch.randint(0, CODEBOOK_SIZE, (1, 4, 6))
    for pattern, steps in (("flatten", 24), ("delay", 6), ("parallel", 6)):
        tok = CodecTokenizer(levels=4, pattern=pattern, conditions=True)
        prompt = tok.prompt(3, pitch=60, codes=codes)
        full = tok.encode(codes.expand(3, -1, -1), pitch=60)
        assert prompt.shape[-1] == tok.prefix + steps
        assert torch.equal(prompt, full[..., :tok.prefix + steps])


@pytest.mark.parametrize("bad", [dict(pattern="spiral"), dict(layout="shared", pattern="delay"),
                                 dict(layout="shared", conditions=True), dict(layout="diagonal")])
def test_unknown_patterns_and_layouts_are_refused(bad):
    with pytest.raises(ValueError):
        CodecTokenizer(levels=2, **bad)


def test_old_tokenizer_state_is_the_flattening_pattern():
    """A checkpoint's tokenizer entry from before patterns existed has no "pattern": it is flatten."""
    old = {"levels": 2, "codebook_size": 1024, "layout": "levels", "conditions": True}
    tok = CodecTokenizer(**old)
    assert tok.pattern == "flatten" and tok.vocab_size == 2311 and tok.state() == {**old, "pattern": "flatten"}
