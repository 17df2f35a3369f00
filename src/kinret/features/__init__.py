"""Features: where per-image embeddings come from (`sources`: raw pixels, a frozen backbone, a trained
checkpoint, an external file; `raw_pixels`, the training-free baseline), the chunked, resumable cache of a network's
pooled features (`cache`), which runtime computes them (`runtime`) and the graph runtime itself (`graph_runtime`:
cv2.dnn or onnxruntime), and the cached frozen prefix of a fine-tune (`prefix`).

May import: kinret's base modules, `data`, `models`.
"""
