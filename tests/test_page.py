"""The samples page that every sample.py run writes (page.py), notes at several velocities, and the page opened in a
real browser (headless Chromium): every player and picture resolves, hostile file names included."""
import argparse
import functools
import html.parser
import http.server
import re
import shutil
import threading
from urllib.parse import unquote

import pytest
import soundfile as sf
import torch

import cli
import data
import sample
from conftest import run
from model import GPT

# the stem of a prompt file, so of every note continued from it: quotes, <, &, an entity, spaces, non-ASCII, % and #
HOSTILE = "it's <b>&amp; \"loud\" ü 音 100% #1"
TAGS = {"html", "head", "meta", "link", "title", "style", "body", "h1", "p", "div", "code", "table", "thead", "tbody",
        "tr", "th", "td", "a", "audio", "img", "small", "span", "br"}  # every tag page.py writes, and no other


class PageParser(html.parser.HTMLParser):
    """What a browser would see in the page: its tags, rows, links and text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags, self.rows, self.text = set(), 0, []
        self.links = {"audio": [], "img": [], "a": [], "link": []}
        self.feed(text)
        self.text = "".join(self.text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.rows += tag == "tr" and attrs.get("id", "").startswith("note")
        for name in ("src", "href"):
            if tag in self.links and name in attrs:
                self.links[tag].append(attrs[name])

    def handle_data(self, data):
        self.text += [data]


@pytest.fixture(scope="module")
def hostile_run(trained, tmp_path_factory, synthetic_folder):
    """sample.py continuing a prompt with a hostile name at 2 pitches x 2 velocities, with --report, into a folder
    whose name is hostile too: (the folder, the completed process)."""
    work, out, _ = trained
    folder = tmp_path_factory.mktemp("page") / "samples <&> ü"
    prompt = folder.parent / f"{HOSTILE}.wav"
    shutil.copy(data.find_audio(synthetic_folder)[0], prompt)
    result = run("sample.py", "--ckpt", str(out / "best.pt"), "--prompt", str(prompt), "--prompt-seconds", "0.2",
                 "--pitch", "50,62", "--velocity", "25,127", "--report", "--out-dir", str(folder), "--device", "cpu",
                 cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    return folder, result


@pytest.mark.slow
def test_every_pitch_at_every_velocity_named_after_both(hostile_run):
    folder, result = hostile_run
    wavs = sorted(p.name for p in folder.glob("*.wav"))
    assert wavs == sorted(f"continue_{HOSTILE}_pitch{p}_vel{v}.wav" for p in (50, 62) for v in (25, 127))
    assert sorted(p.name for p in folder.glob("*.png")) == [w.replace(".wav", ".png") for w in wavs]
    # (the notes continue one prompt, so their attacks are the same audio: equally loud, the correlation is nan)
    assert re.search(r"pitch accuracy: \d of 4 within 50 cents\nloudness vs velocity: rank correlation "
                     r"(-?\d\.\d\d|nan) over 4 notes( \(undefined.*\))?\n", result.stdout), result.stdout


@pytest.mark.slow
def test_each_note_gets_its_own_pitch_and_velocity_tokens(trained, tmp_path, monkeypatch):
    """The prompts that reach generate, in the order of the files: the pitch and velocity tokens step with the
    files' names (62 - 50 = 12 ids apart, 127 - 25 = 102 ids apart)."""
    _, out, _ = trained
    prompts = []
    generate = GPT.generate

    def recording(self, prompt, *args, **kwargs):
        prompts.append(prompt.clone())
        return generate(self, prompt, *args, **kwargs)
    monkeypatch.setattr(GPT, "generate", recording)
    args = sample.parse_args(["--ckpt", str(out / "best.pt"), "--pitch", "50,62", "--velocity", "25,127,25",
                              "--out-dir", str(tmp_path), "--device", "cpu", "--batch-size", "3"])
    paths = sample.sample(args)
    assert [p.name for p in paths] == [f"sample_pitch{p}_vel{v}.wav" for p in (50, 62) for v in (25, 127)]
    *notes, first_sound = prompts   # the last generate: the first-100-ms measure, the last batch's first note
    assert torch.equal(first_sound, notes[-1][:1])
    conditions = torch.cat(notes)[:, 1:3]  # after BOS: pitch, velocity
    pitch, velocity = (conditions - conditions[0]).T.tolist()
    assert pitch == [0, 0, 12, 12] and velocity == [0, 102, 0, 102]


