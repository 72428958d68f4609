"""robustkern's command-line application: ``robustkern train|eval|certify|analyze|bench|demo|info``.

JSON experiment configs (``python/configs``), data sets, the training loop, evaluation and certification. It
imports robustkern's public API (the model zoo is ``robustkern.models``); optional third-party packages
(scikit-learn, matplotlib, tensorboard) are imported where needed, with one line saying how to install them.
"""
__version__ = "0.1.0"
