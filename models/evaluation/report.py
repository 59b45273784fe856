"""Reports of evaluation runs: a Markdown report, a comparison table of several runs, plots (when matplotlib is
installed) and the score rows of a Delta table. Reports carry ids, labels and figures, never note text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from notelake.models.evaluation.metrics import METRICS


def _f(x: Any) -> str:
    return "–" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def _ci(row: dict) -> str:
    ci = row.get("ci95")
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "–"


def markdown_report(report: dict, runs: list[dict] | None = None) -> str:
    """Markdown: headline table, per-label F1, per-relation F1, and a comparison table of several runs."""
    s = report["scores"]
    lines = [f"# Evaluation: task `{report['task']}`", ""]
    lines += [f"- gold: `{report['gold']}` — slice: {report['slice']['n_notes']} notes "
              f"(seeded shuffle, seed {report['slice']['seed']}, limit {report['slice']['limit']}), "
              f"{report['slice']['n_gold_concepts']} gold concepts, slice sha256 `{report['slice']['sha256'][:12]}`",
              f"- model: `{report['model']['name']}` (sha256 `{str(report['model']['sha256'])[:12]}`), adapter: "
              + (f"`{report['adapter']['name']}` (sha256 `{report['adapter']['sha256'][:12]}`)"
                 if report.get("adapter") else "none (zero-shot)")
              + (" — **task not in the adapter: zero-shot through it**" if report.get("adapter", {}) and
                 report["adapter"].get("zero_shot") else ""),
              f"- engine: {report['engine']['backend']} {report['engine'].get('dtype')}, greedy={report['engine']['greedy']},"
              f" guided decoding={report['engine'].get('guided_decoding')}, max_tokens={report['engine']['max_tokens']}",
              f"- command: `{report.get('command', '')}`", ""]
    lines += ["| metric | P | R | F1 | 95 % CI | SE | TP / pred / gold |", "|---|---:|---:|---:|---|---:|---|"]
    blocks = [("CCE strict", s["cce"]["strict"]), ("CCE lenient", s["cce"]["lenient"])]
    if "cre" in s:
        blocks += [("CRE strict", s["cre"]["strict"]), ("CRE lenient", s["cre"]["lenient"])]
    for name, row in blocks:
        lines.append(f"| {name} | {_f(row['precision'])} | {_f(row['recall'])} | **{_f(row['f1'])}** | {_ci(row)} |"
                     f" {_f(row.get('se'))} | {row['tp']} / {row['n_pred']} / {row['n_gold']} |")
    t = s["throughput"]
    lines += ["", f"- grounding rate: {_f(s['grounding_rate'])}; invalid-output rate: {_f(s['invalid_output_rate'])}"
              f" ({s['error_types'] or 'no errors'}); engine-error rate: {_f(s['engine_error_rate'])};"
              f" assertion accuracy on strict matches: {_f(s.get('assertion_accuracy'))}",
              f"- throughput: {t['prompts']} prompts in {t['wall_s']} s = {_f(t['prompts_per_s'])} prompts/s, "
              f"{_f(t['output_tokens_per_s'])} output tok/s ({t['output_tokens']} output, {t['prompt_tokens']} prompt "
              f"tokens; {t['truncated_outputs']} outputs hit max_tokens)", ""]
    lines += ["## Per concept label", "", "| label | gold | pred | strict F1 | lenient P | lenient R | lenient F1 |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for lab, row in sorted(s["per_label"].items(), key=lambda kv: -kv[1]["lenient"]["n_gold"]):
        le, st = row["lenient"], row["strict"]
        lines.append(f"| {lab} | {le['n_gold']} | {le['n_pred']} | {_f(st['f1'])} | {_f(le['precision'])} | "
                     f"{_f(le['recall'])} | {_f(le['f1'])} |")
    if s.get("per_relation"):
        lines += ["", "## Per relation label (end-to-end)", "",
                  "| relation | gold | pred | strict F1 | lenient F1 |", "|---|---:|---:|---:|---:|"]
        for lab, row in sorted(s["per_relation"].items(), key=lambda kv: -kv[1]["lenient"]["n_gold"]):
            lines.append(f"| {lab} | {row['lenient']['n_gold']} | {row['lenient']['n_pred']} | "
                         f"{_f(row['strict']['f1'])} | {_f(row['lenient']['f1'])} |")
    if runs:
        lines += ["", "## Runs compared", "", comparison_table(runs)]
    return "\n".join(lines) + "\n"


def comparison_table(runs: list[dict]) -> str:
    """One row per report (e.g. a learning curve): adapter, training tokens, lenient/strict F1 with CI."""
    rows = ["| run | adapter | train tokens | CCE lenient F1 (95 % CI) | CCE strict F1 | CRE lenient F1 | grounded | invalid |",
            "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in runs:
        s = r["scores"]
        le = s["cce"]["lenient"]
        cre = s.get("cre", {}).get("lenient", {}).get("f1")
        ad = r.get("adapter") or {}
        rows.append(f"| {r.get('label') or r.get('run_id')} | {ad.get('name', 'none')} | "
                    f"{_f(ad.get('train_tokens'))} | {_f(le['f1'])} {_ci(le)} | {_f(s['cce']['strict']['f1'])} | "
                    f"{_f(cre)} | {_f(s['grounding_rate'])} | {_f(s['invalid_output_rate'])} |")
    return "\n".join(rows)



def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None: matplotlib is not a dependency."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def bar_plot(report: dict, path: Path) -> Path | None:
    """Per-label lenient F1 bar plot, only when matplotlib is installed (it is not a dependency)."""
    plt = _pyplot()
    if plt is None:
        return None
    per = sorted(report["scores"]["per_label"].items(), key=lambda kv: -kv[1]["lenient"]["n_gold"])
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(per)), 4))
    ax.bar([k for k, _ in per], [v["lenient"]["f1"] for _, v in per])
    ax.set_ylabel("lenient F1")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['task']}: per-label lenient F1")
    plt.xticks(rotation=60, ha="right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def curve_plot(runs: list[dict], path: Path) -> Path | None:
    """Lenient F1 (95 % CI bars) against training tokens, one line per task: a learning curve from several
    reports (the base model counts as 0 tokens). Only when matplotlib is installed."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for task in sorted({r["task"] for r in runs}):
        pts = sorted(((r.get("adapter") or {}).get("train_tokens") or 0, r["scores"]["cce"]["lenient"])
                     for r in runs if r["task"] == task)
        xs, f1 = [x for x, _ in pts], [le["f1"] for _, le in pts]
        ci = [le.get("ci95") or [le["f1"], le["f1"]] for _, le in pts]
        ax.errorbar(xs, f1, yerr=[[f - lo for f, (lo, _) in zip(f1, ci)], [hi - f for f, (_, hi) in zip(f1, ci)]],
                    marker="o", capsize=3, label=task)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("CCE lenient F1")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("learning curve")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def score_rows(report: dict) -> list[dict]:
    """Flat rows (one per task/level/label/metric) for a Delta table of scores."""
    s = report["scores"]
    base = {"run_id": report["run_id"], "task": report["task"], "created_at": report["created_at"],
            "adapter": (report.get("adapter") or {}).get("name"),
            "adapter_sha256": (report.get("adapter") or {}).get("sha256"),
            "model_sha256": report["model"]["sha256"], "slice_sha256": report["slice"]["sha256"],
            "n_notes": report["slice"]["n_notes"]}
    rows = []

    def add(level: str, label: str, metric: str, row: dict) -> None:
        rows.append({**base, "level": level, "label": label, "metric": metric,
                     "precision": float(row["precision"]), "recall": float(row["recall"]), "f1": float(row["f1"]),
                     "tp": int(row["tp"]), "n_pred": int(row["n_pred"]), "n_gold": int(row["n_gold"]),
                     "ci_low": float(row["ci95"][0]) if row.get("ci95") else None,
                     "ci_high": float(row["ci95"][1]) if row.get("ci95") else None,
                     "se": float(row["se"]) if row.get("se") is not None else None})

    for m in METRICS:
        add("cce", "*", m, s["cce"][m])
        if "cre" in s:
            add("cre", "*", m, s["cre"][m])
        for lab, r in s["per_label"].items():
            add("cce", lab, m, r[m])
        for lab, r in (s.get("per_relation") or {}).items():
            add("cre", lab, m, r[m])
    return rows


def write_delta(report: dict, table_uri: str) -> None:
    """Append the report's score rows to a Delta table (deltalake.write_deltalake)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    schema = pa.schema([
        ("run_id", pa.string()), ("task", pa.string()), ("created_at", pa.string()), ("adapter", pa.string()),
        ("adapter_sha256", pa.string()), ("model_sha256", pa.string()), ("slice_sha256", pa.string()),
        ("n_notes", pa.int64()), ("level", pa.string()), ("label", pa.string()), ("metric", pa.string()),
        ("precision", pa.float64()), ("recall", pa.float64()), ("f1", pa.float64()), ("tp", pa.int64()),
        ("n_pred", pa.int64()), ("n_gold", pa.int64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
        ("se", pa.float64()),
    ])
    write_deltalake(table_uri, pa.Table.from_pylist(score_rows(report), schema=schema), mode="append")
