"""Models: what a run is (`config`: the frozen TrainConfig, overrides, seeds), the Siamese network (`networks`:
the backbones by name, pooling, neck, pair combinations and FC head, freezing), a backbone as a chain of units whose
first ones can be frozen and cached (`units`: `UnitChain`, and `NativeEmbedding` for a network's own embedding
layer), any ONNX face network as a trainable module (`onnx_graph`, `onnx_ops`, `onnx_chain`, `onnx_net`),
arcface_torch's IResNets (`iresnet`), the bundled SFace file (`sface`), the losses and their batches (`losses`), and
a trained run's checkpoint read back (`checkpoint`).

Below both features and training: frozen backbones and checkpoints give features, and the trainer trains these.
May import: kinret's base modules and `data`.
"""
