"""kinret: a competition kit for RFIW Track 3, search and retrieval of family members.

The package is laid out as the data flows, one subpackage a stage; a module imports only from its own stage and
the stages listed before it (tests/test_layout.py checks this, lazy imports included):

    errors, io, log, cli, dist, metrics   the base: input errors, atomic writes, logging, command-line rules,
                                          torch.distributed start-up, pure retrieval metrics
    data/        FIW folders, Codalab lists, images, pixel arrays, splits and protocols, the synthetic default
    models/      what a run is (its config), the networks (backbones, pooling, neck, FC head, SFace), the losses,
                 and a trained model read back from its run folder
    features/    sources of per-image embeddings (raw pixels, frozen backbones, checkpoints, external files) and
                 the chunked feature cache
    scoring/     similarities and aggregation, ranking, the score store, the splits scored and the variants
    train/       experiments, batch sampling and augmentation, the trainer, run folders, the grid
    ensemble/    variant discovery, the ensemble run, selection and blending, the variant table
    submission/  predictions.csv and its zip, the report, make_submission.py

Commands: ``python -m kinret.train``, ``kinret.grid``, ``kinret.ensemble``, ``kinret.evaluate``,
``kinret.protocol``, ``kinret.synth``, and ``make_submission.py`` at the repository root.
"""

__version__ = "0.1.0"
