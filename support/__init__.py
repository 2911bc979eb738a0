"""What the scripts need that is not the algorithm (`dmd2.py`), one module per concern (see README.md, Files)."""
