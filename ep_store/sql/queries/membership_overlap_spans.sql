-- Membership overlap of two dictionaries whose tokenizers differ: characters shared by overlapping token spans.
-- params: a_model, a_checkpoint, a_layer, a_hook, a_percentile, b_model, b_checkpoint, b_layer, b_hook, b_percentile
-- needs: same_stream
WITH a AS (
    SELECT s.region_id, t.doc_id, t.char_start, t.char_end
    FROM assignments s JOIN tokens t USING (model, checkpoint, layer, hook, doc_id, pos)
    WHERE s.model = $a_model AND s.checkpoint = $a_checkpoint AND s.layer = $a_layer AND s.hook = $a_hook AND s.percentile = $a_percentile
      AND s.region_id >= 0
),
b AS (
    SELECT s.region_id, t.doc_id, t.char_start, t.char_end
    FROM assignments s JOIN tokens t USING (model, checkpoint, layer, hook, doc_id, pos)
    WHERE s.model = $b_model AND s.checkpoint = $b_checkpoint AND s.layer = $b_layer AND s.hook = $b_hook AND s.percentile = $b_percentile
      AND s.region_id >= 0
)
SELECT a.region_id AS region_a, b.region_id AS region_b,
       sum(least(a.char_end, b.char_end) - greatest(a.char_start, b.char_start))::DOUBLE AS overlap
FROM a JOIN b
  ON a.doc_id = b.doc_id AND a.char_start < b.char_end AND b.char_start < a.char_end
GROUP BY 1, 2
ORDER BY 1, 2
