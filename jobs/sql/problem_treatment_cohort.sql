-- Cohort (task `clinical`): patients with a problem and a treatment or drug given for it.
SELECT DISTINCT r.patient_id,
       lower(r.tail_text) AS problem,
       lower(r.head_text) AS treatment
FROM relations r
JOIN concepts problem ON problem.concept_id = r.tail_concept_id
WHERE r.task = 'clinical'
  AND r.label = 'treats'
  AND problem.assertion = 'present'
ORDER BY r.patient_id, problem, treatment
