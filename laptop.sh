#!/usr/bin/env bash
# The laptop run: from a fresh clone to a page of guitar notes you can hear, at the pitches and velocities asked,
# offline once the packages are installed. The README gives its measured time; each stage below says what it costs
# and prints the time it took.
#
#     ./laptop.sh                  # Debian/Ubuntu: installs what is missing (apt-get as root or with sudo), then runs
#
# Six stages, each announced with what it costs: [1/6] the system's FluidSynth and SoundFonts, [2/6] the Python
# packages into .venv, [3/6] guitar notes rendered from the SoundFonts (prepare.py soundfont), [4/6] the codec
# (train_codec.py), [5/6] the language model on its codes (train.py), [6/6] 490 notes asked for, written to
# samples/index.html and measured (sample.py --report). Where FluidSynth or a SoundFont cannot be had, it says so in
# one line and goes on with synthetic notes (plucked strings made in Python) instead of guitars.
#
# Settings, from the environment:
#     PYTHON=path/to/python    use this interpreter as it is: no system packages, no venv, no pip
#     LAPTOP_DIR=folder        write data/, out-codec/, out/ and samples/ there (default: next to this script)
#     LAPTOP_TINY=1            every stage tiny (a few notes, a few steps): what tests/test_laptop.py runs
set -euo pipefail

ROOT=$(cd "$(dirname "$0")" && pwd)
WORK=${LAPTOP_DIR:-$ROOT}
mkdir -p "$WORK"
cd "$WORK"

# ----------------------------------------------------------------------------------------------------
# The recipe: each program's flags, once. LAPTOP_TINY appends flags after them (argparse keeps the last).

RENDER=(soundfont)                                    # 3,410 notes of 14 guitars into data/soundfont-guitar/
SYNTHETIC=(synthetic --notes 2000)                    # without FluidSynth: 2,000 plucked strings
GUITAR_DATA=(--data soundfont-guitar)
SYNTHETIC_DATA=(--data synthetic --synthetic-notes 2000)
CODEC=(--out-dir out-codec)                           # train_codec.py's defaults are the CPU recipe
LM=(--codec out-codec/codec.pt --pattern delay --dim 128 --depth 4 --heads 2 --batch-size 32 --max-iters 1200
    --eval-interval 300 --warmup-iters 30 --lr 1e-3)  # out/best.pt
SAMPLE=(--pitch 40-88 --velocity 25,50,75,100,127 --source acoustic,electronic --temperature 0.7 --report)
DEBIAN_PACKAGES="python3-venv libfluidsynth3 fluid-soundfont-gm timgm6mb-soundfont"

if [ -n "${LAPTOP_TINY:-}" ]; then
    RENDER+=(--programs 24 25 --pitches 40,64 --velocities 50,127)
    SYNTHETIC+=(--notes 24)
    SYNTHETIC_DATA+=(--synthetic-notes 24)
    CODEC+=(--max-iters 2 --eval-interval 2 --width 32 --batch-size 4 --seconds 0.4 --crop-frames 16 --crop-slack 4
            --eval-notes 2 --test-notes 3 --device cpu)
    LM+=(--dim 64 --depth 2 --heads 2 --dim-head 32 --batch-size 8 --max-iters 4 --eval-interval 2 --warmup-iters 1
         --seconds 0.4 --device cpu)
    SAMPLE+=(--pitch 40,64 --velocity 50,127 --device cpu)   # x acoustic,electronic: 8 notes
fi

# ----------------------------------------------------------------------------------------------------

STAGE_START=$SECONDS
stage() {   # stage N "what it does (what it costs)": the header, after the time the stage before took
    [ "$1" = 1 ] || echo "      ($(took "$STAGE_START"))"
    STAGE_START=$SECONDS
    echo
    echo "[$1/6] $2"
}
took() {    # took START: the seconds since START, as "42 s" or "3 min 5 s"
    local s=$((SECONDS - $1))
    if [ "$s" -lt 120 ]; then echo "$s s"; else echo "$((s / 60)) min $((s % 60)) s"; fi
}

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
    stage 1 "system packages: skipped (PYTHON=$PYTHON is used as it is)"
    stage 2 "Python packages: skipped"
