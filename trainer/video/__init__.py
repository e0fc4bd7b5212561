"""``fmgs-prep video``: own monocular video -> HumanNeRF-format sequence (masks, BlazePose
keypoints, SMPL fit), offline. See :mod:`.pipeline`."""
