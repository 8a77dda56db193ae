-- Match status (preserved, introduced) of picked regions of B in every match against it; needs a registered table picked(key, region_id).
SELECT p.key AS b, p.region_id AS region_b, m.a, m.region_a, m.status, m.cosine, m.distance_theta, m.f1
FROM picked p
LEFT JOIN matches m ON m.b = p.key AND m.region_b = p.region_id
ORDER BY p.key, p.region_id, m.a
LIMIT $limit
