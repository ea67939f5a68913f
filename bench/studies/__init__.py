"""Finished studies: run on demand (``python -m bench.studies.NAME``), not by ``make bench``; see README.md."""
