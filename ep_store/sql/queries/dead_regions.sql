-- Singleton and dead regions: regions with at most one assigned token (the exemplar itself, or none).
-- params: model, checkpoint, layer, hook, percentile
SELECT e.region_id, e.token AS exemplar_token, e.doc_id, e.pos, coalesce(s.size, 0) AS assigned_tokens,
       e.member_count AS build_members
FROM exemplars e
LEFT JOIN (
    SELECT region_id, count(*) AS size FROM assignments
    WHERE model = $model AND checkpoint = $checkpoint AND layer = $layer AND hook = $hook AND percentile = $percentile
    GROUP BY region_id
) s USING (region_id)
WHERE e.model = $model AND e.checkpoint = $checkpoint AND e.layer = $layer AND e.hook = $hook AND e.percentile = $percentile
  AND coalesce(s.size, 0) <= 1
ORDER BY assigned_tokens, e.region_id
