"""train.py and sample.py run as a user runs them: offline, synthetic notes, untrained codec, a tiny model."""
import numpy as np
import pytest
import soundfile as sf
import torch

import sample
import train

from conftest import TINY, assert_one_line, read_log, run
from checkpoint import load_checkpoint, model_from_checkpoint
from model import GPT


@pytest.mark.slow
def test_training_lowers_the_loss_and_logs(trained):
    """The loss falls well below chance (ln 2049 = 7.6) and every evaluation is logged with per-level losses."""
    _, out, result = trained
    log = read_log(out)
    assert [entry["iter"] for entry in log] == [0, 20, 40]
    assert log[0]["val_loss"] > 7.0
    assert log[-1]["train_loss"] < log[1]["train_loss"] < log[0]["val_loss"] - 1.0
    assert min(entry["val_loss"] for entry in log[1:]) < log[0]["val_loss"] - 0.5
    assert all(len(entry["val_loss_per_level"]) == 2 and 0 <= entry["val_accuracy"] <= 1 for entry in log)
    assert "training notes" in result.stdout and "done: best validation loss" in result.stdout


@pytest.mark.slow
def test_checkpoints_load_with_weights_only(trained):
    """ckpt.pt and best.pt hold only tensors and plain values, and rebuild the model that was trained."""
    _, out, _ = trained
    for name in ("ckpt.pt", "best.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        model = model_from_checkpoint(ckpt)
        # 2 levels x 1024 codes, BOS, pitch 128 + unknown, velocity 128 + unknown, source 3 + unknown
        assert isinstance(model, GPT) and model.cfg.vocab_size == 2 * 1024 + 1 + 129 + 129 + 4
        assert model.cfg.max_seq_len == 3 + 60   # the condition tokens, then BOS + 59 tokens fed back
        assert ckpt["codec"]["kind"] == "untrained" and ckpt["tokenizer"]["layout"] == "levels"
        assert ckpt["tokenizer"]["conditions"] is True
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["iter_num"] == 40 and "optimizer" in ckpt
    assert not list(out.glob("*.tmp*"))   # atomic_write left no temporary file behind


@pytest.mark.slow
def test_resume_continues_exactly(trained, tmp_path):
    """40 steps + --resume to 60 ends with the same weights and log as 60 steps in one go (CPU, same seed)."""
    work, out, _ = trained
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("ckpt.pt", "log.jsonl"):
        (resumed / name).write_bytes((out / name).read_bytes())
    result = run("train.py", *TINY, "--max-iters", "60", "--out-dir", str(resumed), "--resume", cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming" in result.stdout
    straight = run("train.py", *TINY, "--max-iters", "60", "--out-dir", str(tmp_path / "straight"), cwd=work)
    assert straight.returncode == 0, straight.stderr[-2000:]
    a = torch.load(resumed / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 60
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    strip = lambda log: [{k: v for k, v in e.items() if k != "elapsed_s"} for e in log]  # noqa: E731
    # both logs hold iterations 0, 20, 40, 60: the resumed run does not evaluate 40 twice
    assert strip(read_log(resumed)) == strip(read_log(tmp_path / "straight"))


@pytest.mark.slow
def test_sample_writes_wavs(trained, tmp_path):
    """sample.py writes --num-samples 24 kHz mono 16-bit WAVs of the trained length, and reports its speed."""
    work, out, _ = trained
    result = run("sample.py", "--ckpt", str(out / "best.pt"), "--num-samples", "3", "--batch-size", "2",
                 "--out-dir", str(tmp_path / "samples"), "--device", "cpu", cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    wavs = sorted((tmp_path / "samples").glob("*.wav"))
    assert [w.name for w in wavs] == ["sample_0.wav", "sample_1.wav", "sample_2.wav"]
    for w in wavs:
        info = sf.info(w)
        assert (info.samplerate, info.channels, info.subtype, info.frames) == (24_000, 1, "PCM_16", 30 * 320)
        assert np.isfinite(sf.read(w)[0]).all()
    assert "tokens/s" in result.stdout and "real-time factor" in result.stdout


@pytest.mark.slow
def test_sample_asked_for_more_than_the_model_makes_is_one_line(trained, tmp_path):
    """Too many seconds for the model is one line naming the flag (the flags' own ranges: tests/test_hostile.py)."""
    _, out, _ = trained
    with pytest.raises(SystemExit) as stop:
        sample.main(["--ckpt", str(out / "best.pt"), "--seconds", "5", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert_one_line(stop.value.code, "error:", "--seconds 5.0", "0.400 s")


@pytest.mark.slow
def test_broken_checkpoint_is_one_line(trained, tmp_path):
    """A truncated checkpoint and a missing one give a one-line error naming the file, not a traceback."""
    _, out, _ = trained
    broken = tmp_path / "broken.pt"
    broken.write_bytes((out / "best.pt").read_bytes()[:5000])
    for path in (broken, tmp_path / "missing.pt"):
        with pytest.raises(SystemExit) as stop:
            sample.main(["--ckpt", str(path), "--device", "cpu"])
        assert_one_line(stop.value.code, f"error: {path}: ")


def test_train_reports_bad_data_clearly(tmp_path):
    """A missing folder and a folder of unreadable files end with one clear line (run as a user runs it, with no
    traceback: tests/test_hostile.py)."""
    with pytest.raises(SystemExit) as stop:
        train.main(["--data", str(tmp_path / "nowhere"), "--codec", "untrained", "--out-dir", str(tmp_path / "o")])
    assert_one_line(stop.value.code, "error:", str(tmp_path / "nowhere"), "no such folder")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.wav").write_bytes(b"")
    (bad / "b.flac").write_text("text")
    with pytest.raises(SystemExit) as stop:
        train.main(["--data", str(bad), "--codec", "untrained", "--data-dir", str(tmp_path / "d"),
                    "--out-dir", str(tmp_path / "o")])
    assert_one_line(stop.value.code, "error:", f"--data {bad}", "no readable audio")


@pytest.mark.slow
def test_sample_from_a_reference_notebook_checkpoint(tmp_path):
    """--xt-checkpoint samples an x-transformers state dict (shared ids, start token 0) with --codec-weights."""
    from encodec import EncodecModel
    from x_transformers import Decoder, TransformerWrapper
    xt = TransformerWrapper(num_tokens=1024, max_seq_len=250, attn_layers=Decoder(dim=64, depth=1, heads=2,
                                                                                 rotary_pos_emb=True))
    torch.save(xt.state_dict(), tmp_path / "model_gen_autoreg_transformer.pth")
    torch.save(EncodecModel.encodec_model_24khz(pretrained=False).state_dict(), tmp_path / "encodec.th")
    result = run("sample.py", "--xt-checkpoint", str(tmp_path / "model_gen_autoreg_transformer.pth"),
                 "--xt-heads", "2", "--codec-weights", str(tmp_path / "encodec.th"), "--num-samples", "2",
                 "--seconds", "0.2", "--out-dir", str(tmp_path / "s"), "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "s").glob("*.wav")) == ["sample_0.wav", "sample_1.wav"]
    assert sf.info(tmp_path / "s" / "sample_0.wav").frames == 15 * 320
