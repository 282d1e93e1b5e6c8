"""Behaviour pinned across refactors: a short seeded training run and seeded generation give the numbers they gave
when these values were recorded (commit 9620dba, before the readable-core redesign). A change that alters what a
seed produces, on purpose or not, fails here; on purpose, re-record the values and say why in the commit."""
import pytest
import torch

from conftest import read_log, run
from model import GPT, GPTConfig
from tokenizer import CodecTokenizer

# float32, so that the numbers do not depend on whether the CPU has native bf16; dropout on, so that its random
# mask is pinned too
PINNED_RUN = ["--data", "synthetic", "--codec", "untrained", "--synthetic-notes", "12", "--seconds", "0.2",
              "--dim", "32", "--depth", "1", "--heads", "1", "--dim-head", "16", "--dropout", "0.1",
              "--batch-size", "8", "--lr", "3e-3", "--warmup-iters", "2", "--lr-decay-iters", "20",
              "--eval-interval", "5", "--device", "cpu", "--dtype", "float32", "--max-iters", "20"]
# iteration: (train loss, validation loss)
PINNED_LOSSES = {0: (None, 7.7441089153289795), 5: (7.52438497543335, 7.086704730987549),
                 10: (6.855515480041504, 6.472167491912842), 15: (6.379314422607422, 6.130419015884399),
                 20: (6.1473894119262695, 6.051085472106934)}

PINNED_TOP_K = [[671, 1763, 677, 1479, 728, 1070, 570, 1741, 594, 1644, 907, 1360, 920, 1905, 1001, 1777, 254, 1552,
                 928, 1625, 907, 1251, 575, 1277, 434, 1079, 667, 1993, 953, 1506],
                [156, 1816, 297, 1347, 651, 1777, 481, 2013, 351, 1805, 207, 1332, 235, 1636, 119, 1734, 168, 1392,
                 366, 1417, 332, 1909, 721, 1283, 677, 1353, 340, 1978, 250, 1881]]
PINNED_GUIDED_TOP_P = [[384, 1405, 933, 2033, 479, 1429, 759, 1892, 275, 1177, 519, 1338, 23, 1187, 525, 1884, 317,
                        1150, 914, 1041, 940, 1618, 901, 1499, 448, 1124, 817, 1783, 237, 1422],
                       [426, 1229, 721, 1186, 504, 1214, 115, 1801, 951, 1430, 270, 1607, 848, 1449, 478, 1539, 264,
                        1292, 158, 1565, 957, 1897, 114, 1505, 472, 1722, 866, 1673, 243, 1223]]


@pytest.mark.slow
def test_seeded_training_run_gives_the_pinned_losses(tmp_path):
    result = run("train.py", *PINNED_RUN, "--out-dir", "out", "--data-dir", "data", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    log = {entry["iter"]: (entry["train_loss"], entry["val_loss"]) for entry in read_log(tmp_path / "out")}
    assert log.keys() == PINNED_LOSSES.keys()
    for it, (train_loss, val_loss) in PINNED_LOSSES.items():
        # float32 sums may be ordered differently by another CPU's kernels: 1e-5 relative, far below a real change
        assert abs(log[it][1] - val_loss) < 1e-5 * val_loss, it
        if train_loss is None:
            assert log[it][0] is None
        else:
            assert abs(log[it][0] - train_loss) < 1e-5 * train_loss, it


def test_seeded_generate_gives_the_pinned_tokens():
    """Top-k sampling, and guided top-p sampling, from a seeded random model with condition tokens."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=2311, max_seq_len=40, dim=64, depth=2, heads=2, dim_head=32)).eval()
    model.set_attention("fused")
    tok = CodecTokenizer(2, conditions=True)
    prompt = tok.start(2, torch.tensor([60, 64]), 100, 0)
    out = model.generate(prompt, 30, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(7),
                         allowed=tok.allowed(34))
    assert out[:, tok.prefix:].tolist() == PINNED_TOP_K
    out = model.generate(prompt, 30, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(7),
                         allowed=tok.allowed(34), uncond_prompt=tok.unconditional(prompt), cfg_scale=3.0)
    assert out[:, tok.prefix:].tolist() == PINNED_GUIDED_TOP_P
