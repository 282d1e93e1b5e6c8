"""Shared fixtures: a small synthetic note folder and an untrained codec fitted to it (built once per session)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402

REAL_GUITAR = ROOT.parent / "shared" / "data" / "real-guitar"
needs_real_guitar = pytest.mark.skipif(not REAL_GUITAR.is_dir(),
                                       reason=f"real guitar notes not found at {REAL_GUITAR}")


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory) -> Path:
    return data.make_synthetic(tmp_path_factory.mktemp("synthetic") / "notes", num_notes=24, seed=1, seconds=1.0)


@pytest.fixture(scope="session")
def fitted_codec(synthetic_folder) -> data.Codec:
    """An untrained EnCodec whose codebooks were fitted on 1 s of 24 synthetic notes (1,800 latents)."""
    files = data.find_audio(synthetic_folder)
    audio = torch.from_numpy(np.stack([data.read_audio(f, 24_000) for f in files]))
    codec = data.Codec.untrained(1.5, seed=0)
    codec.fit(audio, iters=5)
    return codec
