"""
From codec codes to the token streams the model reads, and back: codebook interleaving patterns.

EnCodec describes each 1/75 s frame of audio with one code per codebook ("level"): level 0 a coarse guess, each
further level a correction of what the levels before it left over. A note is therefore a grid of codes (K levels x
T frames), but a language model produces one step after another, so the grid has to be laid out in steps: the
interleaving pattern. MusicGen (Copet et al. 2023, section 2.2) compares several; here are three:

| pattern  | decode steps per note | when the code of level k, frame t is predicted, the model has seen       |
|----------|-----------------------|--------------------------------------------------------------------------|
| flatten  | K x T                 | every level of frames < t, and levels < k of frame t (exact)             |
| delay    | T + K - 1             | each level k' up to frame t + k - k' - 1 (the lower levels: frame t too) |
| parallel | T                     | every level of frames < t, nothing of frame t                            |

flatten (the reference recipe's, and the default) is the exact autoregressive factorisation, at K times the steps
and K^2 times the attention cost. delay and parallel predict all K levels in one step (the model reads K streams),
so a note costs about T steps whatever the bandwidth; delay shifts level k by k steps so that a code still sees
the lower levels of its own frame. Where the delay leaves a hole (before a level's first code, after its last) the
stream holds that level's EMPTY token: never a code, never in the loss (per_code), the only token allowed there.

Every stream starts with BOS and, with conditions, the note's pitch, velocity and instrument source.
"""
from __future__ import annotations

import torch
from torch import Tensor

PATTERNS = ("flatten", "delay", "parallel")
CONDITIONS = ("pitch", "velocity", "source")          # the condition tokens, in stream order after BOS
NSYNTH_SOURCES = ("acoustic", "electronic", "synthetic")     # NSynth's instrument sources: one id each
MIDI_VALUES = 128                                     # pitch and velocity are MIDI numbers 0..127


