"""The coverage matrix as a markdown table: every family in tests/hf_zoo.py x every stage.

    python benchmarks/coverage.py [--arch gpt2,llama] [--stage fuse,tvm] [--jobs 2] [--readme README.md]

Each family runs in its own process (tests/coverage_stages.py does the work, the same functions as
tests/test_coverage_matrix.py). A cell is "ok", or "no" with a numbered note: the reason, which for
a cell in LIMITATIONS names the underlying tool's limitation. `--readme` rewrites the table between
the `<!-- coverage:begin -->` and `<!-- coverage:end -->` lines of that file (atomically).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"


def run_arch(arch: str, stages: list[str]) -> dict:
    """Every stage of one family, in this process: {stage: {"ok", "detail", "seconds"}}."""
    from optpipe.errors import first_line
    from tests import coverage_stages as cs

    cells = {}
    for stage in stages:
        if not cs.applies(arch, stage):
            continue
        t = time.perf_counter()
        try:
            cells[stage] = {"ok": True, "detail": cs.RUN[stage](arch)}
        except Exception as e:  # noqa: BLE001 -- a cell's failure is data here, not a crash
            reason = cs.LIMITATIONS.get((arch, stage)) or first_line(e)
            cells[stage] = {"ok": False, "detail": reason[:240]}
        cells[stage]["seconds"] = round(time.perf_counter() - t, 1)
    return cells


def _in_subprocess(arch: str, stages: list[str], timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", arch, "--stage", ",".join(stages)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {s: {"ok": False, "detail": f"timed out after {timeout} s"} for s in stages}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {s: {"ok": False, "detail": f"worker crashed: {tail[:200]}"} for s in stages}
    return json.loads(lines[-1])


def markdown(results: dict[str, dict], stages: list[str]) -> str:
    from tests import coverage_stages as cs

    notes: list[str] = []
    head = "| architecture | " + " | ".join(cs.STAGE_TITLES[s] for s in stages) + " |"
    rows = [head, "|" + "---|" * (len(stages) + 1)]
    for arch, cells in results.items():
        row = []
        for stage in stages:
            cell = cells.get(stage)
            if cell is None:
                row.append("—")
            elif cell["ok"]:
                row.append("ok")
            else:
                if cell["detail"] not in notes:
                    notes.append(cell["detail"])
                row.append(f"no ({notes.index(cell['detail']) + 1})")
        rows.append(f"| {arch} | " + " | ".join(row) + " |")
    footer = [f"{i}. {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(rows + ([""] + footer if footer else []))


def write_readme(path: Path, table: str) -> None:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(
            f"coverage: {path} has no {BEGIN} ... {END} block (hint: add the two lines where the table goes)"
        )
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(f"{before}{BEGIN}\n{table}\n{END}{after}")
    os.replace(tmp, path)


def main() -> None:
    from tests import coverage_stages as cs
    from tests import hf_zoo

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=",".join(hf_zoo.ARCHS))
    ap.add_argument("--stage", default=",".join(cs.STAGES))
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per family")
    ap.add_argument("--readme", type=Path, help="rewrite the table in this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    stages = args.stage.split(",")
    if args.worker:
        print(json.dumps(run_arch(args.worker, stages)))
        return
    archs = args.arch.split(",")
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {a: pool.submit(_in_subprocess, a, stages, args.timeout) for a in archs}
        results = {a: futures[a].result() for a in archs}
    table = markdown(results, stages)
    print(table)
    if args.readme:
        write_readme(args.readme, table)
    failed = sum(not c["ok"] and (a, s) not in cs.LIMITATIONS for a, cells in results.items() for s, c in cells.items())
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
