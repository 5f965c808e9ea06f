"""Turn a sweep report into console tables, a JSON file, a markdown file and a PNG chart."""

import json
import math
from pathlib import Path
from typing import List

COLUMNS = [
    # header, result key (or keys: the formatter gets their values as a tuple), formatter
    ("method", "method", str),
    ("exact", "exact", lambda v: "yes" if v else "approx"),
    ("fwd ms", "fwd_ms", lambda v: _sig(v)),
    ("fwd+bwd ms", "fwd_bwd_ms", lambda v: _sig(v)),
    ("p20-p80", ("fwd_bwd_q20_ms", "fwd_bwd_q80_ms"), lambda v: f"{_sig(v[0])}-{_sig(v[1])}"),
    ("peak MiB", "peak_bytes", lambda v: _sig(v / 2**20)),
    ("loss err", "loss_err", lambda v: f"{v:.1e}"),
    ("logp err", "logps_err", lambda v: "-" if v != v else f"{v:.1e}"),  # NaN: the method hides its log-probs
    ("grad err", "grad_err", lambda v: f"{v:.1e}"),
    ("speed vs naive", "speedup", lambda v: f"{v:.2f}x"),
    ("mem vs naive", "memory_ratio", lambda v: f"{v:.2f}x"),
    ("% of floor", "floor_fraction", lambda v: f"{100 * v:.0f}%"),
    ("TFLOP/s", "tflops", lambda v: _sig(v)),
]

LEGEND = (
    "fwd = training forward (autograd recording); fwd+bwd adds loss.backward(); times are medians (CUDA: "
    "triton.testing.do_bench, L2 flushed before each call; CPU: wall clock), p20-p80 the 20th to 80th "
    "percentile of fwd+bwd. peak = loss-attributable peak "
    "memory above the inputs (CUDA: max_memory_allocated; CPU: resident-set high-water mark, inputs and imports "
    "excluded). loss err = |loss - float64 oracle|; logp err = largest |sequence log-prob - float64 oracle| in "
    "nats (- where a method does not return its log-probs); grad err = max over grad_hidden and grad_weight of "
    "max|g - g64| / max|g64|. speed vs naive = naive-eager fwd+bwd time / this time (>1 is faster); mem vs naive "
    "= this peak / naive-eager peak (<1 is smaller). % of floor = (logits + grad_hidden + grad_weight GEMM time) "
    "/ fwd+bwd time. TFLOP/s = 6NHV / fwd+bwd time."
)


def _sig(v: float, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v == 0:
        return "0"
    magnitude = int(math.floor(math.log10(abs(v))))
    decimals = max(0, digits - 1 - magnitude)
    return f"{v:.{decimals}f}"


def _cells(result: dict) -> List[str]:
    cells = []
    for _, key, fmt in COLUMNS:
        value = result.get(key) if isinstance(key, str) else tuple(result.get(k) for k in key)
        if isinstance(value, tuple) and None in value:
            value = None
        cells.append("-" if value is None else fmt(value))
    return cells


def _case_title(entry: dict) -> str:
    c = entry["case"]
    softcap = f", softcap {c['softcap']:g}" if c.get("softcap") else ""
    floor = entry.get("floor")
    floor_text = f"; GEMM floor {_sig(floor['floor_ms'])} ms ({_sig(floor['floor_tflops'])} TFLOP/s)" if floor else ""
    return (f"{entry['name']}: H={c['hidden_size']} V={c['vocab_size']} N={2 * c['pairs'] * c['tokens']} "
            f"{c['dtype']}{softcap}{floor_text}")


def _not_run(entry: dict) -> List[str]:
    return [f"{r['method']}: {r['status']}: {r.get('reason')}" for r in entry["results"] if r["status"] != "ok"]


def _notes(entry: dict) -> List[str]:
    return [f"{r['method']}: {r['note']}" for r in entry["results"] if r["status"] == "ok" and r.get("note")]


def text_tables(report: dict) -> str:
    lines = []
    for entry in report["cases"]:
        rows = [[h for h, _, _ in COLUMNS]] + [_cells(r) for r in entry["results"] if r["status"] == "ok"]
        widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
        lines += ["", _case_title(entry)]
        for j, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                                   for i, (cell, w) in enumerate(zip(row, widths))))
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines += [f"  not run: {note}" for note in _not_run(entry)]
        lines += [f"  note: {note}" for note in _notes(entry)]
    return "\n".join(lines)


