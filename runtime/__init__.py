"""fmgs.runtime: the torch-free playback runtime (later issue). Must never import torch."""
