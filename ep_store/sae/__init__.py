"""EP against a sparse autoencoder on the same activations (issue 11).

    ep sae train --activations gemma-3-270m/base/L6 --name topk-8x --store data/store
    ep sae compare --dictionary gemma-3-270m/base/L6/p1 --sae topk-8x --store data/store --out DIR

``train`` fits a TopK SAE with SAELens, fed by batches streamed from the store's Lance
activations (bounded memory), and saves it in SAELens's own format; ``compare`` binarises
EP regions and SAE features the paper's way on held-out tokens and reports F1 overlaps,
probe accuracy and build compute. SAELens is an optional extra (``pip install .[sae]``);
it is imported only when an SAE is trained or loaded.
"""
