"""
From codec codes to the token stream the model reads, and back: the codebook interleaving pattern.

EnCodec describes each 1/75 s frame of audio with one code per codebook ("level"): level 0 a coarse guess, each
further level a correction of what the levels before it left over. A note is therefore a grid of codes
(levels x frames), but a language model reads one sequence, one step at a time: the grid has to be laid out in
some order, the interleaving pattern. MusicGen (Copet et al. 2023, section 2.2) compares several, for K levels and
T frames:
- flatten (here, the reference recipe's): frame by frame, level by level, one code per step: K x T steps.
  Every code sees all levels of the earlier frames and the lower levels of its own frame: the exact
  autoregressive factorisation, at K times the steps (and K^2 times the attention cost) of the other patterns.
- delay: all K levels predicted in one step, level k shifted k frames later, so that a code still sees the lower
  levels of its own frame: T + K - 1 steps.
- parallel: all K levels of a frame predicted in one step, none of them seeing the others of its frame: T steps.

A token stream here is BOS, then (with conditions) the note's pitch, velocity and instrument source, then the codes:

    codes, 2 levels x 3 frames              tokens (conditions=True)
      level 0:  a0  a1  a2          ->   BOS  pitch  velocity  source  a0  b0  a1  b1  a2  b2
      level 1:  b0  b1  b2                    |----- condition -----|-frame 0-|-frame 1-|-frame 2-|

Ids: every level has its own ids (token = level * 1024 + code), so that sampling can be restricted to the level a
position holds (allowed()); BOS = levels * 1024 is no code at all; the condition ids follow it.
"""
from __future__ import annotations

import torch
from torch import Tensor

CODEBOOK_SIZE = 1024                                  # codes per EnCodec codebook
CONDITIONS = ("pitch", "velocity", "source")          # the condition tokens, in stream order after BOS
NSYNTH_SOURCES = ("acoustic", "electronic", "synthetic")
MIDI_VALUES = 128                                     # pitch and velocity are MIDI numbers 0..127


