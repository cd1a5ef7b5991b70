"""Training images as global batches: tfds datasets, image folders and scikit-learn's digits.

Each data set has a 'train' and a 'test' split: tfds's own splits; for digits, the first
DIGITS_TRAIN = 1500 of scikit-learn's 1797 images train and the last 297 are held out for testing;
for image folders, config.data.data_dir and config.data.test_dir.

Images are float32 NHWC in [0, 1]. For a conditional model (config.model.num_classes > 0) every
source also has `labels`, the class of each image (int32): the digits' targets, tfds's `label`,
and for image folders the index of an image's first-level subfolder in the sorted class names
(`class_names`). Which examples make up the batch of step s, and whether each
is flipped, is a pure function of (seed, s): the stream of examples is one permutation of the
data set per epoch, drawn from (seed, epoch). A resumed run therefore sees the same batches.
Each process reads and decodes only the rows of the global batch that its devices hold.

An image file that cannot be decoded is skipped with a warning naming it: the next readable
file in sorted order takes its place, so a batch stays a pure function of (seed, step) on every
process and every relaunch.
"""

import collections
import concurrent.futures
import functools
import gzip
import importlib.util
import io
import os
import tempfile
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from PIL import Image

from ihdm_jax import errors
from ihdm_jax import parallel
from ihdm_jax import rng
from ihdm_jax import storage

TFDS_IMAGE_SIZES = {'mnist': 28, 'cifar10': 32}
FOLDER_DATASETS = ('folder', 'afhq', 'ffhq', 'lsun_church')  # 'folder': any image folder
DATASETS = ('digits',) + tuple(TFDS_IMAGE_SIZES) + FOLDER_DATASETS
CHANNELS = {'digits': 1, 'mnist': 1, 'cifar10': 3}  # image folders are converted as configured
SPLITS = ('train', 'test')
DIGITS_TRAIN = 1500  # digits 0..1499 train, 1500..1796 test
NUM_CLASSES = {'digits': 10, 'mnist': 10, 'cifar10': 10}  # image folders: their subfolders
IMAGE_EXTENSIONS = ('.bmp', '.jpg', '.jpeg', '.pgm', '.png', '.ppm', '.tif', '.tiff', '.webp')
# tfds's MNIST and CIFAR-10 builders need TensorFlow to prepare (not to read) their data.
PREPARE_PACKAGE = 'tensorflow'
PREPARE_COMMAND = "python -m pip install -e '.[prepare]'"


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """The central square of a uint8 HWC image, resized to size x size (bicubic, antialiased)."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = image[top : top + side, left : left + side]
    if side == size:
        return image
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    resized = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
    return resized.reshape(size, size, image.shape[-1])


def halve_and_crop(image: np.ndarray, size: int) -> np.ndarray:
    """A uint8 HWC image as the original code prepares folder images (its ImageDataset, used for
    FFHQ and AFHQ): halved with a 2x2 box filter while the short side is at least 2·size, then
    resized (PIL bicubic) so that the short side is `size`, the long side in proportion; then the
    central size x size square is cut out. The original resizes before it crops (a non-square
    image keeps its aspect ratio until the crop), with the offsets ⌊(H − size)/2⌋ and
    ⌊(W − size)/2⌋; square images (FFHQ, AFHQ) are not cropped at all."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize((pil.width // 2, pil.height // 2), Image.Resampling.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(
        (round(pil.width * scale), round(pil.height * scale)), Image.Resampling.BICUBIC
    )
    resized = np.asarray(pil).reshape(pil.height, pil.width, image.shape[-1])
    top, left = (pil.height - size) // 2, (pil.width - size) // 2
    return resized[top : top + size, left : left + size]


@functools.cache
def _digits_table() -> np.ndarray:
    """The file that sklearn.datasets.load_digits reads, read without importing scikit-learn
    (its import takes longer than the rest of a short job's start-up): 64 pixels and the label
    of each digit."""
    package = importlib.util.find_spec('sklearn').submodule_search_locations[0]
    with gzip.open(os.path.join(package, 'datasets', 'data', 'digits.csv.gz')) as f:
        return np.loadtxt(f, delimiter=',')


