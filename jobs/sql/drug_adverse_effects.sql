-- Drug -> adverse effect pairs by how many notes assert them (negated/speculated effects excluded).
SELECT lower(r.head_text) AS drug,
       lower(r.tail_text) AS adverse_effect,
       count(DISTINCT r.note_id) AS notes
FROM relations r
JOIN concepts effect ON effect.concept_id = r.tail_concept_id
WHERE r.label = 'adverse_effect'
  AND effect.assertion = 'present'
GROUP BY lower(r.head_text), lower(r.tail_text)
ORDER BY notes DESC, drug, adverse_effect
