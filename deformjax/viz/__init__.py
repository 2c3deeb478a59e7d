"""Sampling-location plots, offset-field maps, effective dilation, result curves (matplotlib)."""

from deformjax.viz.plots import draw_offset_fields, draw_sampling_locations, feature_to_image, line_plot
from deformjax.viz.sampling import LayerField, effective_dilation, layer_fields, tap_grid, trace_sampling_points

__all__ = ['LayerField', 'draw_offset_fields', 'draw_sampling_locations', 'effective_dilation', 'feature_to_image',
           'layer_fields', 'line_plot', 'tap_grid', 'trace_sampling_points']