def digits_images(size: int) -> np.ndarray:
    """scikit-learn's 1797 8x8 digits (levels 0..16) as uint8 (1797, size, size, 1)."""
    digits = _digits_table()[:, :-1].reshape(-1, 8, 8)
    levels = np.round(digits * (255 / 16)).astype(np.uint8)[..., None]
    return np.stack([center_crop_resize(image, size) for image in levels])


def digits_labels() -> np.ndarray:
    """The digit (0..9) of each of scikit-learn's 1797 digits, int32."""
    return _digits_table()[:, -1].astype(np.int32)


class ArraySource:
    """Images held in memory as uint8 (N, H, W, C), with their labels where given."""

    def __init__(self, images: np.ndarray, labels=None):
        self.images = images
        self.labels = labels

    def __len__(self):
        return len(self.images)

    def load(self, indices: np.ndarray) -> np.ndarray:
        return self.images[indices]


def tfds_builder(name: str, data_dir: str):
    """tfds's builder of `name` in `data_dir` ('' = tfds's default), writing array_record."""
    import tensorflow_datasets as tfds

    return tfds.builder(name, data_dir=data_dir or None, file_format='array_record')


def prepare(config):
    """Downloads and prepares config's tfds data set once if it is not prepared: process 0
    prepares, the other processes wait for it; every process calls this. data.check(config) has
    made sure that it can run. Other data sets need nothing."""
    name, data_dir = config.data.dataset, config.data.data_dir
    if name not in TFDS_IMAGE_SIZES:
        return
    builder = tfds_builder(name, data_dir)
    missing = not builder.is_prepared()
    if jax.process_count() > 1:
        missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
    if not missing:
        return
    if parallel.is_main_process():
        logging.info(
            'Preparing the tfds data set %s in %s (once; it is downloaded first).',
            name,
            builder.data_dir,
        )
        if importlib.util.find_spec('tensorflow'):
            import tensorflow as tf

            tf.config.set_visible_devices([], 'GPU')  # TensorFlow must not take the GPUs
        if storage.is_remote(data_dir):
            _prepare_and_upload(name, data_dir)
        else:
            builder.download_and_prepare(file_format='array_record')
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f'ihdm_jax prepared {name}')
        _require(
            tfds_builder(name, data_dir).is_prepared(),
            f'Process 0 prepared the tfds data set {name!r} in {builder.data_dir}, which '
            'this host does not see: set --config.data.data_dir to storage that every '
            'host sees (a shared file system or gs://).',
        )


def _prepare_and_upload(name: str, data_dir: str):
    """Prepares the tfds data set `name` in a temporary local folder and copies it (not its
    downloads) to the remote `data_dir`: tfds writes array_record files to local disks only
    (array_record reads them from gs:// since 0.8.3). dataset_info.json, which marks the data
    set prepared, is copied last."""
    with tempfile.TemporaryDirectory() as local:
        prepared = tfds_builder(name, local)
        prepared.download_and_prepare(file_format='array_record')
        files = storage.walk_files(prepared.data_dir)
        for path in sorted(files, key=lambda p: os.path.basename(p) == 'dataset_info.json'):
            target = storage.join(data_dir, os.path.relpath(path, local))
            storage.write_bytes(target, storage.read_bytes(path))


class TfdsSource:
    """A tfds data set read as a tfds data source (array_record; no TensorFlow needed)."""

    def __init__(self, name: str, data_dir: str, size: int, split: str = 'train'):
        self.examples = tfds_builder(name, data_dir).as_data_source(split=split)
        self.size = size

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """The `label` of every example (read once, at the first use)."""
        return np.array([self.examples[i]['label'] for i in range(len(self))], np.int32)

    def __len__(self):
        return len(self.examples)

    def load(self, indices: np.ndarray) -> np.ndarray:
        return np.stack(
            [center_crop_resize(self.examples[int(i)]['image'], self.size) for i in indices]
        )


def image_files(folder: str) -> list:
    """The image files under `folder` (a local path or gs://...), searched recursively, sorted
    by folder and name."""
    return [
        f for f in storage.walk_files(folder) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
    ]


def first_folder(path, folder: str) -> str:
    """The first-level subfolder of `folder` that holds the file `path` ('' for a file at the
    top level)."""
    parts = storage.relative_parts(path, folder)
    return parts[0] if len(parts) > 1 else ''


