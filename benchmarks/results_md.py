"""benchmarks/RESULTS.md is shared by every script: each owns one section between its markers."""
from __future__ import annotations

import datetime as dt
import os
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


def publish(out: Path | None, section: str, title: str, method: str, table: str, cpu: bool) -> None:
    """Print `table`; unless `out` is None, write it as section `section` under `title`, after a line
    naming the card (or the CPU smoke run), the time, torch, the commit and `method`."""
    import torch

    print(table)
    if out is None:
        return
    name = torch.cuda.get_device_name() if not cpu else "cpu (times mean nothing)"
    body = (f"## {title}\n\n{name}, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
            f"commit {os.environ.get('ATLAS_FAST_COMMIT', 'unknown')}; {method}\n\n{table}\n")
    write_section(out, section, body)
    print(f"wrote {out}")
