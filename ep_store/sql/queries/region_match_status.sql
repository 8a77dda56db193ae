-- Match status (preserved, introduced) of each region of this dictionary in every match where it is B (ep match A B).
-- params: key, limit
-- needs: match
SELECT m.b, m.region_b, m.a, m.region_a, m.status, m.cosine, m.distance_theta, m.f1
FROM matches m
WHERE m.b = $key
ORDER BY m.region_b, m.a
LIMIT $limit
