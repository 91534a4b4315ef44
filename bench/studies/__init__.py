"""Studies: one question each, beside the one run (``python -m bench <name> --help``)."""
