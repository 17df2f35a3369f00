"""Models: what a run is (`config`: the frozen TrainConfig, overrides, seeds), the Siamese network (`networks`:
the backbones by name, pooling, neck, pair combinations and FC head), any ONNX face network as a trainable module
(`onnx_graph`, `onnx_ops`, `onnx_chain`, `onnx_net`), arcface_torch's IResNets (`iresnet`), the bundled SFace file
(`sface`), the losses and their batches (`losses`), and a trained model rebuilt from its run folder (`checkpoint`).

Below both features and training: frozen backbones and checkpoints give features, and the trainer trains these.
May import: kinret's base modules and `data`.
"""
