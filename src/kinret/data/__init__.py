"""The data stage: FIW family folders and mid.csv (`fiw`), the Codalab index and labelled lists (`lists`), image
decoding (`images`), pixel arrays cached per input size (`pixels`), a Track-3 split, its Codalab layout and the
protocol builder (`split`), and the synthetic default in the FIW layout (`synth`, `synth_faces`,
`synth_photo`).

May import: kinret's base modules (errors, io, log, metrics).
"""

from pathlib import Path

DEFAULT_ROOT = Path("data") / "synthetic"  # the embedded default: the synthetic dataset, generated on first use
FINAL_FIT = -2  # the fold of a final fit: every labelled family (train and val) trained on, nothing held out
