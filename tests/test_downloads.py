"""Tests for prepare.py's downloads and NSynth preparation, and data.py's codec weights, against a throwaway HTTP server on 127.0.0.1.

Nothing here touches the internet: every URL points at the local server (or at a closed local port), and torch.hub
writes into a temporary TORCH_HOME.
"""
from __future__ import annotations

import hashlib
import io
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import warnings
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prepare  # noqa: E402
from data import Codec, DataError  # noqa: E402
from prepare import download, extract_zip, prepare_nsynth, sha256_of  # noqa: E402

BODY = random.Random(0).randbytes(300_000)   # more than a few of download()'s 64 KiB reads
BODY_SHA = hashlib.sha256(BODY).hexdigest()
CHECKPOINT = "encodec_24khz-d7cc33bc.th"     # the name encodec asks torch.hub for


# ----------------------------------------------------------------------------------------------------
# helpers

def part_of(dest: Path) -> Path:
    """The partial-download file download() uses for dest."""
    return dest.with_name(dest.name + ".part")


def sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def closed_port_url(path: str = "/file") -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def tiny_wav(seed: int) -> bytes:
    """A few milliseconds of 16 kHz mono PCM WAV."""
    buffer = io.BytesIO()
    audio = np.random.default_rng(seed).uniform(-0.5, 0.5, 160).astype(np.float32)
    sf.write(buffer, audio, 16_000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


NOTES = {"nsynth-guitar-train": ["guitar_acoustic_000-060-100.wav", "guitar_electronic_001-064-050.wav"],
         "nsynth-guitar-valid": ["guitar_synthetic_002-067-075.wav"]}


def nsynth_zip(top: str = "") -> tuple[bytes, dict[str, bytes]]:
    """A small zip laid out like the NSynth guitar set, with the split folders under `top` ('' = at the root);
    returns (zip bytes, {split/name: file bytes})."""
    files, buffer = {}, io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for i, (split, names) in enumerate(NOTES.items()):
            z.writestr(f"{top}{split}/", b"")  # directory entries, as zip tools write them
            for j, name in enumerate(names):
                files[f"{split}/{name}"] = tiny_wav(10 * i + j)
                z.writestr(f"{top}{split}/{name}", files[f"{split}/{name}"])
    return buffer.getvalue(), files


# ----------------------------------------------------------------------------------------------------
# the local HTTP server

class Handler(BaseHTTPRequestHandler):
    """Serves server.files (path -> bytes), honouring `Range: bytes=N-` unless server.ignore_range; with
    server.cut_after = K it announces the full Content-Length but sends only K bytes and closes the connection."""

    def do_GET(self):
        server = self.server
        rng = self.headers.get("Range")
        server.requests.append({"path": self.path, "range": rng})
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        start, status = 0, 200
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and not server.ignore_range:
            start = int(m[1])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        payload = body[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(payload)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if server.cut_after is not None:
            payload = payload[:server.cut_after]
            self.close_connection = True
        # recorded before writing: the client may have read every byte (and the test checked) before a line after
        # write() runs in this server thread
        server.sent.append(len(payload))
        self.wfile.write(payload)
        self.wfile.flush()
        if server.cut_after is not None:
            self.connection.shutdown(socket.SHUT_WR)  # end of stream, well before Content-Length bytes

    def log_message(self, format, *args):  # keep test output quiet
        pass


class LocalServer:
    def __init__(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.files, self.httpd.requests, self.httpd.sent = {}, [], []
        self.httpd.ignore_range, self.httpd.cut_after = False, None
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, path: str, payload: bytes) -> str:
        """Serve payload at path; returns its URL."""
        self.httpd.files[path] = payload
        return self.base + path

    # the knobs and the records, as attributes of the fixture
    files = property(lambda self: self.httpd.files)
    requests = property(lambda self: self.httpd.requests)
    sent = property(lambda self: self.httpd.sent)
    ignore_range = property(lambda self: self.httpd.ignore_range,
                            lambda self, v: setattr(self.httpd, "ignore_range", v))
    cut_after = property(lambda self: self.httpd.cut_after, lambda self, v: setattr(self.httpd, "cut_after", v))

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    s = LocalServer()
    yield s
    s.close()


# ----------------------------------------------------------------------------------------------------
# download()

def test_fresh_download_writes_exact_bytes(server, tmp_path):
    """A fresh download writes exactly the served bytes under dest, checks sha256, and leaves no .part."""
    url = server.serve("/file.bin", BODY)
    dest = tmp_path / "sub" / "file.bin"
    assert download(url, dest, BODY_SHA) == dest
    assert dest.read_bytes() == BODY and sha256_of(dest) == BODY_SHA
    assert not part_of(dest).exists()
    assert [r["range"] for r in server.requests] == [None]
    # a second call finds dest and does not ask the server again
    download(url, dest, BODY_SHA)
    assert len(server.requests) == 1


def test_resume_asks_for_the_rest_only(server, tmp_path):
    """A partial .part file is resumed with `Range: bytes=<have>-`, only the rest is sent, and the result is whole."""
    url = server.serve("/file.bin", BODY)
    dest = tmp_path / "file.bin"
    half = len(BODY) // 2
    part_of(dest).write_bytes(BODY[:half])
    download(url, dest, BODY_SHA)
    assert [r["range"] for r in server.requests] == [f"bytes={half}-"]
    assert server.sent == [len(BODY) - half]
    assert dest.read_bytes() == BODY
    assert not part_of(dest).exists()


def test_complete_part_file_gets_416_and_is_accepted(server, tmp_path):
    """A .part that already holds every byte gets HTTP 416 for its Range request and is checked and kept."""
    url = server.serve("/file.bin", BODY)
    dest = tmp_path / "file.bin"
    part_of(dest).write_bytes(BODY)
    download(url, dest, BODY_SHA)
    assert [r["range"] for r in server.requests] == [f"bytes={len(BODY)}-"]
    assert dest.read_bytes() == BODY


@pytest.mark.parametrize("checksum", [BODY_SHA, None], ids=["with-sha256", "without-sha256"])
def test_server_ignoring_range_starts_over(server, tmp_path, checksum):
    """When the server answers a Range request with 200 and the whole body, the old partial bytes are discarded."""
    url = server.serve("/file.bin", BODY)
    server.ignore_range = True
    dest = tmp_path / "file.bin"
    part_of(dest).write_bytes(b"\xff" * (len(BODY) // 2))  # wrong bytes: appending to them would show
    download(url, dest, checksum)
    assert server.requests[0]["range"] == f"bytes={len(BODY) // 2}-"
    assert dest.read_bytes() == BODY
    assert not part_of(dest).exists()


def test_checksum_mismatch_removes_everything(server, tmp_path):
    """A download whose sha256 is wrong raises DataError (naming sha256/corrupt), and leaves neither dest nor .part."""
    url = server.serve("/file.bin", BODY)
    dest = tmp_path / "file.bin"
    with pytest.raises(DataError, match=r"(?i)sha256|corrupt") as info:
        download(url, dest, "0" * 64)
    assert "corrupt" in str(info.value) and "sha256" in str(info.value)
    assert not dest.exists()
    assert not part_of(dest).exists()


@pytest.mark.parametrize("checksum", [BODY_SHA, None], ids=["with-sha256", "without-sha256"])
def test_dropped_connection_keeps_part_and_resumes(server, tmp_path, checksum):
    """A connection closed before Content-Length bytes raises DataError ('cut off ... resume') and keeps the
    received bytes in .part; the next call against a healthy server resumes with a Range request."""
    url = server.serve("/file.bin", BODY)
    dest = tmp_path / "file.bin"
    cut = 100_000
    server.cut_after = cut
    with pytest.raises(DataError, match=r"cut off.*resume"):
        download(url, dest, checksum, timeout=10)
    assert not dest.exists(), "a truncated download must not take the final name"
    assert part_of(dest).read_bytes() == BODY[:cut]

    server.cut_after = None
    download(url, dest, checksum, timeout=10)
    assert server.requests[-1]["range"] == f"bytes={cut}-"
    assert dest.read_bytes() == BODY


def test_unreachable_server_raises_data_error(tmp_path):
    """A refused connection is reported as DataError (one message, no urllib traceback), and nothing is written."""
    url = closed_port_url("/file.bin")
    dest = tmp_path / "file.bin"
    with pytest.raises(DataError, match="download of .* failed"):
        download(url, dest, BODY_SHA, timeout=5)
    assert not dest.exists() and not part_of(dest).exists()


def test_http_404_raises_data_error(server, tmp_path):
    """HTTP 404 is reported as DataError naming the status code."""
    dest = tmp_path / "file.bin"
    with pytest.raises(DataError, match="404"):
        download(server.base + "/missing.bin", dest, BODY_SHA)
    assert not dest.exists()


# ----------------------------------------------------------------------------------------------------
# prepare_nsynth() and extract_zip()

def check_nsynth_folder(folder: Path, files: dict[str, bytes]) -> None:
    for split, names in NOTES.items():
        found = sorted(p.name for p in (folder / split).glob("*.wav"))
        assert found == sorted(names), f"{folder / split}: {found}; tree: {sorted(map(str, folder.rglob('*')))}"
    for relative, payload in files.items():
        assert (folder / relative).read_bytes() == payload


@pytest.mark.parametrize("top", ["", "NSYNTH_GUITAR_MP3/"], ids=["splits-at-root", "splits-under-top-folder"])
def test_prepare_nsynth_downloads_and_extracts_once(server, tmp_path, monkeypatch, top):
    """prepare_nsynth downloads and extracts the zip into data_dir/NSYNTH_GUITAR_MP3 holding the split folders,
    whether the zip has them at its root or under a top folder, and a second call does not contact the server."""
    archive, files = nsynth_zip(top)
    url = server.serve("/NSYNTH_GUITAR_MP3.zip", archive)
    folder = prepare_nsynth(tmp_path, url=url, sha256=sha(archive))
    assert folder == tmp_path / "NSYNTH_GUITAR_MP3"
    assert len(server.requests) == 1
    assert not (tmp_path / "NSYNTH_GUITAR_MP3.extracting").exists()
    assert not list(tmp_path.glob("*.part"))

    assert prepare_nsynth(tmp_path, url=url, sha256=sha(archive)) == folder
    assert len(server.requests) == 1, "the second call must not download again"

    check_nsynth_folder(folder, files)
    # what --data nsynth-guitar then trains on (download() must not be reached: the folder exists)
    monkeypatch.setattr(prepare, "download", lambda *a, **k: pytest.fail("resolve_data tried to download"))
    splits = prepare.resolve_data("nsynth-guitar", tmp_path)
    assert sorted(p.name for p in splits["train"]) == sorted(NOTES["nsynth-guitar-train"])
    assert sorted(p.name for p in splits["valid"]) == sorted(NOTES["nsynth-guitar-valid"])


def test_prepare_nsynth_offline_names_the_alternatives(tmp_path):
    """Without a reachable server, prepare_nsynth raises DataError that names --data synthetic and --data PATH."""
    with pytest.raises(DataError) as info:
        prepare_nsynth(tmp_path, url=closed_port_url("/NSYNTH_GUITAR_MP3.zip"), sha256="0" * 64)
    message = str(info.value)
    assert "--data synthetic" in message and "--data PATH" in message
    assert not (tmp_path / "NSYNTH_GUITAR_MP3").exists()


def test_corrupt_zip_with_matching_sha_fails_cleanly(server, tmp_path):
    """Bytes that are no zip (but match the sha256) make prepare_nsynth fail (after trying `zip -F` when zip is
    installed) without leaving an extracted or half-extracted folder."""
    junk = b"this is not a zip file\n" * 1000
    url = server.serve("/NSYNTH_GUITAR_MP3.zip", junk)
    expected = (DataError, subprocess.CalledProcessError) if shutil.which("zip") else DataError
    with pytest.raises(expected):
        prepare_nsynth(tmp_path, url=url, sha256=sha(junk))
    assert not (tmp_path / "NSYNTH_GUITAR_MP3").exists()
    assert not (tmp_path / "NSYNTH_GUITAR_MP3.extracting").exists()
    assert not (tmp_path / "NSYNTH_GUITAR_MP3-fixed.zip").exists()


def test_corrupt_zip_without_zip_tool_raises_data_error(tmp_path, monkeypatch):
    """When Python cannot read the zip and `zip` is not installed, extract_zip raises DataError saying to install it."""
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"not a zip")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="install zip"):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.extracting").exists()


def test_extract_zip_replaces_a_stale_temp_folder(tmp_path):
    """A leftover .extracting folder from an interrupted run is thrown away, not mixed into the result."""
    archive_bytes, files = nsynth_zip()
    archive = tmp_path / "a.zip"
    archive.write_bytes(archive_bytes)
    stale = tmp_path / "out.extracting"
    (stale / "nsynth-guitar-train").mkdir(parents=True)
    (stale / "nsynth-guitar-train" / "stale.wav").write_bytes(b"old")
    extract_zip(archive, tmp_path / "out")
    check_nsynth_folder(tmp_path / "out", files)
    assert not stale.exists()


# ----------------------------------------------------------------------------------------------------
# Codec weights

@pytest.fixture(scope="module")
def untrained_weights(tmp_path_factory) -> Path:
    """EnCodec 24 kHz's state dict with untrained (random) weights, saved with torch.save."""
    from encodec import EncodecModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.manual_seed(1)
        model = EncodecModel.encodec_model_24khz(pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "encodec_24khz.th"
    torch.save(model.state_dict(), path)
    return path


def test_codec_weights_from_local_file(untrained_weights):
    """Codec.pretrained(weights=PATH) loads exactly the saved tensors, at 2 levels for 1.5 kbps."""
    codec = Codec.pretrained(1.5, weights=untrained_weights)
    assert codec.levels == 2 and codec.kind == "pretrained" and codec.bandwidth == 1.5
    saved = torch.load(untrained_weights, map_location="cpu", weights_only=True)
    loaded = codec.model.state_dict()
    assert saved.keys() == loaded.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("kind", ["truncated", "text", "missing", "other-model"])
def test_unusable_codec_weights_raise_data_error(untrained_weights, tmp_path, kind):
    """A truncated weights file, a text file, a missing path, or another model's state dict raise DataError
    naming --codec-weights."""
    path = tmp_path / f"{kind}.th"
    if kind == "truncated":
        raw = untrained_weights.read_bytes()
        path.write_bytes(raw[:len(raw) // 2])
    elif kind == "text":
        path.write_text("these are not weights\n")
    elif kind == "other-model":
        torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(DataError, match="--codec-weights"):
        Codec.pretrained(1.5, weights=path)


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """torch.hub's cache in tmp_path (nothing is written to the real one)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_pretrained_download_with_wrong_hash_says_how_to_fix(server, local_hub, monkeypatch):
    """A served checkpoint whose sha256 does not start with d7cc33bc raises DataError naming --codec-weights and
    --codec untrained, and nothing is left in the hub cache."""
    import encodec.model
    payload = b"not the EnCodec weights" * 100
    assert not sha(payload).startswith("d7cc33bc")
    server.serve("/encodec/" + CHECKPOINT, payload)
    monkeypatch.setattr(encodec.model, "ROOT_URL", server.base + "/encodec/")
    with pytest.raises(DataError) as info:
        Codec.pretrained(1.5)
    message = str(info.value)
    assert "--codec-weights" in message and "--codec untrained" in message
    assert [r["path"] for r in server.requests] == ["/encodec/" + CHECKPOINT]
    assert not (local_hub / CHECKPOINT).exists()


@pytest.mark.parametrize("where", ["closed-port", "404"])
def test_pretrained_download_unreachable_says_how_to_fix(server, local_hub, monkeypatch, where):
    """An unreachable or missing checkpoint URL raises DataError naming --codec-weights and --codec untrained."""
    import encodec.model
    root = closed_port_url("/encodec/") if where == "closed-port" else server.base + "/nothing-here/"
    monkeypatch.setattr(encodec.model, "ROOT_URL", root)
    with pytest.raises(DataError) as info:
        Codec.pretrained(1.5)
    message = str(info.value)
    assert "--codec-weights" in message and "--codec untrained" in message
    assert not (local_hub / CHECKPOINT).exists()
