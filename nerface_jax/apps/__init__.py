"""The command-line programs: `train.py`, `render.py` and `preprocess.py` at
the top of the repository, and the `nerface-train`, `nerface-render` and
`nerface-preprocess` commands of an installed package, run these."""
