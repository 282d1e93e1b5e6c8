""".ci/gpu, the one-shot GPU check, tested where there is no GPU: `.ci/gpu --cpu` runs its every step on the CPU
(the CUDA tests skip, the bench runs at tiny sizes), so that the GPU's rare minutes are not spent on the script."""
import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from conftest import ROOT

SCRIPT = ROOT / ".ci" / "gpu"


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_and_writes_its_files(tmp_path):
    """.ci/gpu --cpu passes, writes exactly its log, pytest report and bench rows under $OUT, skips every CUDA test
    with the reason, measures every part of the bench, and ends with the summary."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    result = subprocess.run([str(SCRIPT), "--cpu"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "gpu-check.log", "pytest-cuda.xml"]
    log = (out / "gpu-check.log").read_text()
    assert log == result.stdout                     # everything it printed, stderr included, is in the log

    cases = list(ET.parse(out / "pytest-cuda.xml").getroot().iter("testcase"))
    assert len(cases) >= 18 and all(case.get("classname") == "tests.test_cuda" for case in cases)
    assert all("needs a CUDA GPU" in case.find("skipped").get("message") for case in cases)
    assert f"pytest -m cuda: 0 passed, 0 failed, 0 errors, {len(cases)} skipped" in log

    rows = json.loads((out / "bench.json").read_text())["rows"]
    sections = {row["section"] for row in rows}
    assert {"sample b1", "sample b4", "train tiny dim 64 depth 2 b4", "encode synthetic 2 s notes",
            "codec train"} <= sections
    assert all(math.isfinite(row[row["unit"]]) and row[row["unit"]] > 0 for row in rows)
    assert f"bench: {len(rows)} rows" in log
    for line in ("targets on one H100", "decoding at batch 1", "codec training, small", "encoding (encode_files",
                 "GPU check (cpu): PASSED"):
        assert line in log, line


def test_gpu_check_refuses_an_unknown_flag():
    result = subprocess.run([str(SCRIPT), "--gpu"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--gpu" in result.stderr and "--cpu" in result.stderr


def test_summary_judges_the_targets_on_a_gpu(tmp_path):
    """.ci/gpu_summary.py on a GPU run's files: every target met or missed by its own number, a missed speed target
    reported but not failed, a CUDA test skipped on a GPU failed."""
    row = lambda section, name, unit, value, **kw: {"section": section, "name": name, "unit": unit, unit: value, **kw}
    rows = [row("train reference b125", "x-transformers float32", "tokens/s", 1000.0),
            row("train reference b125", "x-transformers bfloat16 attn_flash", "tokens/s", 2500.0),
            row("train reference b125", "codecgpt fused bfloat16", "tokens/s", 4000.0, mfu=0.2),
            row("sample b1", "codecgpt generate (compiled decode)", "tokens/s", 3500.0),
            row("sample b256", "codecgpt generate (compiled decode)", "tokens/s", 150_000.0),
            row("encode synthetic 4 s notes", "codecgpt encode_files (batched)", "notes/s", 500.0)]
    (tmp_path / "bench.json").write_text(json.dumps({"rows": rows, "machine": {"gpu": "NVIDIA H100"}}))

    def summary(skipped: int) -> subprocess.CompletedProcess:
        (tmp_path / "pytest-cuda.xml").write_text(f'<testsuites><testsuite tests="18" failures="0" errors="0" '
                                                  f'skipped="{skipped}"/></testsuites>')
        return subprocess.run([sys.executable, str(ROOT / ".ci" / "gpu_summary.py"), "gpu", str(tmp_path),
                               "11 installed", "0", "0", "200", "0", "150", "400"], capture_output=True, text=True)
    result = summary(skipped=0)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "targets on one H100 (NVIDIA H100: 3 of 5 met):" in lines
    assert any("vs x-transformers float32: 4.00x (target 3x): met" in line for line in lines)
    assert any("attn_flash under bf16 autocast: 1.60x (target 1.5x): met" in line for line in lines)
    assert any("decoding at batch 256" in line and "150,000 tokens/s (target 200,000 tokens/s): MISSED" in line
               for line in lines)
    assert any("encoding" in line and "MISSED" in line for line in lines)
    assert lines[-1] == "GPU check (gpu): PASSED in 400 s"
    result = summary(skipped=2)
    assert result.returncode == 1 and "2 of 18 CUDA tests skipped on a GPU" in result.stdout.splitlines()[-1]
