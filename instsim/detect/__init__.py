"""instsim.detect: a small anchor-free centre-heatmap detector (CenterNet-style) that trains from scratch
on a CPU in under a minute at 64x64, with a twice-differentiable training loss for Neural-Sim and COCO
metrics via pycocotools.

Typical use::

    from instsim.detect import DetectorConfig, train_detector, predict, make_coco_gt, evaluate_coco
    model = train_detector(images, boxes, labels, DetectorConfig(), checkpoint_path="det.pt")
    dets = predict(model, test_images)
    metrics = evaluate_coco(make_coco_gt(test_boxes, test_labels, 64, class_names), dets)

Conventions: images ``(N, 3, H, W)`` float in ``[0, 1]`` (or uint8); boxes xywh pixels (left, top,
width, height; the pixel convention of :mod:`instsim.cameras`); labels 0-based class indices; COCO
category ids are ``label + 1``.
"""

from .coco import (
    detections_to_coco,
    evaluate_coco,
    load_coco,
    load_detections,
    make_coco_gt,
    validate_coco,
    validate_detections,
)
from .config import DetectorConfig
from .decode import Detections, box_iou, decode, decode_outputs, nms, predict
from .loss import compute_loss, detection_loss, focal_loss, loss_terms, regression_loss
from .model import CenterNet, DetectorOutput, build_detector
from .synthetic import SHAPE_NAMES, make_shapes_dataset
from .targets import DetectionTargets, encode_targets, gaussian_radius
from .train import (
    DetectorTrainingError,
    augment_batch,
    finetune,
    load_detector,
    lr_at,
    param_groups,
    save_detector,
    train_detector,
)

__all__ = [
    "DetectorConfig",
    "CenterNet",
    "DetectorOutput",
    "build_detector",
    "DetectionTargets",
    "encode_targets",
    "gaussian_radius",
    "focal_loss",
    "regression_loss",
    "loss_terms",
    "compute_loss",
    "detection_loss",
    "Detections",
    "box_iou",
    "nms",
    "decode",
    "decode_outputs",
    "predict",
    "make_coco_gt",
    "detections_to_coco",
    "validate_coco",
    "load_coco",
    "validate_detections",
    "load_detections",
    "evaluate_coco",
    "DetectorTrainingError",
    "lr_at",
    "augment_batch",
    "train_detector",
    "finetune",
    "param_groups",
    "save_detector",
    "load_detector",
    "SHAPE_NAMES",
    "make_shapes_dataset",
]
