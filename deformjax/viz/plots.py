"""Matplotlib figures: sampling locations over an image, offset/mask maps, curves."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from deformjax.nn import DeformConv
from deformjax.viz.sampling import LayerField, _default_convs, layer_fields, trace_sampling_points

_PathLike = str | os.PathLike


def _plt() -> Any:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def feature_to_image(points: np.ndarray, stride: float) -> np.ndarray:
  """Feature-map (y, x) -> input pixel (y, x) for a map downsampled by `stride` (pixel centres aligned)."""
  return (points + 0.5) * stride - 0.5


def draw_sampling_locations(model: nnx.Module, image: np.ndarray, path: _PathLike, *,
                            convs: Sequence[nnx.Conv | DeformConv] | None = None,
                            start_yx: tuple[float, float] | None = None, depth: int = 3, stride: float = 4.0, title: str | None = None
                            ) -> dict[str, list[np.ndarray]]:
  """Draws the 9 / 81 / 729 points one output activation samples through `depth`
  stacked layers, learned (red) against the regular grid (blue), over `image`.

  Args:
    model: an NNX classifier (e.g. `deformjax.models.ConvClassifier`).
    image: `[H, W, C]` input image (already normalised as the model expects).
    path: PNG file to write.
    convs: the stacked same-resolution convs to trace (default: the last `depth`
      of `model.convs`).
    start_yx: output activation (default: the centre of the feature map).
    stride: input pixels per feature-map pixel at those layers (4 for ConvClassifier).

  Returns:
    `{'deformed': [...], 'regular': [...]}` points per depth, in image pixels.
  """
  import jax.numpy as jnp

  plt = _plt()
  convs = list(_default_convs(model))[-depth:] if convs is None else list(convs)
  fields = layer_fields(model, jnp.asarray(image[None]), convs=convs)
  if start_yx is None:
    ref = next((f.offsets for f in fields if f.offsets is not None), None)
    ho, wo = (ref.shape[1], ref.shape[2]) if ref is not None else (image.shape[0] // stride, image.shape[1] // stride)
    start_yx = ((ho - 1) / 2.0, (wo - 1) / 2.0)
  deformed = [feature_to_image(p, stride) for p in trace_sampling_points(fields, start_yx, deformed=True)]
  regular = [feature_to_image(p, stride) for p in trace_sampling_points(fields, start_yx, deformed=False)]
  centre = feature_to_image(np.asarray([start_yx], np.float64), stride)[0]
  fig, axes = plt.subplots(1, len(fields), figsize=(3.2 * len(fields), 3.7), squeeze=False, layout='constrained')
  shown = image[..., 0] if image.shape[-1] == 1 else np.clip(image, 0, 1)
  for d, ax in enumerate(axes[0]):
    ax.imshow(shown, cmap='gray' if image.shape[-1] == 1 else None)
    ax.scatter(regular[d][:, 1], regular[d][:, 0], s=6, c='tab:blue', alpha=0.6, label='regular grid')
    ax.scatter(deformed[d][:, 1], deformed[d][:, 0], s=6, c='tab:red', alpha=0.7, label='learned')
    ax.scatter([centre[1]], [centre[0]], s=40, c='lime', marker='x', label='activation')
    ax.set_title(f'{len(deformed[d])} points, {d + 1} layer{"s" if d else ""}')
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    ax.axis('off')
  axes[0][0].legend(loc='lower left', fontsize=7)
  if title:
    fig.suptitle(title)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return {'deformed': deformed, 'regular': regular}


def draw_offset_fields(fields: Sequence[LayerField], path: _PathLike, image_index: int = 0) -> None:
  """Per deformable layer: mean offset magnitude over taps and mean mask, as maps."""
  plt = _plt()
  shown = [f for f in fields if f.offsets is not None]
  if not shown:
    raise ValueError('draw_offset_fields: no deformable layer among the fields')
  rows = 2 if any(f.mask is not None for f in shown) else 1
  fig, axes = plt.subplots(rows, len(shown), figsize=(3.0 * len(shown), 2.8 * rows), squeeze=False)
  for i, f in enumerate(shown):
    assert f.offsets is not None  # shown: the layers with offsets
    off = f.offsets[image_index]
    mag = np.linalg.norm(off.reshape(*off.shape[:2], -1, 2), axis=-1).mean(-1)
    im = axes[0][i].imshow(mag, cmap='magma')
    axes[0][i].set_title(f'{f.name}: mean |offset| (px)', fontsize=8)
    fig.colorbar(im, ax=axes[0][i], fraction=0.046)
    if rows == 2:
      if f.mask is not None:
        im = axes[1][i].imshow(f.mask[image_index].mean(-1), cmap='viridis')
        axes[1][i].set_title(f'{f.name}: mean mask', fontsize=8)
        fig.colorbar(im, ax=axes[1][i], fraction=0.046)
      else:
        axes[1][i].axis('off')
  for ax in np.ravel(axes):
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def line_plot(xs: Sequence[float], series: Mapping[str, Sequence[float]], path: _PathLike, *, xlabel: str, ylabel: str,
              title: str = '', errors: Mapping[str, Sequence[float]] | None = None) -> None:
  """Curves with optional error bars (e.g. accuracy or effective dilation against scale)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for name, ys in series.items():
    err = None if errors is None else errors.get(name)
    ax.errorbar(xs, ys, yerr=err, marker='o', capsize=3, label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(pathlib.Path(path), dpi=120)
  plt.close(fig)


__all__ = ['draw_offset_fields', 'draw_sampling_locations', 'feature_to_image', 'line_plot']
