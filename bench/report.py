"""Results -> the printed/Markdown table, the headline ratios and the throughput-vs-corpus-size plot (SVG)."""

from __future__ import annotations

import math

COLUMNS = [("row", "row"), ("notes", "notes"), ("wall_s", "wall s"), ("notes_per_s", "notes/s"),
           ("input_tok_per_s", "in tok/s"), ("output_tok_per_s", "out tok/s"), ("peak_mem_gib", "peak GiB"),
           ("cpu_s_beside_vllm", "CPU s beside vLLM")]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if value < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _extra(r: dict) -> str:
    if r.get("error"):
        return f"ERROR {r['error']}"
    parts = []
    if r.get("failed") is not None:
        parts.append(f"ok {r['succeeded']}, failed {r['failed']}, unchanged {r['skipped']}")
    if r.get("errors"):
        parts.append(f"{r['errors']} errors")
    if r.get("first_token_s") is not None:
        parts.append(f"first token {r['first_token_s']} s")
    if r.get("grounded_share") is not None:
        parts.append(f"{r['concept_rows']:,} concept rows, {r['grounded_share']:.0%} grounded")
    return "; ".join(parts)


def markdown_table(rows: list[dict]) -> str:
    head = [label for _, label in COLUMNS] + ["notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k)) for k, _ in COLUMNS) + f" | {_extra(r)} |")
    return "\n".join(lines)


def text_table(rows: list[dict]) -> str:
    cells = [[label for _, label in COLUMNS]] + [[_cell(r.get(k)) for k, _ in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    out = []
    for i, c in enumerate(cells):
        line = "  ".join(v.ljust(w) if j == 0 else v.rjust(w) for j, (v, w) in enumerate(zip(c, widths)))
        out.append(line + ("  " + _extra(rows[i - 1]) if i else ""))
    return "\n".join(out)


def fixed_table(fixed: dict) -> str:
    keys = ["spark_up_s", "ray_up_s", "engine_load_s", "first_token_s"]
    lines = ["| stack | Spark up s | Ray up s | engine load s | first token s | other |", "|---|---|---|---|---|---|"]
    for stack, values in fixed.items():
        other = ", ".join(f"{k} {_cell(v)}" for k, v in values.items() if k not in keys)
        lines.append(f"| {stack} | " + " | ".join(_cell(values.get(k)) for k in keys) + f" | {other} |")
    return "\n".join(lines)


def _find(rows: list[dict], prefix: str) -> dict | None:
    return next((r for r in rows if r["row"].startswith(prefix) and not r.get("error")), None)


def _ratio(num: dict | None, den: dict | None, key: str) -> float | None:
    if not num or not den or not num.get(key) or not den.get(key):
        return None
    return round(num[key] / den[key], 3)


def cold_rows(rows: list[dict], fixed: dict) -> list[dict]:
    """One-shot runs including every start-up cost: the job (Spark up + Ray up + engine load + its first run on 4
    warm-up notes + the corpus run; the warm-up notes make it an over-estimate) and ray.data.llm (Ray up + its
    cold corpus run, which loads its engine)."""
    out = []
    job_run, job_fixed = _find(rows, "job end to end, conf"), fixed.get("job")
    if job_run and job_fixed:
        start = sum(job_fixed[k] for k in ("spark_up_s", "ray_up_s", "engine_load_s", "first_token_s",
                                     "first_job_run_4_notes_s"))
        out.append({"row": "job cold one-shot (conf batching, all start-up costs)", "notes": job_run["notes"],
                    "wall_s": round(start + job_run["wall_s"], 2),
                    "notes_per_s": round(job_run["notes"] / (start + job_run["wall_s"]), 3)})
    cold, rdl = _find(rows, "ray.data.llm vLLMEngineProcessor, guided, cold"), fixed.get("ray.data.llm")
    if cold and rdl:
        wall = rdl["ray_up_s"] + cold["wall_s"]
        out.append({"row": "ray.data.llm cold one-shot (Ray up + its run)", "notes": cold["notes"],
                    "wall_s": round(wall, 2), "notes_per_s": round(cold["notes"] / wall, 3)})
    return out


def _marginal(rows: list[dict]) -> dict | None:
    """Marginal rate between the smallest and the largest corpus of the job's scaling series: extra notes per extra
    second, so the job's fixed per-run cost (Spark actions, Delta commits) cancels out."""
    series = [r for r in rows if r["row"].startswith(("job scaling", "job end to end, conf")) and not r.get("error")]
    small = min(series, key=lambda r: r["notes"], default=None)
    large = max(series, key=lambda r: r["notes"], default=None)
    if small and large and large["notes"] > small["notes"] and large["wall_s"] > small["wall_s"]:
        return {"row": f"job marginal, {small['notes']} -> {large['notes']} notes",
                "notes_per_s": (large["notes"] - small["notes"]) / (large["wall_s"] - small["wall_s"])}
    return None


def headline_rows(rows: list[dict], fixed: dict) -> dict[str, dict | None]:
    """The rows the headline ratios divide, by a short name (None where a row is missing or failed)."""
    cold = {r["row"].split(" cold")[0]: r for r in cold_rows(rows, fixed)}
    replay_runs = [r for r in rows if r["row"].startswith("job with REPLAY engine") and not r.get("error")]
    replay_run = max(replay_runs, key=lambda r: r["notes"], default=None)
    return {
        "job": _find(rows, "job end to end, conf"),
        "marginal": _marginal(rows),
        "bare paired": _find(rows, "bare vLLM LLM.generate on the job's engine actor"),
        "one at a time": _find(rows, "job end to end, one batch at a time"),
        "bare": _find(rows, "bare vLLM LLM.generate (job engine args), guided"),
        "bare default": _find(rows, "bare vLLM LLM.generate (default engine args), guided"),
        "ray.data.llm": _find(rows, "ray.data.llm vLLMEngineProcessor, guided, steady"),
        "job cold": cold.get("job"),
        "ray.data.llm cold": cold.get("ray.data.llm"),
        # LoRA's cost is measured against the base model on an engine started without LoRA (row base-no-lora)
        "base pure": _find(rows, "bare vLLM LLM.generate, base, engine without LoRA, ignore_eos"),
        "lora pure": next((r for r in rows if r["row"].startswith("bare vLLM LLM.generate, LoRA")
                           and "merged" not in r["row"] and not r.get("error")), None),
        "merged pure": next((r for r in rows if "merged into the weights, ignore_eos" in r["row"]
                             and not r.get("error")), None),
        "base guided": _find(rows, "VLLMEngine.generate, base, engine without LoRA, guided on"),
        "lora guided": _find(rows, "VLLMEngine.generate, LoRA"),
        "two runs": _find(rows, "two tasks, two job runs"),
        "one pass": _find(rows, "two tasks, one pass"),
        "rerun": _find(rows, "job incremental rerun, unchanged corpus"),
        "replay run": replay_run,
        "replay rerun": _find(rows, f"job incremental rerun, unchanged corpus of {replay_run['notes']} notes")
        if replay_run else None,
    }


METRICS = {"notes_per_s": "notes/s", "output_tok_per_s": "output tok/s", "wall_s": "wall s"}
#: (ratio, numerator, denominator (names of headline_rows), the rows' key divided, the target's comparison, target)
RATIOS = [
    ("job / bare vLLM (same engine args)", "job", "bare", "notes_per_s", ">=", 0.95),
    ("job marginal per-note rate / bare vLLM (same engine args)", "marginal", "bare", "notes_per_s", ">=", 0.95),
    ("job / bare vLLM on the job's engine (paired)", "job", "bare paired", "notes_per_s", ">=", 0.95),
    ("job one batch at a time / bare vLLM on the job's engine (paired)", "one at a time", "bare paired",
     "notes_per_s", ">=", 0.95),
    ("job / bare vLLM (default args)", "job", "bare default", "notes_per_s", ">=", 1.5),
    ("job / ray.data.llm (steady state)", "job", "ray.data.llm", "notes_per_s", ">=", 1.1),
    ("job / ray.data.llm (cold one-shot)", "job cold", "ray.data.llm cold", "notes_per_s", ">=", 1.1),
    ("LoRA / base (pure decode, ignore_eos)", "lora pure", "base pure", "output_tok_per_s", ">=", 0.9),
    ("LoRA / base (guided, our engine)", "lora guided", "base guided", "output_tok_per_s", ">=", 0.9),
    ("merged LoRA / base (pure decode, ignore_eos)", "merged pure", "base pure", "output_tok_per_s", ">=", 0.9),
    ("two tasks: one pass / two job runs (wall)", "one pass", "two runs", "wall_s", "<=", 1.0),
    ("rerun / first run wall", "rerun", "job", "wall_s", "<=", 0.1),
    ("rerun / first run wall, largest REPLAY corpus", "replay rerun", "replay run", "wall_s", "<=", 0.1),
]


def ratios(rows: list[dict], fixed: dict) -> list[dict]:
    """The issue's headline ratios (:data:`RATIOS`), each with its target and the rows it divides."""
    found = headline_rows(rows, fixed)
    entries = []
    for name, num_name, den_name, key, op, target in RATIOS:
        num, den = found[num_name], found[den_name]
        value = _ratio(num, den, key)
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        entries.append({"ratio": name, "value": value, "target": f"{op} {target}", "met": met, "metric": METRICS[key],
                        "numerator": num["row"] if num else None, "denominator": den["row"] if den else None})
    return entries


def ratio_table(entries: list[dict]) -> str:
    lines = ["| ratio | value | target | met | metric |", "|---|---|---|---|---|"]
    for e in entries:
        met = "n/a" if e["met"] is None else ("yes" if e["met"] else "**no**")
        lines.append(f"| {e['ratio']} | {_cell(e['value'])} | {e['target']} | {met} | {e['metric']} |")
    return "\n".join(lines)


def throughput_svg(series: dict[str, list[tuple[int, float]]], title: str) -> str:
    """A log-log line plot of notes/s against corpus size (notes), one line per series."""
    points = [p for pts in series.values() for p in pts if p[1] > 0]
    if not points:
        return ""
    w, h, left, right, top, bottom = 680, 400, 70, 220, 40, 50
    x_lo, x_hi = math.floor(math.log10(min(p[0] for p in points))), math.ceil(math.log10(max(p[0] for p in points)))
    y_lo, y_hi = math.floor(math.log10(min(p[1] for p in points))), math.ceil(math.log10(max(p[1] for p in points)))
    x_hi, y_hi = max(x_hi, x_lo + 1), max(y_hi, y_lo + 1)

    def sx(x: float) -> float:
        return left + (math.log10(x) - x_lo) / (x_hi - x_lo) * (w - left - right)

    def sy(y: float) -> float:
        return h - bottom - (math.log10(y) - y_lo) / (y_hi - y_lo) * (h - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2 - right / 2 + left / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>']
    for e in range(x_lo, x_hi + 1):
        out.append(f'<line x1="{sx(10**e):.1f}" y1="{top}" x2="{sx(10**e):.1f}" y2="{h - bottom}" stroke="#ddd"/>')
        out.append(f'<text x="{sx(10**e):.1f}" y="{h - bottom + 16}" text-anchor="middle">10^{e}</text>')
    for e in range(y_lo, y_hi + 1):
        out.append(f'<line x1="{left}" y1="{sy(10**e):.1f}" x2="{w - right}" y2="{sy(10**e):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{sy(10**e) + 4:.1f}" text-anchor="end">{10.0**e:g}</text>')
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 12}" text-anchor="middle">corpus size (notes)</text>')
    out.append(f'<text x="16" y="{(top + h - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(top + h - bottom) / 2})">notes/s (job end to end)</text>')
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for k, (name, pts) in enumerate(series.items()):
        pts = sorted(p for p in pts if p[1] > 0)
        color = colors[k % len(colors)]
        if len(pts) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in pts:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{color}"/>')
            out.append(f'<text x="{sx(x) + 6:.1f}" y="{sy(y) - 6:.1f}" fill="{color}">{y:.3g}</text>')
        out.append(f'<rect x="{w - right + 50}" y="{top + 20 * k}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{w - right + 68}" y="{top + 20 * k + 11}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
