"""Seeing inside a trained CNN: feature maps, activation maximization, attributions, filter health.

One module per responsibility (layer capture and filter statistics are `cnnjax.nn`'s): `feature_maps`
(channel grids, the hierarchy overview), `actmax`, `attribution` (gradient, SmoothGrad, Integrated
Gradients, Grad-CAM, Grad-CAM++), `checks` (the numbers that say whether a picture informs),
`filter_health` (its figure), `html_report` (the self-contained page) and `run_report`
(`visualize_run`, what `cnnjax visualize` calls).
"""

# run_report first: importing it loads the submodule `filter_health`, which Python binds on this
# package; the function of that name, imported after, must win.
from cnnjax.visualize.run_report import visualize_run
from cnnjax.visualize import checks
from cnnjax.visualize.actmax import (ActMaxConfig, ActMaxResult, activation_maximization,
                                     pixel_bounds)
from cnnjax.visualize.attribution import (completeness_gap, grad_cam, gradient, integrated_gradients,
                                          logits_fn, smoothgrad, spearman)
from cnnjax.nn.capture import Layer, capture, conv_layers, list_layers, run_layers
from cnnjax.nn.health import FilterHealth, dead_filter_count, filter_health

__all__ = ["ActMaxConfig", "ActMaxResult", "FilterHealth", "Layer", "activation_maximization",
           "capture", "checks", "completeness_gap", "conv_layers", "dead_filter_count", "filter_health",
           "grad_cam", "gradient", "integrated_gradients", "list_layers", "logits_fn", "pixel_bounds",
           "run_layers", "smoothgrad", "spearman", "visualize_run"]
