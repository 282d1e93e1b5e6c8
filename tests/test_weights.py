"""Weights in fewer bytes for sampling (model.quantize_weights, sample.py --weights): an int8 layer computes what the
float32 one does within its rounding; int8 and bfloat16 models pick float32's tokens on most positions of a trained
checkpoint; a quantized model survives a file round trip; generate works with them for every pattern; and the flag
refuses bfloat16 where it is not native, in one line."""
import pytest
import torch
import torch.nn as nn

import cli
from checkpoint import load_checkpoint, model_from_checkpoint
from conftest import assert_one_line, run
from data import CODEBOOK_SIZE
from files import DataError
from model import GPT, GPTConfig, Int8Linear, quantize_weights
from tokenizer import PATTERNS, CodecTokenizer

KINDS = ["int8", "bfloat16"]


def test_int8_layer_is_float32_within_its_rounding():
    """Each row's largest weight maps to +-127; the product differs from float32's by no more than the weights'
    rounding (half a step of the row's scale), the input's and the output's rounding to bf16 (2^-8 relative)."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    q = Int8Linear(layer)
    assert q.weight.dtype == torch.int8 and (q.weight.abs().amax(dim=1) == 127).all()
    assert torch.allclose(q.weight.float() * q.scales[:, None], layer.weight, atol=q.scales.max().item() / 2 + 1e-7)
    x = torch.randn(5, 3, 64)
    with torch.no_grad():
        exact, got = layer(x), q(x)
    bound = (x.abs() @ (q.scales[:, None] / 2).expand(-1, 64).T + 2**-8 * (x.abs() @ layer.weight.abs().T)
             + 2**-8 * exact.abs() + 1e-5)
    assert got.shape == exact.shape and got.dtype == torch.float32
    assert ((got - exact).abs() <= bound).all()
    assert (got - exact).abs().max() > 0          # it is int8: not float32's result to the last bit


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_weights_pick_float32s_tokens_on_a_trained_checkpoint(reference_run, kind):
    """On sequences the trained float32 model samples, the quantized model's most likely next token is float32's
    on at least 90% of positions, and its next-token distributions stay close (mean KL under 0.05 nats)."""
    model = model_from_checkpoint(load_checkpoint(reference_run / "best.pt")).eval()
    generator = torch.Generator().manual_seed(0)
    seqs = model.generate(torch.zeros(8, 1, dtype=torch.long), model.cfg.max_seq_len, generator=generator)
    quantized = quantize_weights(model, kind)
    with torch.inference_mode():
        ref, got = model(seqs[:, :-1]).float(), quantized(seqs[:, :-1]).float()
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    assert agree >= 0.9, f"{kind}: the same most likely token on {agree:.1%} of positions"
    assert kl < 0.05, f"{kind}: mean KL(float32 || {kind}) = {kl:.4f} nats"
    assert next(p for p in model.parameters()).dtype == torch.float32   # the float32 model is left as it was


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_quantized_model_file_round_trip_and_generate(pattern, kind, tmp_path):
    """A quantized model's state dict, saved to a file, loads into quantize_weights(GPT(cfg), kind) and gives the
    same logits to the bit; its file is smaller than float32's; generate keeps the prompt and samples only allowed
    tokens of the pattern, with the cache and without."""
    torch.manual_seed(0)
    tok = CodecTokenizer(levels=4, pattern=pattern, conditions=True)
    tokens = tok.encode(torch.randint(0, CODEBOOK_SIZE, (2, 4, 6)), pitch=torch.tensor([50, 70]), velocity=100,
                        source=0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, max_seq_len=tokens.shape[-1], dim=64, depth=2, heads=2, dim_head=32,
                    dropout=0.0, streams=tok.streams)
    model = GPT(cfg).eval()
    quantized = quantize_weights(model, kind)
    torch.save(model.state_dict(), tmp_path / "float32.pt")
    torch.save(quantized.state_dict(), tmp_path / f"{kind}.pt")
    loaded = quantize_weights(GPT(cfg), kind)
    loaded.load_state_dict(torch.load(tmp_path / f"{kind}.pt", weights_only=True))
    with torch.inference_mode():
        assert torch.equal(loaded(tokens[..., :-1]), quantized(tokens[..., :-1]))
    assert (tmp_path / f"{kind}.pt").stat().st_size < 0.75 * (tmp_path / "float32.pt").stat().st_size
    prompt = tok.start(2, pitch=torch.tensor([50, 70]), velocity=100, source=0)
    length = tokens.shape[-1]
    allowed = tok.allowed(length)
    for use_kv_cache in (True, False):
        out = loaded.generate(prompt, length - tok.prefix, allowed=allowed, use_kv_cache=use_kv_cache,
                              generator=torch.Generator().manual_seed(1))
        assert out.shape == tokens.shape and torch.equal(out[..., :tok.prefix], prompt)
        steps = out[..., tok.prefix:]   # (B, [streams,] steps): each token must be allowed at its position
        ok = allowed[tok.prefix:]       # (steps, [streams,] vocab)
        if pattern == "flatten":
            assert ok[torch.arange(steps.shape[-1]), steps].all()
        else:
            assert ok.gather(-1, steps.permute(2, 1, 0)).all()


def test_weights_flag_defaults_to_float32_and_refuses_emulated_bf16(monkeypatch):
    """--weights auto is float32 (as measured: docs/speed.md); bfloat16 where the CPU lacks it is one line naming
    the flag and what to use instead."""
    assert cli.pick_weights("auto", "cpu") == "float32" and cli.pick_weights("auto", "cuda") == "float32"
    assert cli.pick_weights("float32", "cpu") == "float32"
    monkeypatch.setattr(cli, "native_bf16", lambda device: False)
    with pytest.raises(DataError) as e:
        cli.pick_weights("bfloat16", "cpu")
    assert_one_line(str(e.value), "--weights bfloat16", "int8")


@pytest.mark.slow
def test_sample_writes_notes_with_each_weight_format(reference_run, tmp_path):
    """sample.py --weights float32 and int8 (and bfloat16 where native) write the asked notes from one checkpoint."""
    kinds = ["float32", "int8"] + (["bfloat16"] if cli.native_bf16("cpu") else [])
    for kind in kinds:
        out = tmp_path / kind
        result = run("sample.py", "--ckpt", str(reference_run / "best.pt"), "--num-samples", "2", "--weights", kind,
                     "--device", "cpu", "--out-dir", str(out), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        assert len(list(out.glob("*.wav"))) == 2, kind


@pytest.mark.slow
def test_bench_weights_scores_every_format_on_held_out_notes(reference_run, tmp_path):
    """bench.py --only weights: one row per format on the checkpoint's validation notes, float32's against itself
    exactly (every argmax the same, KL 0), int8's close to it, each with train.py's validation loss."""
    import json
    result = run("bench.py", "--only", "weights", "--ckpt", str(reference_run / "best.pt"), "--repeats", "1",
                 "--device", "cpu", "--json", str(tmp_path / "bench.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert {"float32", "int8"} <= set(rows) and ("bfloat16" in rows) == cli.native_bf16("cpu")
    assert rows["float32"]["same_argmax"] == 1 and rows["float32"]["kl_nats"] == pytest.approx(0, abs=1e-6)
    assert rows["int8"]["same_argmax"] >= 0.9 and 0 < rows["int8"]["kl_nats"] < 0.05
    assert rows["int8"]["val_loss"] == pytest.approx(rows["float32"]["val_loss"], rel=0.05)
