"""``python -m benchmarks.record OUT``: turn what ``benchmarks/gpu.sh`` wrote into the RESULTS.md section.

OUT is the folder the run's files came back in (the device tool's ``files_at``), or sweep JSON
files. The stages' reports (``headline/*.json`` first, then ``rest/*.json``) are merged into one,
saved as ``benchmarks/results/<device>-<date>.{json,md}`` with its chart in
``benchmarks/charts/<device>-<date>.png`` (``results/*.png``, which every sweep rewrites, are
git-ignored; a recorded chart is meant to be committed), and written into ``benchmarks/RESULTS.md``
as a section with the card, date, versions, the test stage's summary, the chart and one table per
case. Recording the same device and date again replaces that section;
a GPU section also replaces the "not run yet" placeholder. Nothing here measures anything.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import List, Optional

from .report import LEGEND, _environment_lines, case_tables, plot, write_all

HERE = Path(__file__).resolve().parent
STAGES = ("headline", "rest")  # gpu.sh's sweep stages, in the order they ran
PLACEHOLDER = "## GPU"  # RESULTS.md's section while no GPU run is recorded


def find_reports(paths: List[Path]) -> List[Path]:
    """JSON reports under ``paths``: in a gpu.sh folder the stages in run order, else the files given."""
    found = []
    for path in paths:
        if path.is_dir():
            staged = [p for stage in STAGES for p in sorted((path / stage).glob("*.json"))]
            found += staged or sorted(path.glob("*.json"))
        else:
            found.append(path)
    if not found:
        raise SystemExit(f"no sweep JSON found in {', '.join(map(str, paths))}")
    return found


def merge(reports: List[dict]) -> dict:
    """One report: the first one's environment (wall time summed over all), every case in order."""
    first = reports[0]["environment"]
    for other in reports[1:]:
        env = other["environment"]
        if (env["device"], env["versions"]) != (first["device"], first["versions"]):
            raise SystemExit(f"reports from different runs: {first['device']} {first['versions']} vs "
                             f"{env['device']} {env['versions']}")
    environment = dict(first, wall_s=round(sum(r["environment"].get("wall_s") or 0 for r in reports), 1),
                       load_average_end=reports[-1]["environment"].get("load_average_end"))
    return dict(environment=environment, cases=[entry for r in reports for entry in r["cases"]])


def test_summary(folder: Optional[Path]) -> Optional[str]:
    """pytest's closing line from gpu_tests.log ('24 passed in 81.3s'), with the failures' names."""
    log = folder / "gpu_tests.log" if folder else None
    if log is None or not log.exists():
        return None
    text = log.read_text(errors="replace")
    closing = re.findall(r"^=*\s*(\d+ (?:passed|failed|error).*?)\s*=*$", text, re.M)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    if closing:
        summary = closing[-1]
    else:  # stopped by its time limit: count the verdicts -v printed so far
        verdicts = re.findall(r"^\S+::\S+ (PASSED|FAILED|ERROR)", text, re.M)
        summary = (", ".join(f"{verdicts.count(v)} {v.lower()}" for v in ("PASSED", "FAILED", "ERROR"))
                   + " before its time limit stopped it (no closing line)")
    return summary + "".join(f"; failed: {name}" for name in failed)


def card(folder: Optional[Path]) -> Optional[str]:
    """The nvidia-smi line gpu.sh's environment stage logged (name, memory, driver, clocks, ...), with its
    header's field names."""
    log = folder / "gpu_sh.log" if folder else None
    if log is None or not log.exists():
        return None
    lines = log.read_text(errors="replace").splitlines()
    for header, values in zip(lines, lines[1:]):
        if header.startswith("name, memory.total"):
            return "; ".join(f"{k.strip()} {v.strip()}" for k, v in zip(header.split(","), values.split(",")))
    return None


def heading(env: dict) -> str:
    kind = "GPU" if env["device_type"] == "cuda" else "CPU (gpu.sh --dry-run)"
    return f"## {kind}: {env['device']}, {env['date']}"


def section(report: dict, stem: str, chart: Optional[str], tests: Optional[str], smi: Optional[str] = None) -> str:
    """The markdown section; ``chart``: the PNG's path relative to the markdown file (None: no chart)."""
    env = report["environment"]
    lines = [heading(env), ""]
    lines += ["- Run: `bash benchmarks/gpu.sh` (headline case first, dpo-fast's impls first in each case), "
              "recorded with `python -m benchmarks.record`."]
    lines += _environment_lines(env)
    if smi:
        lines.append(f"- nvidia-smi at the start: {smi}")
    if tests:
        lines.append(f"- Kernel correctness (`tests/test_gpu_smoke.py`, every impl x bf16/fp16/fp32 against the "
                     f"float64 oracle): {tests}")
    lines += [f"- Files: `benchmarks/results/{stem}.json` (and `.md`).", "", LEGEND]
    if chart:
        lines += ["", f"![fwd+bwd time and peak memory per case]({chart})"]
    lines += case_tables(report, "###")
    return "\n".join(lines) + "\n"


def _sections(text: str):
    """(start, end, first line) of every '## ' section of a markdown text."""
    starts = [m.start() for m in re.finditer(r"^## ", text, re.M)] + [len(text)]
    return [(a, b, text[a:text.index("\n", a) if "\n" in text[a:b] else b]) for a, b in zip(starts, starts[1:])]


def insert_section(text: str, new: str, is_gpu: bool) -> str:
    """``text`` with ``new`` in place of the section of the same title (or, for a GPU run, of the
    placeholder), else before the first '## ' section."""
    title = new.splitlines()[0]
    for start, end, line in _sections(text):
        if line == title or (is_gpu and line == PLACEHOLDER):
            return text[:start] + new + ("\n" if end < len(text) else "") + text[end:]
    sections = _sections(text)
    at = sections[0][0] if sections else len(text)
    return text[:at] + new + "\n" + text[at:]


def record(paths: List[Path], results_md: Path, out_dir: Path, charts_dir: Path) -> Path:
    files = find_reports(paths)
    report = merge([json.loads(p.read_text()) for p in files])
    stem = write_all(report, out_dir, make_plot=False)[0].stem
    charts_dir.mkdir(parents=True, exist_ok=True)
    chart = charts_dir / f"{stem}.png"
    if not plot(report, chart):
        print("matplotlib is missing: no chart", file=sys.stderr)
        chart = None
    folder = next((p for p in paths if p.is_dir()), None)
    relative = Path(os.path.relpath(chart, results_md.parent)).as_posix() if chart else None
    new = section(report, stem, relative, test_summary(folder), card(folder))
    results_md.write_text(insert_section(results_md.read_text(), new, report["environment"]["device_type"] == "cuda"))
    print(f"recorded {len(files)} report(s), {len(report['cases'])} case(s) into {results_md}, "
          f"{out_dir / stem}.{{json,md}}" + (f" and {chart}" if chart else ""))
    return out_dir / stem


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.record", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="gpu.sh's output folder, or sweep JSON files")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="the markdown file to update")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results", help="where the merged files go")
    parser.add_argument("--charts", type=Path, default=HERE / "charts", help="where the chart goes")
    args = parser.parse_args(argv)
    record(args.paths, args.results, args.out_dir, args.charts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
