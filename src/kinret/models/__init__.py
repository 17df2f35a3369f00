"""Models: what a run is (`config`: the frozen TrainConfig, overrides, seeds), the Siamese network (`networks`:
backbones, pooling, neck, pair combinations and FC head), the bundled SFace face network (`sface`), the losses
(`losses`), and a trained model rebuilt from its run folder (`checkpoint`).

Below both features and training: frozen backbones and checkpoints give features, and the trainer trains these.
May import: kinret's base modules and `data`.
"""
