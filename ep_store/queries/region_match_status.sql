-- Match status (preserved, introduced) of each region of this dictionary in every match where it is B (ep match A B).
-- params: model, checkpoint, layer, percentile, limit
-- needs: match
SELECT m.b, m.region_b, m.a, m.region_a, m.status, m.cosine, m.distance_theta, m.f1
FROM matches m
JOIN dictionaries d ON d.key = m.b
WHERE d.model = $model AND d.checkpoint = $checkpoint AND d.layer = $layer AND d.percentile = $percentile
ORDER BY m.region_b, m.a
LIMIT $limit
