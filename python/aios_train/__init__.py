"""aios_train: PyTorch reference model, data preparation, training and Parquet export for aios.

The Rust runtime (`aios_rt`) does inference; this package trains, exports and evaluates.
"""

__version__ = "0.1.0"
