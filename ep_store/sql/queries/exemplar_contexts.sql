-- Exemplar of each region in its context: the token that founded the region, $context tokens either side.
-- params: model, checkpoint, layer, hook, percentile, limit, context
WITH ex AS (
    SELECT region_id, doc_id, pos, member_count, coherence
    FROM exemplars
    WHERE model = $model AND checkpoint = $checkpoint AND layer = $layer AND hook = $hook AND percentile = $percentile
),
window_tokens AS (
    SELECT ex.*, t.pos AS tpos, t.token
    FROM ex
    JOIN tokens t
      ON t.model = $model AND t.checkpoint = $checkpoint AND t.layer = $layer AND t.hook = $hook
     AND t.doc_id = ex.doc_id AND t.pos BETWEEN ex.pos - $context AND ex.pos + $context
)
SELECT region_id, doc_id, pos, member_count, coherence,
       coalesce(string_agg(token, '' ORDER BY tpos) FILTER (WHERE tpos < pos), '') AS left_text,
       max(token) FILTER (WHERE tpos = pos) AS token,
       coalesce(string_agg(token, '' ORDER BY tpos) FILTER (WHERE tpos > pos), '') AS right_text
FROM window_tokens
GROUP BY region_id, doc_id, pos, member_count, coherence
ORDER BY member_count DESC, region_id
LIMIT $limit