class CodecTokenizer:
    """Codes (B, levels, frames) <-> token streams, and the rules for sampling them.

    pattern "flatten": one stream (B, prefix + levels * frames), frame by frame:

        codes, 2 levels x 3 frames          tokens (conditions=True)
          level 0:  a0  a1  a2      ->   BOS  pitch  velocity  source  a0  b0  a1  b1  a2  b2
          level 1:  b0  b1  b2                |----- condition -----|-frame 0-|-frame 1-|-frame 2-|

      Every level has its own ids (token = level * 1024 + code), so sampling can be restricted to the level a
      position holds; BOS = levels * 1024 is no code; the condition ids follow it. layout "shared" is the
      reference recipe's (token = code for every level, BOS = 0, which is also code 0; vocab_size 1024), kept to
      sample the reference notebook's checkpoints.

    pattern "delay": K streams (B, K, prefix + frames + K - 1), level k starting k steps late ("." = EMPTY):

          stream 0:  BOS  pitch  velocity  source  a0  a1  a2  .
          stream 1:  BOS  pitch  velocity  source  .   b0  b1  b2
                                         step:     0   1   2   3    (b0 is predicted knowing a0)

    pattern "parallel": K streams (B, K, prefix + frames), frame t of every level at step t:

          stream 0:  BOS  pitch  velocity  source  a0  a1  a2
          stream 1:  BOS  pitch  velocity  source  b0  b1  b2

      In both multi-stream patterns every stream has the same ids: code 0..1023, EMPTY = 1024, BOS = 1025, then
      the condition ids; the model's embedding and output layer tell the streams apart.

    conditions=True puts a token for the note's MIDI pitch, MIDI velocity and instrument source (NSYNTH_SOURCES)
    after BOS; each has its own ids and its own "unknown" id, used for unlabelled notes, for condition dropout in
    training and for the unconditional pass of classifier-free guidance.
    """

    def __init__(self, levels: int, codebook_size: int = 1024, layout: str = "levels",
                 conditions: bool = False, pattern: str = "flatten"):
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
        if layout not in ("levels", "shared"):
            raise ValueError(f"layout must be 'levels' or 'shared', got {layout!r}")
        if layout == "shared" and (conditions or pattern != "flatten"):
            raise ValueError("the 'shared' layout is the reference's: flatten, without condition tokens")
        self.levels, self.codebook_size, self.layout = levels, codebook_size, layout
        self.conditions, self.pattern = conditions, pattern
        self.streams = 1 if pattern == "flatten" else levels      # token streams the model reads side by side
        if pattern == "flatten":
            self.empty = None
            self.bos = levels * codebook_size if layout == "levels" else 0
        else:
            self.empty = codebook_size
            self.bos = codebook_size + 1
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
        else:  # codes (and EMPTY), BOS, then the condition ids up to the last "unknown": per stream
            self.vocab_size = int(self.unknown[-1]) + 1 if conditions else self.bos + 1

    def state(self) -> dict:
        """What rebuilds this tokenizer: CodecTokenizer(**state()). Saved in checkpoints."""
        return {"levels": self.levels, "codebook_size": self.codebook_size, "layout": self.layout,
                "conditions": self.conditions, "pattern": self.pattern}

    # ------------------------------------------------------------------------------------------------
    # The pattern: codes <-> the steps after the prefix

    def steps(self, frames: int) -> int:
        """Decode steps that hold `frames` frames of codes."""
        return {"flatten": self.levels * frames, "delay": frames + self.levels - 1, "parallel": frames}[self.pattern]

    def frames(self, steps: int) -> int:
        """Whole frames of codes in `steps` steps (the inverse of steps(); an unfinished frame does not count)."""
        return max(0, {"flatten": steps // self.levels, "delay": steps - self.levels + 1, "parallel": steps}[self.pattern])

    def interleave(self, codes: Tensor, fill: int | None = None) -> Tensor:
        """codes (B, levels, frames) laid out in steps: (B, levels * frames) for flatten, (B, levels, steps)
        for delay and parallel; the delay's holes get `fill` (default: EMPTY)."""
        B, K, T = codes.shape
        if self.pattern == "flatten":
            return codes.transpose(1, 2).reshape(B, -1)                     # a0 b0 a1 b1 ...
        if self.pattern == "parallel":
            return codes
        body = codes.new_full((B, K, self.steps(T)), self.empty if fill is None else fill)
        for k in range(K):
            body[:, k, k:k + T] = codes[:, k]                               # level k, k steps late
        return body

    def deinterleave(self, body: Tensor) -> Tensor:
        """The inverse of interleave: steps (B, [levels,] n) -> (B, levels, frames), for token ids or for anything
        computed per step (the loss of each code). Holes and an unfinished last frame are left out."""
        T = self.frames(body.shape[-1])
        if self.pattern == "flatten":
            return body[:, :T * self.levels].reshape(len(body), T, self.levels).transpose(1, 2)
        if self.pattern == "parallel":
            return body[:, :, :T]
        return torch.stack([body[:, k, k:k + T] for k in range(self.levels)], dim=1)

    def per_code(self, per_target: Tensor) -> Tensor:
        """Values per next-token target (B, [levels,] S - 1), step s's for the token at s + 1 (a loss, a hit) ->
        the values of the codes (B, levels, frames), without BOS, the conditions and EMPTY (not learned)."""
        return self.deinterleave(per_target[..., self.prefix - 1:])

    def _offsets(self, device) -> Tensor:
        """What is added to each level's codes: (levels, 1); only flatten's levels share a stream and need own ids."""
        step = self.codebook_size if self.layout == "levels" and self.pattern == "flatten" else 0
        return (torch.arange(self.levels, device=device) * step)[:, None]

    def encode(self, codes: Tensor, pitch=None, velocity=None, source=None) -> Tensor:
        """codes (B, levels, frames) -> tokens: BOS, the condition tokens when the tokenizer has them (unknown
        where a label is None or -1), then the codes in the pattern's steps. (B, S) for flatten, (B, K, S) else."""
        B, L, _ = codes.shape
        if L != self.levels:
            raise ValueError(f"expected codes of {self.levels} levels, got {L}")
        body = self.interleave(codes.long() + self._offsets(codes.device))
        return torch.cat([self.start(B, pitch, velocity, source, codes.device), body], dim=-1)

    def decode(self, tokens: Tensor) -> Tensor:
        """tokens -> codes (B, levels, frames); an unfinished last frame is dropped. Raises ValueError when a
        token is not a code of its position's level."""
        codes = self.deinterleave(tokens[..., self.prefix:]) - self._offsets(tokens.device)
        if ((codes < 0) | (codes >= self.codebook_size)).any():
            raise ValueError("tokens are not codes of their positions' levels")
        return codes

    def allowed(self, seq_len: int, device=None, given: Tensor | None = None) -> Tensor:
        """What may be sampled at each step: (seq_len, vocab_size) bool for flatten, (seq_len, levels, vocab_size)
        for delay and parallel. A code step allows the codes of its level, a hole of the delay pattern only
        EMPTY, the prefix nothing. given: codes (levels, Tg) of the first Tg frames, already known (a recording
        to continue): their steps allow only that code. With the shared layout every code is allowed everywhere."""
        C, K, P = self.codebook_size, self.levels, self.prefix
        if self.pattern == "flatten":
            mask = torch.zeros(seq_len, self.vocab_size, dtype=torch.bool, device=device)
            for level in range(K):
                if self.layout == "shared":
                    mask[P + level::K, :C] = True
                else:
                    mask[P + level::K, level * C:(level + 1) * C] = True
        else:
            mask = torch.zeros(seq_len, K, self.vocab_size, dtype=torch.bool, device=device)
            mask[P:, :, :C] = True
            if self.pattern == "delay":  # level k holds codes at steps k .. k + frames - 1, EMPTY elsewhere
                frames = self.frames(seq_len - P)
                for k in range(K):
                    for holes in (slice(P, P + k), slice(P + k + frames, seq_len)):
                        mask[holes, k] = False
                        mask[holes, k, self.empty] = True
        if given is not None:
            known = self.interleave(given[None].long().to(device) + self._offsets(device), fill=-1)[0]
            known = known if self.pattern == "flatten" else known.T          # (steps, [levels])
            rows = mask[P:P + len(known)]                                    # a view: writing it writes mask
            rows[known >= 0] = torch.nn.functional.one_hot(known[known >= 0], self.vocab_size).bool()
        return mask

    # ------------------------------------------------------------------------------------------------
    # BOS and the condition tokens

    def start(self, batch: int, pitch=None, velocity=None, source=None, device=None) -> Tensor:
        """The prompt that every sequence starts with: BOS [+ condition tokens], (B, prefix) for flatten and
        (B, K, prefix), the same in every stream, for delay and parallel."""
        prefix = torch.full((batch, 1), self.bos, dtype=torch.long, device=device)
        if self.conditions:
            prefix = torch.cat([prefix, self.condition_tokens(pitch, velocity, source, batch, device)], dim=1)
        return prefix if self.pattern == "flatten" else prefix[:, None].expand(-1, self.streams, -1).clone()

    def prompt(self, batch: int, pitch=None, velocity=None, source=None, codes: Tensor | None = None,
               device=None) -> Tensor:
        """What generation starts from: start(), then the steps that hold only codes of `codes` (1, levels, Tp),
        a recording to continue. The delay pattern's later steps that hold some of them are left to generate,
        with allowed(given=codes[0]) forcing the known ones."""
        prompt = self.start(batch, pitch, velocity, source, device)
        if codes is None:
            return prompt
        body = self.encode(codes.to(device))[..., self.prefix:]
        known = codes.shape[-1] if self.pattern == "delay" else self.steps(codes.shape[-1])
        return torch.cat([prompt, body[..., :known].expand(batch, *body.shape[1:-1], known)], dim=-1)

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
        probability p (condition dropout: one model learns conditional and unconditional generation). In every
        stream alike."""
        if not self.conditions or p == 0:
            return tokens
        drop = torch.rand(tokens.shape[0], len(CONDITIONS), generator=generator) < p
        drop = drop.view(len(tokens), *[1] * (tokens.dim() - 2), len(CONDITIONS)).to(tokens.device)
        tokens = tokens.clone()
        tokens[..., 1:self.prefix] = torch.where(drop, self.unknown.to(tokens.device), tokens[..., 1:self.prefix])
        return tokens

    def unconditional(self, tokens: Tensor) -> Tensor:
        """tokens with every condition replaced by "unknown": the input of classifier-free guidance's second pass."""
        if not self.conditions:
            return tokens
        tokens = tokens.clone()
        tokens[..., 1:self.prefix] = self.unknown.to(tokens.device)
        return tokens
