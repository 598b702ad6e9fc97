"""This repository's study on POLEN23E, built on the library :mod:`cam`: data and download, the
synthetic stand-in, models and training, evaluation, the speed study, sweeps, shifts,
segmentation, the demo ViT and the notebook runner.

Needs the ``study`` extra (``pip install '.[study]'``; ``make venv`` installs it). The library
never imports this package; the notebooks import both.
"""