def subfolder_classes(folder: str) -> list:
    """The sorted names of the first-level subfolders of `folder` that hold image files (''
    stands for files at the top level)."""
    return sorted({first_folder(path, folder) for path in image_files(folder)})


def class_names(config) -> tuple:
    """An image folder's class names for a conditional model: config.data.classes, or the
    sorted subfolders of config.data.data_dir where it is empty."""
    return tuple(config.data.classes) or tuple(subfolder_classes(config.data.data_dir))


def resolve_classes(config):
    """Sets config.data.classes of a conditional model of an image folder to its class_names,
    so that the run's config.json keeps them (and a workdir refuses other ones)."""
    if config.model.num_classes and config.data.dataset in FOLDER_DATASETS:
        config.data.classes = class_names(config)


def open_image(path) -> Image.Image:
    """The image file at `path` (local or gs://...), read whole and opened with PIL."""
    return Image.open(io.BytesIO(storage.read_bytes(path)))


class FolderSource:
    """Image files under a folder (searched recursively, in sorted order), decoded on demand and
    brought to size x size by halve_and_crop, as the original code prepares FFHQ and AFHQ (so
    that FIDs compare with the paper's). The original reads LSUN through torchvision (bilinear
    resize, then the central crop) in a loader that does not run as released; its folder here
    is prepared as the others.

    Unreadable files are skipped (see the module docstring); `skipped` lists them. Prepared
    images are kept in memory up to `cache_mb` MiB (config.data.cache_mb), so that after the
    first epoch a folder that fits is not decoded again; the batches stay the same. With
    `classes` (names), `labels` holds the index of each file's first-level subfolder in them.
    """

    def __init__(self, folder: str, size: int, channels: int, cache_mb: float = 0, classes=()):
        self.folder = folder
        self.paths = image_files(folder)
        if classes:
            index = {name: i for i, name in enumerate(classes)}
            self.labels = np.array(
                [index[first_folder(path, folder)] for path in self.paths], np.int32
            )
        self.cache, self._cache_left = {}, int(cache_mb * 2**20)
        self.size = size
        self.mode = 'L' if channels == 1 else 'RGB'
        self.pool = concurrent.futures.ThreadPoolExecutor(min(16, parallel.host_cpus()))
        self.skipped = set()
        self._converted = False
        self._lock = threading.Lock()

    def __len__(self):
        return len(self.paths)

    def _decode(self, index) -> np.ndarray:
        with open_image(self.paths[index]) as image:
            if image.mode not in (self.mode, 'P') and self._first_conversion():
                logging.info(
                    'Converting images of mode %s (e.g. %s) to %s, as '
                    'config.data.num_channels asks.',
                    image.mode,
                    self.paths[index],
                    self.mode,
                )
            pixels = np.asarray(image.convert(self.mode))
        return halve_and_crop(pixels.reshape(pixels.shape[:2] + (-1,)), self.size)

    def _first_conversion(self) -> bool:
        with self._lock:  # the pool's threads decode concurrently; one of them logs
            first, self._converted = not self._converted, True
        return first

    def _read(self, index) -> np.ndarray:
        image = self.cache.get(index)
        return self._read_file(index) if image is None else image

    def _read_file(self, index) -> np.ndarray:
        for offset in range(len(self.paths)):
            candidate = (index + offset) % len(self.paths)
            try:
                return self._decode(candidate)
            except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for bad files
                with self._lock:
                    new = candidate not in self.skipped
                    self.skipped.add(candidate)
                if new:
                    logging.warning(
                        'Skipping %s: it cannot be read as an image (%s).',
                        self.paths[candidate],
                        error,
                    )
        raise errors.UserError(
            f'None of the {len(self.paths)} image files under {self.folder} can be read as an '
            'image.'
        )

    def load(self, indices: np.ndarray) -> np.ndarray:
        images = list(self.pool.map(self._read, indices))
        with self._lock:  # the loader's reader thread and the sampler may load at once
            for index, image in zip(indices, images):  # in request order, whatever the pool did
                if index not in self.cache and image.nbytes <= self._cache_left:
                    self.cache[index], self._cache_left = image, self._cache_left - image.nbytes
        return np.stack(images)


