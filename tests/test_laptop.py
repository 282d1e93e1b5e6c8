"""The README's first command (laptop.sh) run as it is, at a tiny size (LAPTOP_TINY: a few notes, a few steps, the same
programs and flags otherwise), so that a change that breaks the README's command breaks a test: every stage
announced, the samples page written, the report's lines printed; where FluidSynth cannot be loaded, one line saying
so and the same run on synthetic notes. And the README says what the script runs: its first block is the script,
and the commands listed under it carry the script's flags."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from test_soundfont import fluidsynth_missing

SCRIPT = ROOT / "laptop.sh"
TINY_NOTES = 2 * 2 * 2           # LAPTOP_TINY asks for pitches 40,64 x velocities 50,127 x acoustic,electronic
FALLBACK = "going on with synthetic notes"


def run_laptop(work: Path, **env: str) -> subprocess.CompletedProcess:
    """laptop.sh as the README runs it (the file itself, executable), on this Python, tiny, writing into work."""
    env = {**os.environ, "PYTHON": sys.executable, "LAPTOP_TINY": "1", "LAPTOP_DIR": str(work), **env}
    return subprocess.run([str(SCRIPT)], cwd=work.parent, env=env, capture_output=True, text=True, timeout=600)


def repo_outputs() -> dict:
    """The modification times of the folders the script writes by default in the clone (None where absent)."""
    return {name: (ROOT / name).stat().st_mtime_ns if (ROOT / name).exists() else None
            for name in ("data", "out-codec", "out", "samples")}


def assert_ran_to_the_page(result: subprocess.CompletedProcess, work: Path) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    headers = [out.find(f"\n[{n}/6] ") for n in range(1, 7)]
    assert -1 not in headers and headers == sorted(headers), "the six stages are not all announced, in order"
    page = work / "samples" / "index.html"
    assert page.is_file() and f"page: {page}" in out
    assert page.read_text().count("<audio") == TINY_NOTES
    assert len(list((work / "samples").glob("sample_pitch*_vel*_*.wav"))) == TINY_NOTES
    tail = out[out.rindex("\ndone in "):]       # the closing lines: the page and the report's
    assert re.search(rf"^report: pitch accuracy: \d+ of {TINY_NOTES} within 50 cents$", tail, re.M), tail
    assert re.search(rf"^report: loudness vs velocity: rank correlation -?[\d.]+ over {TINY_NOTES} notes$", tail,
                     re.M), tail
    assert (work / "out-codec" / "codec.pt").is_file() and (work / "out" / "best.pt").is_file()
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(fluidsynth_missing() is not None, reason=str(fluidsynth_missing()))
def test_the_laptop_run_renders_guitars_and_ends_at_the_page(tmp_path):
    before = repo_outputs()
    result = run_laptop(tmp_path / "laptop")
    assert_ran_to_the_page(result, tmp_path / "laptop")
    assert FALLBACK not in result.stdout
    assert (tmp_path / "laptop" / "data" / "soundfont-guitar" / "complete.json").is_file()
    assert "on guitar notes rendered from SoundFonts" in result.stdout
    assert repo_outputs() == before, "laptop.sh wrote into the clone despite LAPTOP_DIR"


@pytest.mark.slow
def test_without_fluidsynth_it_says_so_in_one_line_and_goes_on_with_synthetic_notes(tmp_path):
    fake = tmp_path / "fake"        # as tests/test_soundfont.py: the binding fails as it does without the library
    fake.mkdir()
    (fake / "fluidsynth.py").write_text('raise ImportError("Couldn\'t find the FluidSynth library.")\n')
    result = run_laptop(tmp_path / "laptop", PYTHONPATH=str(fake))
    assert_ran_to_the_page(result, tmp_path / "laptop")
    (line,) = [line for line in result.stdout.splitlines() if FALLBACK in line]
    assert line.startswith("FluidSynth cannot be loaded") and "libfluidsynth3" in line
    assert not (tmp_path / "laptop" / "data" / "soundfont-guitar").exists()
    assert list((tmp_path / "laptop" / "data").glob("synthetic-*/complete.json"))


def shell_array(name: str) -> list[str]:
    """The words of laptop.sh's first `NAME=(...)` (comments left out)."""
    text = SCRIPT.read_text()
    match = re.search(rf"^{name}=\((.*?)\)", re.sub(r"#.*", "", text), re.M | re.S)
    assert match, f"laptop.sh has no {name}=(...)"
    return match.group(1).split()


def test_the_readme_opens_with_laptop_sh_and_lists_what_it_runs():
    """The README's first block is the script, and the commands it lists under it (whose results it reports) ask
    each program for the same settings as the script does."""
    import sample
    import train
    import train_codec
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    assert blocks[0].strip() == "./laptop.sh", "the README's first command is not the laptop run"
    assert blocks[1].strip().endswith("-m pytest -q"), "the README's second command is not the test command"
    assert os.access(SCRIPT, os.X_OK), "laptop.sh is not executable: ./laptop.sh fails"
    (stages,) = [block for block in blocks if "prepare.py soundfont" in block]
    listed = re.sub(r"#.*", "", stages).replace("\\\n", " ")
    commands = {line.split()[1]: line.split()[2:] for line in listed.splitlines() if line.strip()}
    assert commands["prepare.py"] == shell_array("RENDER")
    guitars = shell_array("GUITAR_DATA")
    for program, parse, words in (("train_codec.py", train_codec.parse_args, guitars + shell_array("CODEC")),
                                  ("train.py", train.parse_args, guitars + shell_array("LM")),
                                  ("sample.py", sample.parse_args, shell_array("SAMPLE"))):
        assert parse(commands[program]) == parse(words), \
            f"the README lists {program} {' '.join(commands[program])}; laptop.sh runs it with {' '.join(words)}"
