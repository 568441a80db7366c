"""Multi-task merging of experts (local and non-local): TA, TIES, TALL / consensus, alignment, TACT and REPAIR."""
