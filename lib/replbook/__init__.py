"""Shared code of the replication book.

Modules, each small and tested:

- :mod:`replbook.paths`     where the repo, the results and the cache live
- :mod:`replbook.config`    the parameters cell: presets, validation, seeds, threads
- :mod:`replbook.models`    the model registry (offline packages, hub ids, tiny test models)
- :mod:`replbook.data`      small offline data (sample photos shipped in packages)
- :mod:`replbook.results`   verdict rules (decisive and supporting checks), tolerances and the
  regression guard (``compare``), results files, the chapter's verdict boxes
- :mod:`replbook.stability` verdicts over seeds: ``results/stability/<slug>.json``
- :mod:`replbook.cli`       ``replbook run`` (publishes only finished book/paper runs), ``stability``, ``build``
- :mod:`replbook.plotting`  one plot style, PNG figures
- :mod:`replbook.scoreboard` the landing page's table, built from ``results/*.json``
- one module per paper's method (``replbook.zoo`` for chapter 00, ...)
"""

import warnings

__version__ = "0.1.0"

# huggingface_hub imports tqdm.auto, which warns inside Jupyter when ipywidgets is absent;
# progress bars then fall back to text, which is what the book wants
warnings.filterwarnings("ignore", message="IProgress not found")
