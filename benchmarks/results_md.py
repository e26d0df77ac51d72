"""benchmarks/RESULTS.md is shared by every script: each owns one section between its markers."""
from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(path: Path, name: str, body: str) -> None:
    """Replace section `name` of the file (markers included), or append it; others stay as they are."""
    start_mark, end_mark = markers(name)
    block = f"{start_mark}\n{body.rstrip()}\n{end_mark}\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    start, end = text.find(start_mark), text.find(end_mark)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(end_mark):].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
