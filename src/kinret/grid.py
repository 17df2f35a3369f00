"""``python -m kinret.grid -C <experiment> [--jobs N]``: train every variant and fold of an experiment's grid (see
`kinret.train.grid`)."""

from kinret.train.grid import main

if __name__ == "__main__":
    raise SystemExit(main())
