"""Alignment engine: traced permutation specs, weight / activation / ZipIt / CCA matching, applying results."""

from vf_lightning.align.permute import (
    apply_permutation,
    check_compatible,
    check_permutation_invariance,
    identity_perms,
    invert_perm,
    permute_state_dict,
    random_perms,
)
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

__all__ = [
    "PermAxis",
    "PermGroup",
    "PermutationSpec",
    "Site",
    "UnsupportedOpError",
    "apply_permutation",
    "build_permutation_spec",
    "check_compatible",
    "check_permutation_invariance",
    "identity_perms",
    "invert_perm",
    "permute_state_dict",
    "random_perms",
    "register_function_handler",
    "register_module_handler",
]