def _environment_lines(env: dict) -> List[str]:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    return [f"- device: {env['device']}; torch threads per process: {env['threads']}", f"- date: {env['date']}",
            f"- versions: {versions}, Python {env['python']}" + (f", CUDA {env['cuda']}" if env.get("cuda") else ""),
            f"- sweep wall time: {env.get('wall_s')} s; load average (1, 5, 15 min) at start "
            f"{env.get('load_average_start')}, at end {env.get('load_average_end')}"]


def markdown(report: dict) -> str:
    lines = [f"# dpo-fast benchmark: {report['environment']['device']}, {report['environment']['date']}", ""]
    lines += _environment_lines(report["environment"]) + ["", LEGEND] + case_tables(report, "##")
    return "\n".join(lines) + "\n"


def case_tables(report: dict, heading: str) -> List[str]:
    """Markdown lines: per case a ``heading``-level title, its input calibration, the table, what did not run."""
    lines = []
    for entry in report["cases"]:
        cal = entry.get("calibration")
        lines += ["", f"{heading} {_case_title(entry)}", ""]
        if cal:
            lines += [f"Inputs: logit std {cal['logit_std']}, mean target NLL {cal['mean_nll']}, target is the "
                      f"argmax for {100 * cal['top1_rate']:.0f}% of tokens; float64 oracle loss "
                      f"{entry['oracle_loss']:.6f}.", ""]
        lines.append("| " + " | ".join(h for h, _, _ in COLUMNS) + " |")
        lines.append("|" + "|".join(" --- " for _ in COLUMNS) + "|")
        lines += ["| " + " | ".join(_cells(r)) + " |" for r in entry["results"] if r["status"] == "ok"]
        not_run, notes = _not_run(entry), _notes(entry)
        if not_run:
            lines += ["", "Not run:", ""] + [f"- {n}" for n in not_run]
        if notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return lines


def write_json(report: dict, path: Path) -> None:
    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if k != "traceback"}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        if isinstance(obj, float):
            return None if math.isnan(obj) or math.isinf(obj) else float(f"{obj:.6g}")
        return obj

    path.write_text(json.dumps(clean(report), indent=1) + "\n")


def plot(report: dict, path: Path) -> bool:
    """Bar charts of fwd+bwd time and peak memory per case; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    entries = [e for e in report["cases"] if any(r["status"] == "ok" for r in e["results"])]
    if not entries:
        return False
    fig, axes = plt.subplots(len(entries), 2, figsize=(13, 0.45 * sum(
        1 + sum(r["status"] == "ok" for r in e["results"]) for e in entries) + 1.0), squeeze=False)
    for (ax_time, ax_mem), entry in zip(axes, entries):
        ok = [r for r in entry["results"] if r["status"] == "ok"][::-1]
        names = [r["method"] + ("" if r["exact"] else " (approx)") for r in ok]
        colors = ["tab:green" if r["method"].startswith("dpo-fast") else "tab:gray" for r in ok]
        ax_time.barh(names, [r["fwd_bwd_ms"] for r in ok], color=colors, label="fwd+bwd")
        ax_time.barh(names, [r["fwd_ms"] for r in ok], color="white", alpha=0.45, label="fwd")
        ax_time.axvline(entry["floor"]["floor_ms"], color="tab:red", linestyle="--", label="6NHV GEMM floor")
        times = [r["fwd_ms"] for r in ok] + [r["fwd_bwd_ms"] for r in ok]
        if max(times) > 30 * min(times):  # e.g. interpreter paths next to compiled ones
            ax_time.set_xscale("log")
        ax_time.set_xlabel("ms (lower is better)")
        ax_time.set_title(entry["name"], fontsize=9)
        ax_time.legend(fontsize=7, loc="best")
        ax_mem.barh(names, [r["peak_bytes"] / 2**20 for r in ok], color=colors)
        ax_mem.set_xlabel("loss-attributable peak MiB (lower is better)")
        ax_mem.set_title(entry["name"], fontsize=9)
        for ax in (ax_time, ax_mem):
            ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"dpo-fast vs peers: {report['environment']['device']}, {report['environment']['date']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(report: dict, out_dir: Path, make_plot: bool = True) -> List[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = report["environment"]
    stem = out_dir / f"{env['device_slug']}-{env['date']}"
    written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    write_json(report, written[0])
    written[1].write_text(markdown(report))
    if make_plot and plot(report, stem.with_suffix(".png")):
        written.append(stem.with_suffix(".png"))
    return written
