"""Calibration and evaluation text: local files, datasets, the offline corpora, token windows."""
