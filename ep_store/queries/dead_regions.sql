-- Singleton and dead regions: regions with at most one assigned token (the exemplar itself, or none).
-- params: model, checkpoint, layer, percentile
SELECT e.region_id, e.token AS exemplar_token, e.doc_id, e.pos, coalesce(s.size, 0) AS size,
       e.member_count AS members_during_build
FROM exemplars e
LEFT JOIN (
    SELECT region_id, count(*) AS size FROM assignments
    WHERE model = $model AND checkpoint = $checkpoint AND layer = $layer AND percentile = $percentile
    GROUP BY region_id
) s USING (region_id)
WHERE e.model = $model AND e.checkpoint = $checkpoint AND e.layer = $layer AND e.percentile = $percentile
  AND coalesce(s.size, 0) <= 1
ORDER BY size, e.region_id
