"""Features: what a run's model consumes, one registered class each (`feeds`: cached frozen features, a cached prefix,
pixels; the interface in `feed`), one frozen pass of a network and everything it gives under one key (`frozen`:
every pooling and any unit cut), batched augmentation (`augment`), where per-image embeddings come from (`sources`:
raw pixels, a frozen network, a trained checkpoint, an external file; `raw_pixels`, the training-free baseline; the
image sets of a split in `image_set`), the chunked cache of a checkpoint's embeddings (`cache`), which runtime runs a
frozen network (`runtime`) and the graph runtime itself (`graph_runtime`: cv2.dnn or onnxruntime).

May import: kinret's base modules, `data`, `models`.
"""
