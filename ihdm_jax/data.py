"""Training images as global batches: tfds datasets, image folders and scikit-learn's digits.

Each data set has a 'train' and a 'test' split: tfds's own splits; for digits, the first
DIGITS_TRAIN = 1500 of scikit-learn's 1797 images train and the last 297 are held out for testing;
for image folders, config.data.data_dir and config.data.test_dir.

Images are float32 NHWC in [0, 1]. Which examples make up the batch of step s, and whether each
is flipped, is a pure function of (seed, s): the stream of examples is one permutation of the
data set per epoch, drawn from (seed, epoch). A resumed run therefore sees the same batches.
Each process reads and decodes only the rows of the global batch that its devices hold.
"""

import collections
import concurrent.futures
import functools
import os
import pathlib

import jax
import numpy as np
from PIL import Image

from ihdm_jax import parallel

TFDS_DATASETS = ('mnist', 'cifar10')
SPLITS = ('train', 'test')
DIGITS_TRAIN = 1500  # digits 0..1499 train, 1500..1796 test
FOLDER_DATASETS = ('afhq', 'ffhq', 'lsun_church')
IMAGE_EXTENSIONS = ('.bmp', '.jpg', '.jpeg', '.pgm', '.png', '.ppm', '.tif', '.tiff', '.webp')

# Streams of the seed, so that permutations, flips and prior picks never share random numbers.
_PERMUTATION, _FLIP, _PRIOR = 0, 1, 2


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """The central square of a uint8 HWC image, resized to size x size (bicubic, antialiased)."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = image[top:top + side, left:left + side]
    if side == size:
        return image
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    resized = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
    return resized.reshape(size, size, image.shape[-1])


def digits_images(size: int) -> np.ndarray:
    """scikit-learn's 1797 8x8 digits (levels 0..16) as uint8 (1797, size, size, 1)."""
    from sklearn.datasets import load_digits
    digits = load_digits().images  # float64 in [0, 16]
    levels = np.round(digits * (255 / 16)).astype(np.uint8)[..., None]
    return np.stack([center_crop_resize(image, size) for image in levels])


class ArraySource:
    """Images held in memory as uint8 (N, H, W, C)."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self):
        return len(self.images)

    def load(self, indices: np.ndarray) -> np.ndarray:
        return self.images[indices]


class TfdsSource:
    """A tfds data set read through tfds.data_source (array_record; no TensorFlow needed)."""

    def __init__(self, name: str, data_dir: str, size: int, split: str = 'train'):
        import tensorflow_datasets as tfds
        self.examples = tfds.data_source(name, split=split, data_dir=data_dir or None)
        self.size = size

    def __len__(self):
        return len(self.examples)

    def load(self, indices: np.ndarray) -> np.ndarray:
        return np.stack([center_crop_resize(self.examples[int(i)]['image'], self.size)
                         for i in indices])


def image_files(folder: str) -> list:
    """The image files under `folder`, searched recursively, in sorted order."""
    return sorted(p for p in pathlib.Path(folder).rglob('*')
                  if p.suffix.lower() in IMAGE_EXTENSIONS)


class FolderSource:
    """Image files under a folder (searched recursively, in sorted order), decoded on demand."""

    def __init__(self, folder: str, size: int, channels: int, key: str = 'data_dir'):
        self.paths = image_files(folder)
        if not self.paths:
            raise ValueError(f'config.data.{key}={folder!r} holds no images '
                             f'({", ".join(IMAGE_EXTENSIONS)}).')
        self.size = size
        self.mode = 'L' if channels == 1 else 'RGB'
        self.pool = concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1))

    def __len__(self):
        return len(self.paths)

    def _read(self, index) -> np.ndarray:
        with Image.open(self.paths[index]) as image:
            pixels = np.asarray(image.convert(self.mode))
        return center_crop_resize(pixels.reshape(pixels.shape[:2] + (-1,)), self.size)

    def load(self, indices: np.ndarray) -> np.ndarray:
        return np.stack(list(self.pool.map(self._read, indices)))


def make_source(config, split: str = 'train'):
    """The source of config.data's images of `split` ('train' or 'test')."""
    data = config.data
    if split not in SPLITS:
        raise ValueError(f'Unknown split {split!r}; expected one of {SPLITS}.')
    if data.dataset == 'digits':
        images = digits_images(data.image_size)
        source = ArraySource(images[:DIGITS_TRAIN] if split == 'train' else images[DIGITS_TRAIN:])
    elif data.dataset in TFDS_DATASETS:
        source = TfdsSource(data.dataset, data.data_dir, data.image_size, split)
    elif data.dataset in FOLDER_DATASETS:
        key = 'data_dir' if split == 'train' else 'test_dir'
        if not data[key]:
            raise ValueError(f'config.data.dataset={data.dataset!r} reads image files: set '
                             f'config.data.{key} to the folder of its {split} images.')
        source = FolderSource(data[key], data.image_size, data.num_channels, key)
    else:
        raise ValueError(f'Unknown config.data.dataset={data.dataset!r}; expected one of '
                         f'{("digits",) + TFDS_DATASETS + FOLDER_DATASETS}.')
    channels = source.load(np.zeros(1, np.int64)).shape[-1]
    if channels != data.num_channels:
        raise ValueError(f'{data.dataset} images have {channels} channels but '
                         f'config.data.num_channels={data.num_channels}.')
    return source


