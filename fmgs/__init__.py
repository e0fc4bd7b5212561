"""fmgs: the torch-free core of FMGS-Avatar.

Body-model math (SMPL forward kinematics and LBS in NumPy), safe pickle
loading, canonical surfel layout, cameras and shared configuration. Nothing in
this package may import torch (``tests/test_no_torch.py`` enforces it).
"""

__version__ = "0.1.0"
