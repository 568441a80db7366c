"""Alignment engine: traced permutation specs, weight / activation / ZipIt / CCA matching, applying results.

Entry point: ``align(model_a, model_b, method, loader=..., example_input=...)`` with ``method`` one of
``available_matchers()`` (identity | weight | activation | zip | cca).
"""

from vf_lightning.align.api import (
    MATCHERS,
    activation_matching,
    align,
    available_matchers,
    cca_matching,
    get_matcher,
    identity_matching,
    perms_from_stats,
    register_matcher,
    weight_matcher,
    zip_matching,
)
from vf_lightning.align.graph import ModelGraph
from vf_lightning.align.multi import MultiAlignment, align_many, average_models
from vf_lightning.align.permute import (
    apply_permutation,
    check_compatible,
    check_permutation_invariance,
    check_spec_matches,
    identity_perms,
    invert_perm,
    permute_state_dict,
    random_perms,
)
from vf_lightning.align.results import AlignmentResult, GroupTransform
from vf_lightning.align.spec import (
    PermAxis,
    PermGroup,
    PermutationSpec,
    Site,
    UnsupportedOpError,
    build_permutation_spec,
    register_function_handler,
    register_module_handler,
)
from vf_lightning.align.statistics import CrossMoments, activation_statistics, cross_correlation, record_sites
from vf_lightning.align.transforms import (
    cca_transform,
    merge_models,
    model_maps,
    transform_model,
    transform_state_dict,
    zipit_transform,
)
from vf_lightning.align.weight_matching import solve_lap, weight_matching

__all__ = [
    "MATCHERS",
    "AlignmentResult",
    "CrossMoments",
    "GroupTransform",
    "ModelGraph",
    "MultiAlignment",
    "PermAxis",
    "PermGroup",
    "PermutationSpec",
    "Site",
    "UnsupportedOpError",
    "activation_matching",
    "activation_statistics",
    "align",
    "align_many",
    "apply_permutation",
    "available_matchers",
    "average_models",
    "build_permutation_spec",
    "cca_matching",
    "cca_transform",
    "check_compatible",
    "check_permutation_invariance",
    "check_spec_matches",
    "cross_correlation",
    "get_matcher",
    "identity_matching",
    "identity_perms",
    "invert_perm",
    "merge_models",
    "model_maps",
    "permute_state_dict",
    "perms_from_stats",
    "random_perms",
    "record_sites",
    "register_function_handler",
    "register_matcher",
    "register_module_handler",
    "solve_lap",
    "transform_model",
    "transform_state_dict",
    "weight_matcher",
    "weight_matching",
    "zip_matching",
    "zipit_transform",
]
