-- Transition summary: shared tokens of A by where they land in B (matched partner, other preserved, introduced).
-- params: a, b
-- needs: match, same_stream
WITH o AS (SELECT * FROM match_overlaps WHERE a = $a AND b = $b),
partner AS (SELECT region_a, region_b AS partner_b FROM matches WHERE a = $a AND b = $b AND status = 'preserved'),
status_b AS (SELECT region_b, status FROM matches WHERE a = $a AND b = $b AND region_b IS NOT NULL)
SELECT CASE WHEN p.partner_b = o.region_b THEN 'stayed with matched region'
            WHEN sb.status = 'introduced' THEN 'moved to an introduced region'
            ELSE 'moved to another preserved region' END AS destination,
       sum(o.overlap) AS tokens,
       round(sum(o.overlap) / (SELECT sum(overlap) FROM o), 4) AS share
FROM o LEFT JOIN partner p USING (region_a) LEFT JOIN status_b sb USING (region_b)
GROUP BY 1
ORDER BY 2 DESC, 1
