"""The submission stage: the Codalab `predictions.csv` and its zip, written and read back (`predictions`), the
report beside it (`report`: CMC curves, score histogram, retrieval grid, the variant table), the final fit on every
labelled family (`final_fit`), the record of a run (`record`), disk use and `--clean-cache` (`disk`), the dry run's
estimates from what runs recorded (`estimate`, the work counted in their units: `workload`, the dry run and the space
check: `planning`), and ``make_submission.py`` itself (`options`: its typed options; `make`: train what is missing, run
the ensemble, submit, report).

May import every other stage.
"""