class Loader:
    """Global batches of one source for each training step, sharded over the batch axis."""

    def __init__(self, source, image_shape, batch_size: int, sharding, seed: int,
                 random_flip: bool):
        parallel.check_divisible(batch_size, sharding.mesh, 'batch_size')
        self.source = source
        self.image_shape = tuple(image_shape)
        self.batch_size = batch_size
        self.sharding = sharding
        self.seed = seed
        self.random_flip = random_flip
        self._permutation = functools.lru_cache(maxsize=2)(self._draw_permutation)

    def _draw_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, _PERMUTATION, epoch]).permutation(
            len(self.source))

    def batch_indices(self, step: int) -> np.ndarray:
        """Data-set indices of the global batch of `step`."""
        n = len(self.source)
        positions = step * self.batch_size + np.arange(self.batch_size)
        return np.array([self._permutation(p // n)[p % n] for p in positions])

    def _rows(self, size: int) -> slice:
        return parallel.local_rows(self.sharding, (size,) + self.image_shape)

    def _to_global(self, local: np.ndarray, size: int) -> jax.Array:
        return parallel.to_global(local, self.sharding, (size,) + self.image_shape)

    def local_batch(self, step: int) -> np.ndarray:
        """This process's rows of the batch of `step`, float32 in [0, 1]."""
        rows = self._rows(self.batch_size)
        images = self.source.load(self.batch_indices(step)[rows]).astype(np.float32) / 255.0
        if self.random_flip:
            flips = np.random.default_rng([self.seed, _FLIP, step]).random(self.batch_size) < 0.5
            images = np.where(flips[rows, None, None, None], images[:, :, ::-1], images)
        return images

    def batch(self, step: int) -> jax.Array:
        """The global batch of `step`."""
        return self._to_global(self.local_batch(step), self.batch_size)

    def batches(self, start_step: int, prefetch: int = 2):
        """Global batches of start_step, start_step + 1, ..., read ahead in a background thread."""
        with concurrent.futures.ThreadPoolExecutor(1) as reader:
            pending = collections.deque(reader.submit(self.local_batch, s)
                                        for s in range(start_step, start_step + prefetch))
            step = start_step
            while True:
                pending.append(reader.submit(self.local_batch, step + prefetch))
                yield self._to_global(pending.popleft().result(), self.batch_size)
                step += 1

    def prior_images(self, n: int, draw: int) -> jax.Array:
        """n training images picked uniformly at random (draw number `draw`) for the KDE prior."""
        parallel.check_divisible(n, self.sharding.mesh, 'sampling batch_size')
        picks = np.random.default_rng([self.seed, _PRIOR, draw]).integers(
            0, len(self.source), n)
        local = self.source.load(picks[self._rows(n)]).astype(np.float32) / 255.0
        return self._to_global(local, n)


def make_loader(config, sharding, batch_size: int = 0) -> Loader:
    """The loader of config's data over `sharding`; batch_size 0 means the training batch size."""
    data = config.data
    return Loader(make_source(config), (data.image_size, data.image_size, data.num_channels),
                  batch_size or config.training.batch_size, sharding, config.seed,
                  data.random_flip)
