-- Members per region: assigned tokens, mean and max distance to the exemplar.
-- params: model, checkpoint, layer, hook, percentile
SELECT region_id, count(*) AS assigned_tokens, avg(distance) AS mean_distance, max(distance) AS max_distance
FROM assignments
WHERE model = $model AND checkpoint = $checkpoint AND layer = $layer AND hook = $hook AND percentile = $percentile
  AND region_id >= 0
GROUP BY region_id
ORDER BY assigned_tokens DESC, region_id
