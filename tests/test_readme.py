"""The README's pointers into the code stay true: every `file.py:LINE` (`name`) it gives lands on a line that holds
that name, so the "Where to look first" answers cannot silently go stale when code moves."""
import re

from conftest import ROOT

POINTER = re.compile(r"`(\w+\.py):(\d+)` \(`([\w.]+)`\)")


def test_readme_line_pointers_land_on_what_they_name():
    readme = (ROOT / "README.md").read_text()
    pointers = POINTER.findall(readme)
    assert len(pointers) >= 5, "the 'Where to look first' table lost its file:line answers"
    for file, line, name in pointers:
        lines = (ROOT / file).read_text().splitlines()
        assert int(line) <= len(lines), f"{file}:{line} is past the end of the file"
        text = lines[int(line) - 1]
        assert name.split(".")[-1] in text, f"README says {file}:{line} holds {name}, but that line is: {text.strip()}"