def make_source(config, split: str = 'train'):
    """The source of config.data's images of `split` ('train' or 'test'); data.check(config,
    split) has checked that it exists."""
    if split not in SPLITS:
        raise ValueError(f'Unknown split {split!r}; expected one of {SPLITS}.')
    data = config.data
    if data.dataset == 'digits':
        part = slice(DIGITS_TRAIN) if split == 'train' else slice(DIGITS_TRAIN, None)
        labels = digits_labels()[part] if config.model.num_classes else None
        return ArraySource(digits_images(data.image_size)[part], labels)
    if data.dataset in TFDS_IMAGE_SIZES:
        return TfdsSource(data.dataset, data.data_dir, data.image_size, split)
    return FolderSource(
        data[folder_key(split)],
        data.image_size,
        data.num_channels,
        data.cache_mb,
        class_names(config) if config.model.num_classes else (),
    )


def folder_key(split):
    return 'data_dir' if split == 'train' else 'test_dir'


def _require(ok, message):
    if not ok:
        raise errors.UserError(message)


def check(config, split: str = 'train'):
    """The images of config.data's `split` exist, are readable and match the configured size
    and channels; one errors.UserError otherwise. Nothing is written."""
    d = config.data
    _require(
        d.dataset in DATASETS,
        f'config.data.dataset={d.dataset!r} is not known; expected one of {DATASETS}.',
    )
    if d.dataset in CHANNELS:
        _require(
            d.num_channels == CHANNELS[d.dataset],
            f'config.data.num_channels={d.num_channels} does not match {d.dataset}, whose '
            f'images have {CHANNELS[d.dataset]} channel(s).',
        )
    if d.dataset in FOLDER_DATASETS:
        key = folder_key(split)
        folder = d[key]
        _require(
            folder,
            f'config.data.dataset={d.dataset!r} reads image files: set '
            f'--config.data.{key} to the folder of its {split} images.',
        )
        storage.check_reachable(folder, f'config.data.{key}')
        _require(
            storage.isdir(folder),
            f'config.data.{key}={folder!r} does not exist. '
            + ('Point' if d.dataset == 'folder' else f'Download {d.dataset} and point')
            + f' --config.data.{key} at its folder of {split} images (README.md, '
            '"CIFAR-10 and the other paper settings").',
        )
        _require(
            image_files(folder),
            f'config.data.{key}={folder!r} holds no image files '
            f'({", ".join(IMAGE_EXTENSIONS)}), searched recursively.',
        )
        if config.model.num_classes:
            _check_folder_classes(config, split)
    elif d.dataset in TFDS_IMAGE_SIZES:
        native = TFDS_IMAGE_SIZES[d.dataset]
        _require(
            d.image_size == native,
            f'config.data.image_size={d.image_size} does not match {d.dataset}, whose '
            f'images are {native}x{native}; set --config.data.image_size={native}.',
        )
        storage.check_reachable(d.data_dir, 'config.data.data_dir')
        builder = tfds_builder(d.dataset, d.data_dir)
        _require(
            builder.is_prepared() or importlib.util.find_spec(PREPARE_PACKAGE),
            f'The tfds data set {d.dataset!r} is not prepared in {builder.data_dir}, and '
            f'preparing it needs {PREPARE_PACKAGE}. Install it in this repository with '
            f'`{PREPARE_COMMAND}`; the first run then downloads and prepares the data set '
            'itself. (Or prepare it on another machine and set --config.data.data_dir to '
            'its tfds data directory.)',
        )
    if d.dataset in NUM_CLASSES and config.model.num_classes:
        _require(
            config.model.num_classes == NUM_CLASSES[d.dataset],
            f'config.model.num_classes={config.model.num_classes} does not match {d.dataset}, '
            f'whose images have {NUM_CLASSES[d.dataset]} classes.',
        )


