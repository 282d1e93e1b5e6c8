"""The codebook-interleaving tokenizer: exact inverse, level ranges, and the reference's layout."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizer import CODEBOOK_SIZE, CodecTokenizer


@st.composite
def codes_strategy(draw):
    levels = draw(st.sampled_from([1, 2, 4, 8]))
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
