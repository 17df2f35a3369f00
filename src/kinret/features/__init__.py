"""Features: where per-image embeddings come from (`sources`: raw pixels, a frozen backbone, a trained
checkpoint, an external file; `raw_pixels`, the training-free baseline), and the chunked, resumable cache of a
network's pooled features with the mirror image (`cache`).

May import: kinret's base modules, `data`, `models`.
"""
