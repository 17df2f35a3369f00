"""Score every variant, evaluate it out of fold and choose the best or a blend (trains nothing):

    python ensemble/choose.py [--data-root DIR] [--experiments EXP ...] [--choose auto|best|blend]

Same as ``python -m kinret.ensemble``; ``python make_submission.py`` runs this stage between training and writing
the submission. Drop a team's own variants into ``ensemble/external/NAME/`` (see ensemble/README.md).
"""

import sys

from kinret.ensemble.cli import main

if __name__ == "__main__":
    sys.exit(main())
