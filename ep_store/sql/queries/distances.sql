-- Distance (out-of-distribution score) distribution: tokens per 0.05-wide bin of cosine distance.
-- params: model, checkpoint, layer, hook, percentile
SELECT round(floor(distance / 0.05) * 0.05, 2) AS distance_from,
       round(floor(distance / 0.05) * 0.05 + 0.05, 2) AS distance_to,
       count(*) AS tokens
FROM assignments
WHERE model = $model AND checkpoint = $checkpoint AND layer = $layer AND hook = $hook AND percentile = $percentile
  AND region_id >= 0
GROUP BY 1, 2
ORDER BY 1
