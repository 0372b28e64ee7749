"""Frozen-feature evaluation: weighted kNN, linear probe, few-shot, with long-tail metrics."""

from .features import FeatureSet, check_model, default_device, extract_features
from .knn import weighted_knn_predict
from .metrics import classification_metrics
from .protocols import few_shot_protocol, knn_protocol, linear_protocol
from .run import check_result_path, evaluate_backbone, model_index_results, write_result

__all__ = [
    "FeatureSet",
    "check_model",
    "check_result_path",
    "classification_metrics",
    "default_device",
    "evaluate_backbone",
    "extract_features",
    "few_shot_protocol",
    "knn_protocol",
    "linear_protocol",
    "model_index_results",
    "weighted_knn_predict",
    "write_result",
]
