"""Post-merge and post-prune normalization: RESET, REPAIR, RESCALE, RESHIFT, bias calibration, zero bias."""

from vf_lightning.repair.bias import bias_calibrate, bias_calibrate_merged, bias_depths, zero_bias
from vf_lightning.repair.correct import (
    Measure,
    affine_coefficients,
    affine_correct,
    calibration_inputs,
    reset_bn_stats,
    sequential_estimate,
)
from vf_lightning.repair.fold import FoldPlans, ensure_biases, fold_affine, inference_copy
from vf_lightning.repair.goals import Goals, combine_goals, compute_goals, evaluated_stats, reference_stats
from vf_lightning.repair.registry import (
    NORMALIZATIONS,
    WEIGHT_ONLY,
    NormContext,
    auto_normalization,
    get_normalization,
    normalize,
    register_normalization,
)
from vf_lightning.repair.sites import (
    batchnorm_sites,
    default_correction_sites,
    has_batchnorm,
    has_normalization,
    plan_sites,
    preactivation_sites,
)

__all__ = [
    "NORMALIZATIONS",
    "FoldPlans",
    "WEIGHT_ONLY",
    "Goals",
    "Measure",
    "NormContext",
    "affine_coefficients",
    "affine_correct",
    "auto_normalization",
    "batchnorm_sites",
    "bias_calibrate",
    "bias_calibrate_merged",
    "bias_depths",
    "calibration_inputs",
    "combine_goals",
    "compute_goals",
    "default_correction_sites",
    "ensure_biases",
    "fold_affine",
    "get_normalization",
    "inference_copy",
    "has_batchnorm",
    "has_normalization",
    "normalize",
    "plan_sites",
    "preactivation_sites",
    "evaluated_stats",
    "reference_stats",
    "register_normalization",
    "reset_bn_stats",
    "sequential_estimate",
    "zero_bias",
]
