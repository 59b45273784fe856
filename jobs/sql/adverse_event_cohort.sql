-- Cohort: patients with an asserted adverse drug event, one row per patient, drug and effect.
SELECT DISTINCT r.patient_id,
       r.note_date,
       lower(r.head_text) AS drug,
       lower(r.tail_text) AS adverse_effect
FROM relations r
JOIN concepts effect ON effect.concept_id = r.tail_concept_id
WHERE r.label = 'adverse_effect'
  AND effect.assertion = 'present'
ORDER BY r.patient_id, drug, adverse_effect
