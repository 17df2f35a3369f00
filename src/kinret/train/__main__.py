"""``python -m kinret.train``: see `kinret.train.cli`."""

from kinret.train.cli import main

raise SystemExit(main())
