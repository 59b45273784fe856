"""Synthetic drug-safety notes for the benchmarks, and the prompts the job would build from them.

Notes are PHEE-like sentences (one per note, 20-60 words, median ~30) assembled by a seeded generator from
small vocabularies: no real patients, nothing copied from the PHEE dev/test data. The same ``(n, seed)`` always
gives the same notes, so every benchmark row sees the same corpus.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa

PROBE_TEXT = "A 61-year-old man developed a mild rash after starting amoxicillin 500 mg orally for otitis media."

_DRUGS = ["ibuprofen", "isoniazid", "amoxicillin", "lithium", "clozapine", "spironolactone", "lisinopril",
          "levetiracetam", "warfarin", "haloperidol", "simvastatin", "amiodarone", "metformin", "vancomycin",
          "carbamazepine", "allopurinol", "methotrexate", "cisplatin", "digoxin", "phenytoin", "ciprofloxacin",
          "tacrolimus", "heparin", "olanzapine", "valproate", "rifampicin", "linezolid", "propofol"]
_DOSES = ["500 mg", "80 mg", "10 mg/kg", "2 g", "25 mg", "0.25 mg", "1 g", "150 mg", "5 mg", "300 mg"]
_ROUTES = ["orally", "intravenously", "by mouth", "subcutaneously", "intramuscularly"]
_FREQUENCIES = ["twice daily", "once daily", "three times daily", "every 8 hours", "weekly"]
_DURATIONS = ["for two weeks", "for 3 months", "for 10 days", "for six weeks", "for one year"]
_SUBJECTS = ["a {age}-year-old {gender}", "an elderly {gender}", "a {age}-year-old {gender} with {disorder}",
             "two children", "a pregnant woman", "a {age}-year-old {race} {gender}"]
_GENDERS = ["man", "woman", "patient", "boy", "girl"]
_RACES = ["Japanese", "Caucasian", "African American", "Hispanic"]
_DISORDERS = ["chronic kidney disease", "bipolar disorder", "schizophrenia", "epilepsy", "atrial fibrillation",
              "type 2 diabetes", "heart failure", "rheumatoid arthritis", "HIV infection", "asthma"]
_INDICATIONS = ["knee pain", "latent tuberculosis", "sinusitis", "major depression", "seizures", "gout",
                "osteomyelitis", "hypertension", "psoriasis", "community-acquired pneumonia"]
_EFFECTS = ["acute kidney injury", "severe hepatotoxicity", "a generalized rash", "agranulocytosis",
            "hyperkalemia", "QT prolongation", "lactic acidosis", "thrombocytopenia", "Stevens-Johnson syndrome",
            "rhabdomyolysis", "acute pancreatitis", "serotonin syndrome", "interstitial nephritis", "hyponatremia"]
_TRIGGERS = ["developed", "presented with", "experienced", "was diagnosed with", "was admitted with"]
_CUES = ["", "", "severe ", "possible ", "probable ", "mild "]
_AFTERTHOUGHTS = [
    "The drug was discontinued and the symptoms resolved within {n} days.",
    "Rechallenge was not attempted.",
    "Laboratory values returned to baseline after {n} weeks of supportive care.",
    "No other cause was identified despite an extensive workup.",
    "The reaction was reported to the national pharmacovigilance centre.",
    "Symptoms improved after dose reduction to {dose} {frequency}.",
    "Concomitant {drug2} was continued without further events.",
]


def _sentence(rng: random.Random) -> str:
    subject = rng.choice(_SUBJECTS).format(age=rng.randint(2, 89), gender=rng.choice(_GENDERS),
                                           disorder=rng.choice(_DISORDERS), race=rng.choice(_RACES))
    drug = rng.choice(_DRUGS)
    treatment = f"{drug} {rng.choice(_DOSES)} {rng.choice(_ROUTES)} {rng.choice(_FREQUENCIES)}"
    if rng.random() < 0.3:
        treatment += f" combined with {rng.choice(_DRUGS)}"
    if rng.random() < 0.5:
        treatment += f" {rng.choice(_DURATIONS)}"
    effect = rng.choice(_CUES) + rng.choice(_EFFECTS)
    lead = f"{subject[0].upper()}{subject[1:]} {rng.choice(_TRIGGERS)} {effect}"
    return f"{lead} after receiving {treatment} for {rng.choice(_INDICATIONS)}."


def synthetic_text(rng: random.Random) -> str:
    """One note of 20-60 words: a drug-event sentence plus follow-up sentences up to a drawn length."""
    target = min(60, max(20, round(rng.lognormvariate(3.4, 0.3))))  # median ~30 words, like PHEE sentences
    text = _sentence(rng)
    while len(text.split()) < target:
        text += " " + rng.choice(_AFTERTHOUGHTS).format(n=rng.randint(2, 14), dose=rng.choice(_DOSES),
                                                         frequency=rng.choice(_FREQUENCIES), drug2=rng.choice(_DRUGS))
    words = text.split()
    return " ".join(words[:60]) if len(words) > 60 else text


def synthetic_notes(n: int, seed: int) -> pa.Table:
    """``n`` notes with the columns of the sample note table (note_id, patient_id, note_date, note_type, text)."""
    rng = random.Random(f"notelake-bench:{seed}")
    texts = [synthetic_text(rng) for _ in range(n)]
    width = max(6, len(str(n)))
    return pa.table({
        "note_id": [f"B{seed}-{i:0{width}d}" for i in range(n)],
        "patient_id": [f"P{rng.randint(0, max(1, n // 3)):0{width}d}" for _ in range(n)],
        "note_date": pa.array([19_000 + rng.randint(0, 700) for _ in range(n)], pa.int32()).cast(pa.date32()),
        "note_type": [rng.choice(["discharge", "progress", "consult"]) for _ in range(n)],
        "text": texts,
    })


def write_note_table(notes: pa.Table, path: str | Path) -> str:
    """The notes as a Delta table (the job's usual input)."""
    from deltalake import write_deltalake

    write_deltalake(str(path), notes, mode="overwrite")
    return str(path)


def render_prompts(tokenizer, task, texts: list[str]) -> list[list[int]]:
    """Prompt token ids exactly as the engine builds them: build_messages + the model's own chat template."""
    from notelake.udfs.prompts import build_messages

    prompts = []
    for text in texts:
        rendered = tokenizer.apply_chat_template(build_messages(task, text), tokenize=False, add_generation_prompt=True)
        prompts.append(list(tokenizer.encode(rendered, add_special_tokens=False)))
    return prompts
