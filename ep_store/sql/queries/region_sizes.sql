-- Region size distribution: regions and tokens per size bucket (powers of two).
-- params: model, checkpoint, layer, hook, percentile
WITH sizes AS (
    SELECT region_id, count(*) AS size
    FROM assignments
    WHERE model = $model AND checkpoint = $checkpoint AND layer = $layer AND hook = $hook AND percentile = $percentile
      AND region_id >= 0
    GROUP BY region_id
)
SELECT
    CAST(pow(2, floor(log2(size))) AS BIGINT) AS size_from,
    CAST(pow(2, floor(log2(size)) + 1) - 1 AS BIGINT) AS size_to,
    count(*) AS regions,
    sum(size) AS tokens
FROM sizes
GROUP BY 1, 2
ORDER BY 1
