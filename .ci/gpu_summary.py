"""The end of .ci/gpu: the check's verdict and the key numbers against the targets on one H100 (docs/gpu.md).

    python .ci/gpu_summary.py MODE DEST WHEELS IMPORT_RC PYTEST_RC PYTEST_S BENCH_RC BENCH_S TOTAL_S

reads DEST/pytest-cuda.xml and DEST/bench.json, which .ci/gpu's steps wrote, and the exit statuses and seconds of
those steps; prints the summary and exits 1 if a step failed (a missed speed target is reported, not failed)."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

mode, dest, wheels, import_rc, pytest_rc, pytest_s, bench_rc, bench_s, total_s = sys.argv[1:]
dest, problems = Path(dest), []
if wheels == "FAILED":
    problems.append("the wheels did not install")
if import_rc != "0":
    problems.append("packages are missing")

counts = dict(tests=0, failures=0, errors=0, skipped=0)
try:
    for suite in ET.parse(dest / "pytest-cuda.xml").getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
except (OSError, ET.ParseError) as e:
    problems.append(f"no pytest report ({e})")
passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
LIMIT = "124"   # timeout's exit status when it stopped a step
print(f"pytest -m cuda: {passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
      f"{counts['skipped']} skipped in {pytest_s} s (exit {pytest_rc}"
      + (", stopped at its time limit)" if pytest_rc == LIMIT else ")"))
if pytest_rc == LIMIT:
    problems.append("pytest -m cuda ran out of time (the report holds the tests that finished)")
elif pytest_rc != "0" or counts["failures"] or counts["errors"]:
    problems.append("CUDA tests failed")
if mode == "gpu" and (counts["skipped"] or not counts["tests"]):
    problems.append(f"{counts['skipped']} of {counts['tests']} CUDA tests skipped on a GPU")

try:
    bench = json.loads((dest / "bench.json").read_text())
except (OSError, ValueError) as e:
    bench = {"rows": []}
    problems.append(f"no bench rows ({e})")
rows = bench["rows"]
print(f"bench: {len(rows)} rows in {bench_s} s (exit {bench_rc}"
      + (", stopped at its time limit)" if bench_rc == LIMIT else ")"))
if bench_rc != "0":
    problems.append("the bench ran out of time" if bench_rc == LIMIT else "the bench failed")


def find(section_prefix, name=None):
    """Rows of the first section whose name starts with section_prefix (by name, or all of them)."""
    sections = [r["section"] for r in rows if r["section"].startswith(section_prefix)]
    found = [r for r in rows if sections and r["section"] == sections[0] and (name is None or r["name"] == name)]
    return found


def speed(row):
    return row[row["unit"]]


judged = mode == "gpu"
met, lines = 0, []


def target(label, value, goal, unit):
    global met
    if value is None:
        lines.append(f"  {label}: not measured (target {goal:,g}{unit})")
        return
    ok = value >= goal
    met += ok
    verdict = ("met" if ok else "MISSED") if judged else "not judged on a CPU"
    lines.append(f"  {label}: {value:,.{0 if value >= 100 else 2}f}{unit} (target {goal:,g}{unit}): {verdict}")


train = find("train reference") or find("train")
ours = [r for r in train if r["name"].startswith("codecgpt")]
best = max((r for r in ours if "bfloat16" in r["name"]), key=speed, default=None) or max(ours, key=speed, default=None)
xt32 = next((r for r in train if r["name"] == "x-transformers float32"), None)
xtbf = next((r for r in train if r["name"] == "x-transformers bfloat16 attn_flash"), None)
where = f"{train[0]['section']}, {best['name']}" if best else "training"
target(f"training ({where}) vs x-transformers float32", speed(best) / speed(xt32) if best and xt32 else None, 3, "x")
target("  the same vs x-transformers attn_flash under bf16 autocast",
       speed(best) / speed(xtbf) if best and xtbf else None, 1.5, "x")
mfu = [f"{r['section'].removeprefix('train ')}: {r['mfu']:.1%}" for r in rows
       if r["name"] == (best or {}).get("name") and r.get("mfu") is not None]
if mfu:
    lines.append(f"  MFU of {best['name']} (of an H100's 989 TFLOP/s bf16): " + ", ".join(mfu))
batches = sorted({int(r["section"].split(" b")[1]) for r in rows if r["section"].startswith("sample b")})
for batch, goal in zip(batches[:1] + batches[1:][-1:], (3000, 200_000)):
    rows_b = find(f"sample b{batch}")
    pick = next((r for r in rows_b if r["name"] == "codecgpt generate (compiled decode)"), None) or \
        next((r for r in rows_b if r["name"] == "codecgpt generate (KV cache)"), None)
    target(f"decoding at batch {batch} ({pick['name'] if pick else 'codecgpt'})", speed(pick) if pick else None,
           goal, " tokens/s")
for row in rows:   # every weight format, eager and as a CUDA graph, against its matrix products' floor: no target yet
    if row["section"].startswith("sample b") and row.get("floor_share") is not None:
        lines.append(f"  {row['section']}, {row['name']}: {speed(row):,.0f} tokens/s, "
                     f"{row['floor_share']:.0%} of its floor")
encode = find("encode synthetic")
pick = next((r for r in encode if r["name"] == "codecgpt encode_files (batched)"), None)
target("encoding (encode_files: read, resample, encode)", speed(pick) if pick else None, 1000, " notes/s")
alone = next((r for r in encode if r["name"].startswith("codec.encode only")), None)
if alone:
    lines.append(f"  (the codec alone, audio already read: {speed(alone):,.0f} notes/s)")

for row in rows:   # the codec trained here (train_codec.py): no target yet, the first numbers on a GPU
    if row["section"] == "codec train":
        lines.append(f"  codec training, {row['name']}: {speed(row):,.2f} steps/s (train_codec.py's batch)")

machine = bench.get("machine", {})
print(f"targets on one H100 ({machine.get('gpu') or machine.get('cpu', '?')}"
      + (f": {met} of 5 met" if judged else "; this is a CPU run") + "):")
print("\n".join(lines))
print(f"GPU check ({mode}): {'PASSED' if not problems else 'FAILED: ' + '; '.join(problems)} in {total_s} s")
sys.exit(1 if problems else 0)
