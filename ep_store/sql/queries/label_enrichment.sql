-- Share of each region status's members (in B's stream) lying in labelled spans (chat-turn markers, refusal text).
-- params: a, b, b_model, b_checkpoint, b_layer, b_hook, b_percentile
-- needs: match, span_labels
WITH members AS (
    SELECT s.region_id, t.doc_id, t.char_start, t.char_end
    FROM assignments s JOIN tokens t USING (model, checkpoint, layer, hook, doc_id, pos)
    WHERE s.model = $b_model AND s.checkpoint = $b_checkpoint AND s.layer = $b_layer AND s.hook = $b_hook AND s.percentile = $b_percentile
      AND s.region_id >= 0
),
status AS (
    SELECT region_b AS region_id, status FROM matches WHERE a = $a AND b = $b AND region_b IS NOT NULL
),
labelled AS (
    SELECT m.region_id, m.doc_id, m.char_start,
           bool_or(l.label = 'marker') AS in_marker, bool_or(l.label = 'refusal') AS in_refusal
    FROM members m
    LEFT JOIN span_labels l
      ON l.doc_id = m.doc_id AND m.char_start < l.char_end AND l.char_start < m.char_end
    GROUP BY m.region_id, m.doc_id, m.char_start
)
SELECT st.status,
       count(*) AS members,
       count(*) FILTER (WHERE in_marker OR in_refusal) AS labelled,
       count(*) FILTER (WHERE in_marker) AS in_marker,
       count(*) FILTER (WHERE in_refusal) AS in_refusal,
       round(count(*) FILTER (WHERE in_marker OR in_refusal) / count(*), 4) AS labelled_share
FROM labelled JOIN status st USING (region_id)
GROUP BY st.status
ORDER BY st.status
