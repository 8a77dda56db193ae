-- Membership overlap of two dictionaries over the same stream, matched by (doc_id, pos).
-- params: a_model, a_checkpoint, a_layer, a_hook, a_percentile, b_model, b_checkpoint, b_layer, b_hook, b_percentile
-- needs: same_stream
SELECT a.region_id AS region_a, b.region_id AS region_b, count(*)::DOUBLE AS overlap
FROM assignments a
JOIN assignments b ON a.doc_id = b.doc_id AND a.pos = b.pos
WHERE a.model = $a_model AND a.checkpoint = $a_checkpoint AND a.layer = $a_layer AND a.hook = $a_hook AND a.percentile = $a_percentile
  AND b.model = $b_model AND b.checkpoint = $b_checkpoint AND b.layer = $b_layer AND b.hook = $b_hook AND b.percentile = $b_percentile
  AND a.region_id >= 0 AND b.region_id >= 0
GROUP BY 1, 2
ORDER BY 1, 2
