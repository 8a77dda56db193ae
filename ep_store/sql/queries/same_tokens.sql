-- Do two activation datasets hold the same tokens at the same (doc_id, pos)? Shared and differing rows.
-- params: a_model, a_checkpoint, a_layer, b_model, b_checkpoint, b_layer
-- needs: same_stream
SELECT count(*) AS shared, count(*) FILTER (WHERE a.token_id <> b.token_id) AS differing
FROM tokens a JOIN tokens b ON a.doc_id = b.doc_id AND a.pos = b.pos
WHERE a.model = $a_model AND a.checkpoint = $a_checkpoint AND a.layer = $a_layer
  AND b.model = $b_model AND b.checkpoint = $b_checkpoint AND b.layer = $b_layer
