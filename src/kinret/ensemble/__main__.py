"""``python -m kinret.ensemble``: see `kinret.ensemble.cli`."""

from kinret.ensemble.cli import main

raise SystemExit(main())
