"""Files of the workdir and of image folders, on a local disk or on cloud storage.

Every file that orbax does not write (config.json, the lock, samples, results, FID statistics,
TensorBoard events) and every image of a folder data set goes through etils.epath, the path
library orbax itself uses, so `--workdir=gs://bucket/run` and `--config.data.data_dir=gs://...`
work without gcsfuse. gs:// paths need the package gcsfs, s3:// paths s3fs.

Files are written whole: cloud storage has no appends, so each writer builds its bytes first.
"""

import io
import os

import numpy as np
from etils import epath

from ihdm_jax import errors

REMOTE_PREFIXES = ('gs://', 's3://', 'az://')
_PACKAGES = {'gs://': 'gcsfs', 's3://': 's3fs', 'az://': 'adlfs'}
EVENT_PART_BYTES = 2**20  # a remote TensorBoard event file's size past which a new part begins


def is_remote(location) -> bool:
    return os.fspath(location).startswith(REMOTE_PREFIXES)


def join(location, *parts) -> str:
    return os.fspath(epath.Path(location).joinpath(*parts))


def parent(location) -> str:
    return os.fspath(epath.Path(location).parent)


def rename(location, target):
    """Moves `location` to `target`, replacing a file there."""
    epath.Path(location).replace(target)


def move_tree(location, target):
    """Moves the folder `location` to `target`, which must not exist. Cloud storage has no folders
    to rename: there each file is copied to its place under `target`, and `location` is deleted
    once every file is copied."""
    source = epath.Path(location)
    if not is_remote(location):
        makedirs(parent(target))
        source.rename(target)
        return
    for file in map(epath.Path, walk_files(location)):
        file.copy(epath.Path(target) / file.relative_to(source))
    source.rmtree()


def remove(location):
    """Deletes the file `location` if it exists."""
    epath.Path(location).unlink(missing_ok=True)


def makedirs(location):
    epath.Path(location).mkdir(parents=True, exist_ok=True)


def write_bytes(location, data: bytes):
    epath.Path(location).write_bytes(data)


def write_text(location, text: str):
    epath.Path(location).write_text(text)


def write_with(location, save, **kwargs):
    """Writes the bytes that save(file_object, **kwargs) produces, e.g. np.savez, a PIL image's
    save or a matplotlib figure's savefig."""
    buffer = io.BytesIO()
    save(buffer, **kwargs)
    write_bytes(location, buffer.getvalue())


def save_npz(location, **arrays):
    """np.savez of `arrays` to `location`."""
    write_with(location, np.savez, **arrays)


def read_bytes(location) -> bytes:
    return epath.Path(location).read_bytes()


def read_text(location) -> str:
    return epath.Path(location).read_text()


def exists(location) -> bool:
    return epath.Path(location).exists()


def isdir(location) -> bool:
    return epath.Path(location).is_dir()


def isfile(location) -> bool:
    return epath.Path(location).exists() and not epath.Path(location).is_dir()


def listdir(location) -> list:
    """The names in the folder `location`; [] if it does not exist."""
    folder = epath.Path(location)
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def relative_parts(location, folder) -> tuple:
    """The names of the path from `folder` down to `location`, which lies under it."""
    return epath.Path(location).relative_to(epath.Path(folder)).parts


def walk_files(location) -> list:
    """Every file under the folder `location`, searched recursively, sorted by folder and name."""
    files = sorted(root / name for root, _, names in epath.Path(location).walk() for name in names)
    return [os.fspath(f) for f in files]


def check_reachable(location, what: str):
    """A remote `location` can be looked at (its file system's package is installed and the
    bucket answers); errors.UserError naming the cause otherwise. Local paths pass."""
    location = os.fspath(location)
    if not is_remote(location):
        return
    prefix = next(p for p in REMOTE_PREFIXES if location.startswith(p))
    try:
        epath.Path(location).exists()
    except ImportError:
        raise errors.UserError(
            f'{what}={location} is on {prefix} storage, which needs the package '
            f'{_PACKAGES[prefix]}: pip install {_PACKAGES[prefix]}'
        ) from None
    except Exception as error:  # credentials, permissions, a missing bucket
        cause = str(error).strip().splitlines()
        raise errors.UserError(
            f'{what}={location} cannot be reached ({type(error).__name__}: '
            f'{cause[0] if cause else ""}).'
        ) from None


class _RecordFile:
    """An event file of tensorboardX on cloud storage, which has no appends: the records of the
    current part are kept and written whole at each flush, and once they pass EVENT_PART_BYTES
    the next records go to a new part, <location>.000001 and so on. TensorBoard reads every
    event file of a folder in name order, and a part is final before the next one is written, so
    a flush writes again less than EVENT_PART_BYTES of earlier records."""

    def __init__(self, location):
        self.location = location
        self.part = 0
        self.buffer = io.BytesIO()
        self.unwritten = False  # records since the last flush

    def write(self, data):
        self.buffer.write(data)
        self.unwritten = True

    def flush(self):
        if not self.unwritten:
            return
        name = f'{self.location}.{self.part:06d}' if self.part else self.location
        write_bytes(name, self.buffer.getvalue())
        self.unwritten = False
        if self.buffer.tell() >= EVENT_PART_BYTES:
            self.part += 1
            self.buffer = io.BytesIO()

    def close(self):
        self.flush()


class _RecordFiles:
    def open(self, location):
        return _RecordFile(location)

    def directory_check(self, location):
        makedirs(location)


def summary_writer(logdir: str, purge_step=None):
    """A tensorboardX SummaryWriter of `logdir`, local or remote: event files under a remote
    logdir are written through epath in parts (_RecordFile; tensorboardX's own gs:// writer needs
    google-cloud-storage and writes the whole file at each flush; its writer-factory registry is
    the extension point for schemes)."""
    # Imported here, not with this module: tensorboardX imports torch when it is installed
    # (2 s), which only the training job's writer should pay.
    from tensorboardX import SummaryWriter
    from tensorboardX import record_writer

    for prefix in REMOTE_PREFIXES:
        record_writer.register_writer_factory(prefix.split(':')[0], _RecordFiles())
    return SummaryWriter(logdir, purge_step=purge_step)
