-- Drug class -> adverse effect, by concept: each adverse_effect relation whose drug and effect mentions are linked
-- to standard concepts, the drug rolled up to every classification concept above it (concept_ancestor,
-- standard_concept 'C', e.g. an ATC class), the effect asserted present (note_nlp.term_exists = 'Y').
SELECT drug_class.concept_id AS drug_class_id,
       drug_class.concept_name AS drug_class,
       effect.concept_id AS adverse_effect_id,
       effect.concept_name AS adverse_effect,
       count(DISTINCT r.note_id) AS notes,
       count(DISTINCT d.note_nlp_concept_id) AS drugs
FROM note_nlp_relation r
JOIN note_nlp d ON d.note_nlp_id = r.head_note_nlp_id
JOIN note_nlp e ON e.note_nlp_id = r.tail_note_nlp_id
JOIN concept_ancestor ca ON ca.descendant_concept_id = d.note_nlp_concept_id
JOIN concept drug_class ON drug_class.concept_id = ca.ancestor_concept_id
JOIN concept effect ON effect.concept_id = e.note_nlp_concept_id
WHERE r.relationship = 'adverse_effect'
  AND e.term_exists = 'Y'
  AND d.note_nlp_concept_id <> 0
  AND e.note_nlp_concept_id <> 0
  AND drug_class.standard_concept = 'C'
  AND drug_class.invalid_reason IS NULL
GROUP BY drug_class.concept_id, drug_class.concept_name, effect.concept_id, effect.concept_name
ORDER BY notes DESC, drug_class, adverse_effect