def _check_folder_classes(config, split: str):
    """The first-level subfolders of the split's folder are the classes of a conditional model:
    config.data.classes where set (all of them for the training split), and
    config.model.num_classes of them."""
    key = folder_key(split)
    folder, num_classes = config.data[key], config.model.num_classes
    found = subfolder_classes(folder)
    _require(
        '' not in found,
        f'config.model.num_classes={num_classes}: a conditional model reads the classes of an '
        f'image folder from its subfolders, but config.data.{key}={folder!r} holds image files '
        'outside any subfolder; put the images of each class in a subfolder named after it.',
    )
    names = tuple(config.data.classes) or tuple(found)
    _require(
        len(names) == num_classes,
        f'config.model.num_classes={num_classes} does not match config.data.{key}={folder!r}, '
        f'whose images lie in {len(names)} class subfolders ({", ".join(names)}).',
    )
    unknown = sorted(set(found) - set(names)) or (
        sorted(set(names) - set(found)) if split == 'train' else []
    )
    _require(
        not unknown,
        f'The class subfolders of config.data.{key}={folder!r} ({", ".join(found)}) are not '
        f'the classes config.data.classes={names!r} (differing: {", ".join(unknown)}).',
    )


def report_skipped(*sources):
    """Logs how many unreadable image files the sources skipped, if any."""
    skipped = sum(len(getattr(source, 'skipped', ())) for source in sources)
    if skipped:
        logging.warning(
            '%d unreadable image file(s) were skipped (named in the warnings above).', skipped
        )


class Loader:
    """Global batches of one source for each training step, sharded over the batch axis: the
    images, or with `labels` the pair (images, their labels)."""

    def __init__(
        self,
        source,
        image_shape,
        batch_size: int,
        sharding,
        seed: int,
        random_flip: bool,
        labels: bool = False,
    ):
        self.source = source
        self.labels = labels
        self.image_shape = tuple(image_shape)
        self.batch_size = batch_size
        self.sharding = sharding
        self.seed = seed
        self.random_flip = random_flip
        self._permutation = functools.lru_cache(maxsize=2)(self._draw_permutation)

    def _draw_permutation(self, epoch: int) -> np.ndarray:
        return rng.numpy_rng(self.seed, rng.PERMUTATION, epoch).permutation(len(self.source))

    def batch_indices(self, step: int) -> np.ndarray:
        """Data-set indices of the global batch of `step`."""
        n = len(self.source)
        positions = step * self.batch_size + np.arange(self.batch_size)
        return np.array([self._permutation(p // n)[p % n] for p in positions])

    def _rows(self, size: int) -> slice:
        return parallel.local_rows(self.sharding, (size,) + self.image_shape)

    def _to_global(self, local, size: int):
        if self.labels:
            images, labels = local
            return (
                parallel.to_global(images, self.sharding, (size,) + self.image_shape),
                parallel.to_global(labels, self.sharding, (size,)),
            )
        return parallel.to_global(local, self.sharding, (size,) + self.image_shape)

    def local_batch(self, step: int):
        """This process's rows of the batch of `step`, float32 in [0, 1] (with labels: and
        their int32 labels)."""
        rows = self._rows(self.batch_size)
        indices = self.batch_indices(step)[rows]
        images = self.source.load(indices).astype(np.float32) / 255.0
        if self.random_flip:
            flips = rng.numpy_rng(self.seed, rng.FLIP, step).random(self.batch_size) < 0.5
            images = np.where(flips[rows, None, None, None], images[:, :, ::-1], images)
        return (images, self.source.labels[indices]) if self.labels else images

    def batch(self, step: int) -> jax.Array:
        """The global batch of `step`."""
        return self._to_global(self.local_batch(step), self.batch_size)

    def batches(self, start_step: int, prefetch: int = 2):
        """Global batches of start_step, start_step + 1, ..., read ahead in a background thread."""
        with concurrent.futures.ThreadPoolExecutor(1) as reader:
            pending = collections.deque(
                reader.submit(self.local_batch, s) for s in range(start_step, start_step + prefetch)
            )
            step = start_step
            while True:
                pending.append(reader.submit(self.local_batch, step + prefetch))
                yield self._to_global(pending.popleft().result(), self.batch_size)
                step += 1


def make_loader(config, source, sharding) -> Loader:
    """The training batches of `source` over `sharding`."""
    data = config.data
    return Loader(
        source,
        (data.image_size, data.image_size, data.num_channels),
        config.training.batch_size,
        sharding,
        config.seed,
        data.random_flip,
        labels=config.model.num_classes > 0,
    )
