"""fmgs.trainer: PyTorch fitting of an FMGS avatar (datasets, fields, rasteriser, training, evaluation)."""
