"""robustkern's command-line application: ``robustkern train|eval|certify|analyze|bench|demo|info``.

JSON experiment configs (``python/configs``), data sets, the model zoo and the training loop. It uses only
robustkern's public API; methods whose library part is not installed exit with code 4.
"""
__version__ = "0.1.0"
