"""Shared code of the replication book, in four layers (``README.md`` beside this file:
the layers, the one import rule, where a new chapter's code goes, and the picture of
who imports whom; ``tests/test_layers.py`` enforces it):

- core: :mod:`~replbook.config` (the parameters cell: presets, rules, seeds, threads),
  :mod:`~replbook.paths` (the repo, the results folder, the verified cache),
  :mod:`~replbook.results` (verdict rules, tolerances, the regression guard),
  :mod:`~replbook.plotting`, :mod:`~replbook.scoreboard`
- organisms: :mod:`~replbook.models` (the model registry), :mod:`~replbook.lm`,
  :mod:`~replbook.cliplike`, :mod:`~replbook.captionclip`, :mod:`~replbook.data` (offline data)
- papers: one module per chapter's method (``replbook.zoo`` is chapter 00, ...)
- commands: :mod:`~replbook.cli` (``replbook run | prepare | stability | build``),
  :mod:`~replbook.runner` (papermill runs, publishing, the site build),
  :mod:`~replbook.prepare`, :mod:`~replbook.stability`
"""

import warnings

__version__ = "0.1.0"

# huggingface_hub imports tqdm.auto, which warns inside Jupyter when ipywidgets is absent;
# progress bars then fall back to text, which is what the book wants
warnings.filterwarnings("ignore", message="IProgress not found")