class CodecTokenizer:
    """Codes (B, levels, frames) <-> token streams (B, prefix + levels * frames), in the flattening pattern.

    conditions=True puts a token for the note's MIDI pitch, MIDI velocity and instrument source (NSYNTH_SOURCES)
    after BOS; each has its own ids and its own "unknown" id, used for unlabelled notes, for condition dropout in
    training and for the unconditional pass of classifier-free guidance.
    layout "levels" (ours) gives every level its own ids. layout "shared" (the reference recipe's) uses
    token = code for every level and BOS = 0, which is also code 0; vocab_size = 1024. It is kept so that the
    reference notebook's checkpoints can be sampled.
    """

    def __init__(self, levels: int, codebook_size: int = CODEBOOK_SIZE, layout: str = "levels",
                 conditions: bool = False):
        if layout not in ("levels", "shared"):
            raise ValueError(f"layout must be 'levels' or 'shared', got {layout!r}")
        if conditions and layout != "levels":
            raise ValueError("condition tokens need the 'levels' layout")
        self.levels, self.codebook_size, self.layout, self.conditions = levels, codebook_size, layout, conditions
        self.bos = levels * codebook_size if layout == "levels" else 0
        # condition ids follow BOS, each range ending with its "unknown" id: pitch 0..127, velocity 0..127, source
        self.condition_sizes = (MIDI_VALUES, MIDI_VALUES, len(NSYNTH_SOURCES))
        firsts, first = [], self.bos + 1
        for size in self.condition_sizes:
            firsts.append(first)
            first += size + 1
        self.condition_firsts = tuple(firsts)
        self.unknown = torch.tensor([f + size for f, size in zip(firsts, self.condition_sizes)])
        self.prefix = 1 + (len(CONDITIONS) if conditions else 0)   # BOS and the condition tokens
        if layout == "shared":
            self.vocab_size = codebook_size
        else:  # codes, BOS, then the condition ids up to the last "unknown"
            self.vocab_size = int(self.unknown[-1]) + 1 if conditions else self.bos + 1

    def state(self) -> dict:
        """What rebuilds this tokenizer: CodecTokenizer(**state()). Saved in checkpoints."""
        return {"levels": self.levels, "codebook_size": self.codebook_size, "layout": self.layout,
                "conditions": self.conditions}

    # ------------------------------------------------------------------------------------------------
    # The pattern: codes <-> the body of the stream

    def interleave(self, codes: Tensor) -> Tensor:
        """(B, levels, frames) -> (B, levels * frames), frame-major: a0 b0 a1 b1 ..."""
        return codes.transpose(1, 2).reshape(codes.shape[0], -1)

    def deinterleave(self, body: Tensor) -> Tensor:
        """(B, n) in stream order -> (B, levels, n // levels): the inverse of interleave, for token ids or for
        anything computed per position (the loss of each code). An unfinished last frame is dropped."""
        frames = body.shape[1] // self.levels
        return body[:, :frames * self.levels].reshape(len(body), frames, self.levels).transpose(1, 2)

    def per_code(self, per_target: Tensor) -> Tensor:
        """Values computed for every next-token target of a stream (B, T - 1), the one at t for token t + 1 (a
        loss, a hit) -> the values of its codes (B, levels, frames); BOS and the conditions are never targets."""
        return self.deinterleave(per_target[:, self.prefix - 1:])

    def _offsets(self, device) -> Tensor:
        """What is added to each level's codes: (levels, 1)."""
        step = self.codebook_size if self.layout == "levels" else 0
        return (torch.arange(self.levels, device=device) * step)[:, None]

    def encode(self, codes: Tensor, pitch=None, velocity=None, source=None) -> Tensor:
        """codes (B, levels, frames) -> tokens (B, prefix + levels * frames): BOS, the condition tokens when the
        tokenizer has them (unknown where a label is None or -1), then the codes."""
        B, L, _ = codes.shape
        if L != self.levels:
            raise ValueError(f"expected codes of {self.levels} levels, got {L}")
        body = self.interleave(codes.long() + self._offsets(codes.device))
        return torch.cat([self.start(B, pitch, velocity, source, codes.device), body], dim=1)

    def decode(self, tokens: Tensor) -> Tensor:
        """tokens (B, prefix + n) -> codes (B, levels, n // levels); an unfinished last frame is dropped.
        Raises ValueError when a token is not a code of its position's level."""
        codes = self.deinterleave(tokens[:, self.prefix:]) - self._offsets(tokens.device)
        if ((codes < 0) | (codes >= self.codebook_size)).any():
            raise ValueError("tokens are not codes of their positions' levels")
        return codes

    def allowed(self, seq_len: int, device=None) -> Tensor:
        """(seq_len, vocab_size) bool: at position p >= prefix only the codes of the level p holds (the prefix's
        rows allow nothing). With the shared layout every code is allowed everywhere, as in the reference."""
        mask = torch.zeros(seq_len, self.vocab_size, dtype=torch.bool, device=device)
        if self.layout == "shared":
            mask[self.prefix:] = True
            return mask
        for level in range(self.levels):
            mask[self.prefix + level::self.levels, level * self.codebook_size:(level + 1) * self.codebook_size] = True
        return mask

    # ------------------------------------------------------------------------------------------------
    # BOS and the condition tokens

    def start(self, batch: int, pitch=None, velocity=None, source=None, device=None) -> Tensor:
        """The prompt that every sequence starts with: (B, prefix) = BOS [+ condition tokens]."""
        bos = torch.full((batch, 1), self.bos, dtype=torch.long, device=device)
        if not self.conditions:
            return bos
        return torch.cat([bos, self.condition_tokens(pitch, velocity, source, batch, device)], dim=1)

    def condition_tokens(self, pitch, velocity, source, batch: int = 1, device=None) -> Tensor:
        """(B, 3) condition tokens. Each of pitch, velocity (MIDI 0..127), source (index into NSYNTH_SOURCES) is an
        int, a (B,) tensor, or None / -1 for unknown. Raises ValueError for a value out of range."""
        columns = []
        for name, value, first, size in zip(CONDITIONS, (pitch, velocity, source), self.condition_firsts,
                                            self.condition_sizes):
            value = torch.full((batch,), -1) if value is None else torch.as_tensor(value).long().expand(batch)
            if ((value < -1) | (value >= size)).any():
                raise ValueError(f"{name} must be in 0..{size - 1} (or unknown), got {value.tolist()}")
            columns.append(torch.where(value < 0, first + size, first + value))
        return torch.stack(columns, dim=1).to(device)

    def drop_conditions(self, tokens: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
        """A copy of tokens in which each condition token is independently replaced by its "unknown" id with
        probability p (condition dropout: one model learns conditional and unconditional generation)."""
        if not self.conditions or p == 0:
            return tokens
        drop = torch.rand(tokens.shape[0], len(CONDITIONS), generator=generator) < p
        tokens = tokens.clone()
        given = tokens[:, 1:self.prefix]
        tokens[:, 1:self.prefix] = torch.where(drop.to(tokens.device), self.unknown.to(tokens.device), given)
        return tokens

    def unconditional(self, tokens: Tensor) -> Tensor:
        """tokens with every condition replaced by "unknown": the input of classifier-free guidance's second pass."""
        if not self.conditions:
            return tokens
        tokens = tokens.clone()
        tokens[:, 1:self.prefix] = self.unknown.to(tokens.device)
        return tokens
