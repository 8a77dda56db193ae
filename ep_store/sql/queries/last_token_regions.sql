-- Region of each document's last token (for a prompt corpus: where generation starts), with its region's size and coherence.
-- params: model, checkpoint, layer, hook, percentile, limit
WITH last AS (
    SELECT doc_id, max(pos) AS pos
    FROM tokens
    WHERE model = $model AND checkpoint = $checkpoint AND layer = $layer AND hook = $hook
    GROUP BY doc_id
)
SELECT a.doc_id, a.pos, a.region_id, a.distance, e.member_count, e.coherence
FROM assignments a
JOIN last USING (doc_id, pos)
LEFT JOIN exemplars e
    ON e.model = a.model AND e.checkpoint = a.checkpoint AND e.layer = a.layer AND e.hook = a.hook
    AND e.percentile = a.percentile AND e.region_id = a.region_id
WHERE a.model = $model AND a.checkpoint = $checkpoint AND a.layer = $layer AND a.hook = $hook AND a.percentile = $percentile
ORDER BY a.doc_id
LIMIT $limit