else
    stage 1 "system packages: FluidSynth and two General MIDI SoundFonts (125 MB to download; none if installed) ..."
    if [ "$(uname -s)" = Darwin ]; then
        echo "macOS: this script installs no system packages; for guitar notes: brew install fluid-synth, and a" \
             "SoundFont (.sf2) in /usr/local/share/sounds/sf2 (or .venv/bin/pip install pretty_midi:" \
             "it carries TimGM6mb.sf2)"
    elif command -v apt-get >/dev/null && command -v dpkg >/dev/null; then
        missing=$(for p in $DEBIAN_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done | xargs)
        if [ -z "$missing" ]; then
            echo "installed already: $DEBIAN_PACKAGES"
        else
            if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi
            if [ "$sudo" = none ]; then
                echo "not root and no password-less sudo: install them yourself (sudo apt-get install $missing)"
            else
                echo "apt-get install $missing"
                ($sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing \
                    >/dev/null) || echo "could not install $missing (no network?): going on without them"
            fi
        fi
    else
        echo "no apt-get here: install FluidSynth and a General MIDI SoundFont with your system's packages"
    fi

    stage 2 "Python packages into .venv: PyTorch and the rest (1.3-2 min measured; seconds when installed) ..."
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { echo "error: codecgpt needs Python 3.10 or newer; python3 is $(python3 -V 2>&1)" >&2; exit 1; }
    [ -x "$ROOT/.venv/bin/python" ] || python3 -m venv "$ROOT/.venv"
    "$ROOT/.venv/bin/python" -m pip install -q -r "$ROOT/requirements.txt"
    PY=$ROOT/.venv/bin/python
fi

# Guitars where FluidSynth and a SoundFont can be had, synthetic notes where not (checked in a child process, as
# prepare.py renders: the library is never loaded where the models run)
if ! why=$("$PY" -c "import fluidsynth" 2>&1); then
    why="FluidSynth cannot be loaded (${why##*$'\n'})"
elif ! "$PY" -c "import sys; sys.path.insert(0, sys.argv[1]); import prepare; sys.exit(not prepare.find_soundfonts())" \
        "$ROOT"; then
    why="no SoundFont found"
else
    why=""
fi

if [ -z "$why" ]; then
    DATA=("${GUITAR_DATA[@]}")
    stage 3 "rendering guitar notes from the system's SoundFonts with FluidSynth into data/ (12-18 s measured) ..."
    "$PY" "$ROOT/prepare.py" "${RENDER[@]}"
else
    DATA=("${SYNTHETIC_DATA[@]}")
    stage 3 "making synthetic plucked-string notes into data/ (about 1 min) ..."
    echo "$why: going on with synthetic notes (plucked strings made in Python, not guitars); for guitars:" \
         "sudo apt-get install libfluidsynth3 fluid-soundfont-gm timgm6mb-soundfont (macOS: brew install fluid-synth)"
    "$PY" "$ROOT/prepare.py" "${SYNTHETIC[@]}"
fi

stage 4 "training the codec into out-codec/ (7-12 min measured; it prints its own estimate after its first steps) ..."
"$PY" "$ROOT/train_codec.py" "${DATA[@]}" "${CODEC[@]}"

stage 5 "encoding the notes with it, then training the language model into out/ (6-8 min measured, both) ..."
"$PY" "$ROOT/train.py" "${DATA[@]}" "${LM[@]}"

stage 6 "sampling the notes asked for into samples/ and measuring their pitch and loudness (1.5-3 min measured) ..."
report=$(mktemp)
trap 'rm -f "$report"' EXIT
PYTHONUNBUFFERED=1 "$PY" "$ROOT/sample.py" "${SAMPLE[@]}" | tee "$report"
echo "      ($(took "$STAGE_START"))"

echo
if [ -z "$why" ]; then notes="guitar notes rendered from SoundFonts"; else notes="synthetic notes: $why"; fi
echo "done in $(took 0), on $notes"
echo "page: $WORK/samples/index.html"
grep -E "^(pitch accuracy|loudness vs velocity|median)" "$report" | sed "s/^/report: /"
