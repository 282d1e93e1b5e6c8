""".ci/gpu, the one-shot GPU check, tested where there is no GPU: `.ci/gpu --cpu` runs its every step on the CPU
(the CUDA tests skip, the bench runs at tiny sizes), so that the GPU's rare minutes are not spent on the script."""
import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

from conftest import ROOT

SCRIPT = ROOT / ".ci" / "gpu"


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
    assert {"sample b1", "sample b4", "train tiny dim 64 depth 2 b4", "encode synthetic 2 s notes"} <= sections
    assert all(math.isfinite(row[row["unit"]]) and row[row["unit"]] > 0 for row in rows)
    assert f"bench: {len(rows)} rows" in log
    for line in ("targets of issue 11 on one H100", "decoding at batch 1", "encoding (encode_files",
                 "GPU check (cpu): PASSED"):
        assert line in log, line


def test_gpu_check_refuses_an_unknown_flag():
    result = subprocess.run([str(SCRIPT), "--gpu"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--gpu" in result.stderr and "--cpu" in result.stderr
