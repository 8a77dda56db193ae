-- Eligible EP regions and SAE features per comparison: >= $min_positives positive held-out tokens (EP counts stop at the stored top rows) (ep sae compare)
-- params: model, checkpoint, layer, hook, percentile, min_positives
SELECT sae, 'ep' AS side, region_id AS feature_id, count(*) AS positives
FROM ep_projections
WHERE model = $model AND checkpoint = $checkpoint AND layer = $layer AND hook = $hook AND percentile = $percentile AND projection > 0
GROUP BY 1, 2, 3 HAVING count(*) >= $min_positives
UNION ALL
SELECT sae, 'sae' AS side, feature_id, count(*) AS positives
FROM sae_activations
WHERE model = $model AND checkpoint = $checkpoint AND layer = $layer AND hook = $hook AND percentile = $percentile AND activation > 0
GROUP BY 1, 2, 3 HAVING count(*) >= $min_positives
ORDER BY 1, 2, 3
