-- Do two activation datasets hold the same tokens at the same (doc_id, pos)? Shared and differing rows.
-- params: a_model, a_checkpoint, a_layer, a_hook, b_model, b_checkpoint, b_layer, b_hook
-- needs: same_stream
SELECT count(*) AS shared, count(*) FILTER (WHERE a.token_id <> b.token_id) AS differing
FROM tokens a JOIN tokens b ON a.doc_id = b.doc_id AND a.pos = b.pos
WHERE a.model = $a_model AND a.checkpoint = $a_checkpoint AND a.layer = $a_layer AND a.hook = $a_hook
  AND b.model = $b_model AND b.checkpoint = $b_checkpoint AND b.layer = $b_layer AND b.hook = $b_hook
