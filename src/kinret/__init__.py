"""kinret: a competition kit for RFIW Track 3, search and retrieval of family members.

The package is laid out as the data flows, one subpackage a stage; a module imports only from its own stage and
the stages listed before it (tests/test_layout.py checks this, lazy imports included):

    errors, io, log, cli, dist, metrics, plots   the base: input errors, atomic writes, logging, command-line
                                          rules, devices and torch.distributed start-up, retrieval metrics, PNGs
    data/        the data folder read once, FIW folders, Codalab lists, images, pixel arrays, Track-3 splits and
                 protocols, the synthetic default, data figures
    models/      what a run is (its config), the networks (pooling, neck, FC head), the face networks (any ONNX
                 graph, the bundled SFace, arcface_torch IResNets), the losses, a trained model read back
    features/    sources of per-image embeddings (raw pixels, frozen backbones, checkpoints, external files), the
                 frozen-feature cache, the graph runtime, the cached frozen prefix of a fine-tune
    scoring/     similarities and fusion, the kinds of variant, re-scoring, ranking, the score store, the protocols
    train/       experiments, augmentation, the trainer, held-out evaluation, run folders, the grid, figures
    ensemble/    the settings, variant discovery, the ensemble run, selection and blending, the variant table
    submission/  predictions.csv and its zip, the report, the final fit, make_submission.py

Commands: ``python -m kinret.train``, ``kinret.grid``, ``kinret.ensemble``, ``kinret.evaluate``,
``kinret.protocol``, ``kinret.synth``, ``kinret.data check``, and ``make_submission.py`` at the repository root.
"""

__version__ = "0.1.0"
