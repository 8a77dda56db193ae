-- Saturation curve: new regions per build batch, and regions so far, against tokens streamed.
-- params: model, checkpoint, layer, hook, percentile
SELECT batch, tokens, new_regions, regions
FROM saturation
WHERE model = $model AND checkpoint = $checkpoint AND layer = $layer AND hook = $hook AND percentile = $percentile
ORDER BY batch
