-- EP regions vs SAE features: F1 of every overlapping pair, each binarised as its top-$top_n positive held-out tokens (ep sae compare)
-- params: model, checkpoint, layer, hook, percentile, top_n, min_positives
WITH sae_ranked AS (
    SELECT sae, feature_id, doc_id, pos,
           row_number() OVER (PARTITION BY sae, feature_id ORDER BY activation DESC, doc_id, pos) AS rank,
           count(*) OVER (PARTITION BY sae, feature_id) AS positives
    FROM sae_activations
    WHERE model = $model AND checkpoint = $checkpoint AND layer = $layer AND hook = $hook AND percentile = $percentile
      AND activation > 0
), ep_ranked AS (
    SELECT sae, region_id, doc_id, pos,
           row_number() OVER (PARTITION BY sae, region_id ORDER BY projection DESC, doc_id, pos) AS rank,
           count(*) OVER (PARTITION BY sae, region_id) AS positives
    FROM ep_projections
    WHERE model = $model AND checkpoint = $checkpoint AND layer = $layer AND hook = $hook AND percentile = $percentile
      AND projection > 0
), sae_sets AS (
    SELECT sae, feature_id, doc_id, pos, least(positives, $top_n) AS size
    FROM sae_ranked WHERE rank <= $top_n AND positives >= $min_positives
), ep_sets AS (
    SELECT sae, region_id, doc_id, pos, least(positives, $top_n) AS size
    FROM ep_ranked WHERE rank <= $top_n AND positives >= $min_positives
)
SELECT e.sae, e.region_id, s.feature_id, count(*)::DOUBLE AS overlap,
       any_value(e.size)::DOUBLE AS region_size, any_value(s.size)::DOUBLE AS feature_size,
       2 * count(*) / (any_value(e.size) + any_value(s.size))::DOUBLE AS f1
FROM ep_sets e
JOIN sae_sets s ON e.sae = s.sae AND e.doc_id = s.doc_id AND e.pos = s.pos
GROUP BY e.sae, e.region_id, s.feature_id
ORDER BY e.sae, e.region_id, s.feature_id
