"""uint8 images to files: PNG grids and GIF animations."""

import math

import numpy as np
from PIL import Image

from ihdm_jax import storage

MIN_TILE = 64  # smaller images are enlarged (nearest neighbour) to at least this many pixels
PAD = 2  # white pixels between the tiles of a grid


def tile_scale(size: int) -> int:
    """The enlargement of images of `size` pixels in a grid (to at least MIN_TILE)."""
    return max(1, -(-MIN_TILE // size))


def tile_centres(count: int, size: int) -> list:
    """The pixel positions of the centres of `count` tiles of images of `size` pixels along a
    grid's row or column."""
    tile = size * tile_scale(size)
    return [PAD + i * (tile + PAD) + tile / 2 for i in range(count)]


def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1] (values outside are clipped) as uint8."""
    return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def grid(images: np.ndarray, columns: int = 0, pad: int = PAD) -> np.ndarray:
    """uint8 NHWC images tiled row by row into one HWC image with `pad` white pixels between.

    columns = 0 picks a near-square grid. Images smaller than MIN_TILE are enlarged.
    """
    n, height, width, channels = images.shape
    scale = tile_scale(max(height, width))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    height, width = height * scale, width * scale
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = np.full(
        (rows * (height + pad) + pad, columns * (width + pad) + pad, channels), 255, np.uint8
    )
    for i, image in enumerate(images):
        top = pad + (i // columns) * (height + pad)
        left = pad + (i % columns) * (width + pad)
        canvas[top : top + height, left : left + width] = image
    return canvas


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def save_grid(path: str, images: np.ndarray, columns: int = 0):
    """Writes uint8 NHWC images as one PNG grid."""
    storage.write_with(path, _pil(grid(images, columns)).save, format='PNG')


def save_gif(path: str, frames, frame_ms: int = 80, last_frame_ms: int = 1500):
    """Writes uint8 HWC frames as a looping GIF that holds the last frame a little longer."""
    pictures = [_pil(frame) for frame in frames]
    durations = [frame_ms] * (len(pictures) - 1) + [last_frame_ms]
    storage.write_with(
        path,
        pictures[0].save,
        format='GIF',
        save_all=True,
        append_images=pictures[1:],
        duration=durations,
        loop=0,
    )
