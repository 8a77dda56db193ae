-- How shared tokens moved between regions of A and B: top region-to-region flows with their statuses.
-- params: a, b, limit
-- needs: match, same_stream
WITH o AS (
    SELECT * FROM match_overlaps WHERE a = $a AND b = $b
),
partner AS (
    SELECT region_a, region_b AS partner_b FROM matches WHERE a = $a AND b = $b AND status = 'preserved'
),
status_b AS (
    SELECT region_b, status AS status_b FROM matches WHERE a = $a AND b = $b AND region_b IS NOT NULL
)
SELECT o.region_a, o.region_b, o.overlap, round(o.recall, 4) AS share_of_a, round(o.precision, 4) AS share_of_b,
       coalesce(sb.status_b, 'preserved') AS status_b,
       (p.partner_b IS NOT NULL AND p.partner_b = o.region_b) AS to_partner
FROM o LEFT JOIN partner p USING (region_a) LEFT JOIN status_b sb USING (region_b)
ORDER BY o.overlap DESC, o.region_a, o.region_b
LIMIT $limit
