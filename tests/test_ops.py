"""Pixel shuffle against docs/reference/emit.md 2.2's channel table; bicubic resize against torch."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from emit_jax.models.internvit import bicubic_matrix, resize_pos_embed
from emit_jax.models.internvl import pixel_shuffle


def test_pixel_shuffle_channel_order_spec_table():
    g, c = 8, 5
    x = np.random.RandomState(0).randn(2, g, g, c).astype(np.float32)
    y = np.asarray(pixel_shuffle(jnp.asarray(x), 0.5))
    assert y.shape == (2, g // 2, g // 2, 4 * c)
    for r2 in range(g // 2):
        for c2 in range(g // 2):
            for dr in (0, 1):
                for dc in (0, 1):
                    block = (dr * 2 + dc) * c  # docs/reference/emit.md 2.2: channel (dr*2 + dc)*C + ch
                    np.testing.assert_array_equal(y[:, r2, c2, block:block + c],
                                                  x[:, 2 * r2 + dr, 2 * c2 + dc])


def test_pixel_shuffle_equals_transformers():
    from transformers.models.internvl.modeling_internvl import InternVLModel

    x = np.random.RandomState(1).randn(3, 6, 6, 4).astype(np.float32)
    ref = InternVLModel.pixel_shuffle(None, torch.tensor(x), 0.5).numpy()
    np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(x), 0.5)), ref)


@pytest.mark.parametrize("src,dst", [(4, 6), (6, 4), (32, 16), (5, 9), (4, 4)])
def test_bicubic_matches_torch_interpolate(src, dst):
    x = np.random.RandomState(src * dst).randn(src, src, 3).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.tensor(x).permute(2, 0, 1)[None], size=(dst, dst),
                                          mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    out = np.asarray(resize_pos_embed(jnp.asarray(x), dst, dst))
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)
    if src == dst:
        np.testing.assert_allclose(bicubic_matrix(src, dst), np.eye(src), atol=1e-12)
