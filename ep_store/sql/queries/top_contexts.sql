-- Top contexts per region: the members nearest the exemplar, with $context tokens either side.
-- params: model, checkpoint, layer, hook, percentile, limit, per_region, context
WITH ranked AS (
    SELECT a.region_id, a.doc_id, a.pos, a.distance,
           row_number() OVER (PARTITION BY a.region_id ORDER BY a.distance, a.doc_id, a.pos) AS rank
    FROM assignments a
    WHERE a.model = $model AND a.checkpoint = $checkpoint AND a.layer = $layer AND a.hook = $hook AND a.percentile = $percentile
      AND a.region_id >= 0
),
chosen AS (
    SELECT r.* FROM ranked r
    WHERE r.rank <= $per_region
      AND r.region_id IN (SELECT region_id FROM exemplars
                          WHERE model = $model AND checkpoint = $checkpoint AND layer = $layer AND hook = $hook
                            AND percentile = $percentile
                          ORDER BY member_count DESC, region_id LIMIT $limit)
),
window_tokens AS (
    SELECT c.region_id, c.rank, c.doc_id, c.pos, c.distance, t.pos AS tpos, t.token
    FROM chosen c
    JOIN tokens t
      ON t.model = $model AND t.checkpoint = $checkpoint AND t.layer = $layer AND t.hook = $hook
     AND t.doc_id = c.doc_id AND t.pos BETWEEN c.pos - $context AND c.pos + $context
)
SELECT region_id, rank, doc_id, pos, round(distance, 4) AS distance,
       coalesce(string_agg(token, '' ORDER BY tpos) FILTER (WHERE tpos < pos), '') AS left_text,
       max(token) FILTER (WHERE tpos = pos) AS token,
       coalesce(string_agg(token, '' ORDER BY tpos) FILTER (WHERE tpos > pos), '') AS right_text
FROM window_tokens
GROUP BY region_id, rank, doc_id, pos, distance
ORDER BY region_id, rank
