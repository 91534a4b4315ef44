"""hotmodel's benchmarks: ``python -m bench`` (see ``bench/__main__.py``).

- ``harness``: settings, demo configs, `hotmodel serve` and the bare router, the one
  HTTP client, the three paths, percentiles, the memory sampler, the machine;
- ``results``: the one result writer (JSON, targets, Markdown tables);
- ``sections/<name>.py``: one per section of the one run, named as the section;
- ``studies/<name>.py``: one question each (``python -m bench <name> --help``).
"""
