"""Write a Codalab submission for RFIW Track 3: `python make_submission.py --help` lists every option."""

import sys

from kinret.submission.make import main

if __name__ == "__main__":
    sys.exit(main())
