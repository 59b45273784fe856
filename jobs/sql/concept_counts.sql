-- Concepts per task and label, with the share grounded to exact offsets.
SELECT task, label, count(*) AS concepts,
       round(avg(CASE WHEN grounded THEN 1.0 ELSE 0.0 END), 3) AS grounded_share
FROM concepts
GROUP BY task, label
ORDER BY task, concepts DESC, label