@pytest.mark.slow
def test_bad_velocity_lists_name_the_flag(trained, tmp_path):
    for value in ("25,x", "25,200", "-", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="velocity"):
            cli.velocities(value)
    assert cli.velocities("127,25-27,25") == [127, 25, 26, 27]  # in the order given, each once
    work, out, _ = trained
    result = run("sample.py", "--ckpt", str(out / "best.pt"), "--velocity", "25,200", "--out-dir", str(tmp_path),
                 cwd=work)
    assert result.returncode != 0 and "--velocity" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_page_lists_every_note_with_escaped_names_and_relative_links(hostile_run):
    folder, _ = hostile_run
    page = PageParser((folder / "index.html").read_text(encoding="utf-8"))
    wavs = sorted(p.name for p in folder.glob("*.wav"))
    assert page.tags <= TAGS, page.tags - TAGS           # a name's "<b>" stayed text, it made no tag
    assert page.rows == 4
    assert sorted(map(unquote, page.links["audio"])) == wavs == sorted(set(map(unquote, page.links["a"])))
    assert sorted(map(unquote, page.links["img"])) == [w.replace(".wav", ".png") for w in wavs]
    for link in page.links["audio"] + page.links["img"] + page.links["a"]:
        assert re.fullmatch(r"[A-Za-z0-9_.~%-]+", link), link  # a bare, percent-encoded file name: relative
    for name in wavs:
        assert name in page.text
    assert "samples <&> ü" in page.text                  # the folder, in the title
    assert re.search(r"pitch accuracy: \d of 4 within 50 cents", page.text)
    assert re.search(r"loudness vs velocity: rank correlation (-?\d\.\d\d|nan) over 4 notes", page.text)
    for asked in ("pitch 50 (D3, 146.8 Hz)", "pitch 62 (D4, 293.7 Hz)", "velocity 25", "velocity 127", "cfg 3",
                  "temperature 1", "seed 0", "best.pt", f"{HOSTILE}.wav (first 0.2 s)"):
        assert asked in page.text, asked
    assert page.text.count("attack ") == 4 and page.text.count(" dBFS") == 8  # measured: peak and attack levels


@pytest.mark.slow
def test_a_run_without_report_still_gets_a_page_with_pictures(trained, tmp_path):
    """Unmeasured notes keep their old names (sample_0.wav ...), get a spectrogram each, and the page says how to
    measure them."""
    work, out, _ = trained
    result = run("sample.py", "--ckpt", str(out / "best.pt"), "--num-samples", "2", "--velocity", "100",
                 "--out-dir", str(tmp_path), "--device", "cpu", cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "sample_0.png", "sample_0.wav",
                                                           "sample_1.png", "sample_1.wav"]
    page = PageParser((tmp_path / "index.html").read_text(encoding="utf-8"))
    assert page.rows == 2 and page.links["img"] == ["sample_0.png", "sample_1.png"]
    assert "Not measured" in page.text and "velocity 100" in page.text and "pitch unknown" in page.text
    assert f"listen: {tmp_path / 'index.html'}" in result.stdout


# ----------------------------------------------------------------------------------------------------
# In a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the flags that let Chromium run here as root without a network: no sandbox, no GPU, no calls home
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    def log_request(self, code="-", size="-"):
        self.server.requests.append((unquote(self.path.lstrip("/")), int(code)))

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium not found: apt-get install chromium (Debian), or your system's chromium package")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements-dev.txt)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


AUDIO_DURATIONS = """async () => Promise.all([...document.querySelectorAll('audio')].map(a => a.readyState >= 1
    ? a.duration
    : new Promise(done => { a.onloadedmetadata = () => done(a.duration); a.onerror = () => done(-1);
                            setTimeout(() => done(-2), 15000); })))"""
IMAGES = "[...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight])"


def check_in_browser(browser, url: str, notes: int, seconds: float) -> object:
    """Open url; every image must have decoded and every player must know its note's length. Returns the page."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    failed = []
    page.on("requestfailed", lambda request: failed.append(request.url))
    page.goto(url, wait_until="load")
    assert page.locator("tbody tr").count() == notes
    images = page.evaluate(IMAGES)
    assert len(images) == notes and all(done and width > 0 and height > 0 for _, done, width, height in images), images
    durations = page.evaluate(AUDIO_DURATIONS)
    assert durations == pytest.approx([seconds] * notes, abs=0.01), durations
    assert not failed, failed
    return page


@pytest.mark.slow
def test_page_in_headless_chromium(browser, hostile_run, tmp_path):
    """Served over HTTP: every request the page makes is answered 200 (no 404) and covers every WAV and PNG. Opened
    from the file system: the same players and pictures work. A screenshot of the whole page is saved."""
    folder, _ = hostile_run
    seconds = sf.info(next(folder.glob("*.wav"))).duration
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RecordingHandler, directory=folder))
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = check_in_browser(browser, f"http://127.0.0.1:{server.server_port}/index.html", 4, seconds)
        page.close()
    finally:
        server.shutdown()
        server.server_close()
    assert {status for _, status in server.requests} == {200}, server.requests
    files = {p.name for p in folder.iterdir() if p.suffix in (".wav", ".png")} | {"index.html"}
    assert {path for path, _ in server.requests} == files

    page = check_in_browser(browser, (folder / "index.html").as_uri(), 4, seconds)
    screenshot = tmp_path / "samples-page.png"
    page.screenshot(path=screenshot, full_page=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
    print(f"\nscreenshot of the samples page: {screenshot}")
