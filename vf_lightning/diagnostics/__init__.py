"""Diagnostics: variance ratio, vanishing-feature profile and envelope, params/FLOPs, plots, the HTML report."""

from vf_lightning.diagnostics.complexity import count_flops, count_params
from vf_lightning.diagnostics.html import render_report_html, report_title, write_report_html
from vf_lightning.diagnostics.plots import (
    plot_interpolation_curves,
    plot_layer_curves,
    plot_multitask_accuracy,
    plot_prune_accuracy,
    plot_variance_ratios,
    plot_vf_profiles,
)
from vf_lightning.diagnostics.vanishing import depth_profile, envelope, vf_layers, vf_profile, vf_ratio
from vf_lightning.diagnostics.variance import variance_ratio, variance_ratio_from_stats

__all__ = [
    "count_flops",
    "count_params",
    "depth_profile",
    "envelope",
    "plot_interpolation_curves",
    "plot_layer_curves",
    "plot_multitask_accuracy",
    "plot_prune_accuracy",
    "plot_variance_ratios",
    "plot_vf_profiles",
    "render_report_html",
    "variance_ratio",
    "variance_ratio_from_stats",
    "vf_layers",
    "vf_profile",
    "vf_ratio",
    "report_title",
    "write_report_html",
]
