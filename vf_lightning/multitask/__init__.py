"""Front-end adapters of the multi-task merge (``vf merge`` with ``mode: multitask`` and the Fashion-MNIST demo).

The library lives in :mod:`vf_lightning.merge.tasks` (TA / TIES / TALL / consensus),
:mod:`vf_lightning.merge.experts` (experts, multi-task network, alignment through foundations) and
:mod:`vf_lightning.merge.multitask` (TACT / REPAIR corrections, λ selection, :func:`merge_experts`).
"""
