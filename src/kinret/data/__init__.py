"""The data stage: a data folder read once (`layout`: `DataLayout`), FIW family folders and mid.csv (`fiw`), the
Codalab index and labelled lists (`lists`), image decoding (`images`), pixel arrays cached per input size (`pixels`),
a Track-3 split, its Codalab layout and the protocol builder (`track3`), the synthetic default in the FIW layout
(`synth`, `synth_faces`, `synth_photo`), figures of a data folder (`figures`), its check (`check`), and where a
data set's runs, tables and submissions live (`workspace`).

May import: kinret's base modules.
"""

from pathlib import Path

DEFAULT_ROOT = Path("data") / "synthetic"  # the embedded default: the synthetic dataset, generated on first use
FINAL_FIT = -2  # the fold of a final fit: every labelled family (train and val) trained on, nothing held out
