-- Top tokens per region, with purity (share of the top token) and entropy (bits) of its token mix.
-- params: model, checkpoint, layer, hook, percentile, limit, top
WITH members AS (
    SELECT a.region_id, t.token
    FROM assignments a
    JOIN tokens t
      ON t.model = a.model AND t.checkpoint = a.checkpoint AND t.layer = a.layer AND t.hook = a.hook
     AND t.doc_id = a.doc_id AND t.pos = a.pos
    WHERE a.model = $model AND a.checkpoint = $checkpoint AND a.layer = $layer AND a.hook = $hook AND a.percentile = $percentile
      AND a.region_id >= 0
),
counts AS (
    SELECT region_id, token, count(*) AS n FROM members GROUP BY region_id, token
),
per_region AS (
    SELECT region_id, sum(n) AS assigned_tokens, max(n) AS top_n,
           -sum(n * log2(n)) / sum(n) + log2(sum(n)) AS entropy_bits
    FROM counts GROUP BY region_id
),
ranked AS (
    SELECT region_id, token, n, row_number() OVER (PARTITION BY region_id ORDER BY n DESC, token) AS rank
    FROM counts
)
SELECT p.region_id, p.assigned_tokens,
       list(r.token ORDER BY r.rank) AS top_tokens,
       list(r.n ORDER BY r.rank) AS top_counts,
       round(p.top_n / p.assigned_tokens, 4) AS purity,
       round(p.entropy_bits, 4) AS entropy_bits
FROM per_region p JOIN ranked r USING (region_id)
WHERE r.rank <= $top
GROUP BY p.region_id, p.assigned_tokens, p.top_n, p.entropy_bits
ORDER BY p.assigned_tokens DESC, p.region_id
LIMIT $limit
