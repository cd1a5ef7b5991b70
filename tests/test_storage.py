"""Workdirs and image folders on cloud storage without gcsfuse: every file that orbax does not
write goes through ihdm_jax.storage (etils.epath). gs:// is served from memory (conftest's
fake_gcs); local paths take the same functions in the rest of the suite."""

import io
import json
import os
import struct
import time

import numpy as np
import pytest
from conftest import ROOT
from conftest import TRAINED_STEP
from orbax.checkpoint.path import atomicity
from PIL import Image
from tensorboardX.proto import event_pb2

from ihdm_jax import checkpoint
from ihdm_jax import data
from ihdm_jax import errors
from ihdm_jax import images
from ihdm_jax import lock
from ihdm_jax import main
from ihdm_jax import storage
from ihdm_jax import workdir as workdir_lib
from ihdm_jax.evaluation import frechet

RUN = 'gs://bucket/run'


def test_local_and_gs_paths_take_the_same_functions(tmp_path, fake_gcs):
    for root in (str(tmp_path / 'run'), RUN):
        storage.makedirs(storage.join(root, 'a', 'b'))
        storage.write_text(storage.join(root, 'a', 'b', 'x.json'), '{"k": 1}')
        storage.save_npz(storage.join(root, 'a', 'y.npz'), images=np.arange(3))
        assert storage.listdir(storage.join(root, 'a')) == ['b', 'y.npz']
        assert storage.listdir(storage.join(root, 'missing')) == []
        assert storage.walk_files(root) == [
            storage.join(root, 'a', 'b', 'x.json'),
            storage.join(root, 'a', 'y.npz'),
        ]
        assert json.loads(storage.read_text(storage.join(root, 'a', 'b', 'x.json'))) == {'k': 1}
        with np.load(io.BytesIO(storage.read_bytes(storage.join(root, 'a', 'y.npz')))) as npz:
            np.testing.assert_array_equal(npz['images'], np.arange(3))
        assert storage.isfile(storage.join(root, 'a', 'y.npz'))
        assert storage.isdir(storage.join(root, 'a')) and not storage.isfile(
            storage.join(root, 'a')
        )
    assert set(fake_gcs) == {f'{RUN}/a/b/x.json', f'{RUN}/a/y.npz'}
    assert not os.path.exists(os.path.join(ROOT, 'gs:'))


def test_an_analysis_job_writes_its_results_on_gs(config, fake_gcs):
    main.run(config, 'frequency_partition', RUN)
    main.run(config, 'psd', RUN)
    out = f'{RUN}/analysis'
    assert {
        f'{out}/frequency_partition/frequency_partition.png',
        f'{out}/frequency_partition/frequency_partition.npz',
        f'{out}/psd/psd.json',
        f'{out}/psd/psd.png',
        f'{out}/psd/energy_vs_blur.png',
    } <= set(fake_gcs)
    png = Image.open(io.BytesIO(storage.read_bytes(f'{out}/psd/psd.png')))
    assert png.format == 'PNG' and min(png.size) > 100
    assert (
        json.loads(storage.read_text(f'{out}/psd/psd.json'))['num_images']
        == config.analysis.num_images
    )
    assert not os.path.exists(os.path.join(ROOT, 'gs:'))


def test_config_json_and_the_lock_on_gs(config, fake_gcs, monkeypatch):
    workdir_lib.check(config, RUN, 'train')
    workdir_lib.save_config(config, RUN)
    assert json.loads(fake_gcs[f'{RUN}/config.json'].getvalue())['model']['K'] == config.model.K
    assert workdir_lib.read_config(RUN).to_dict() == config.to_dict()
    other = config.copy_and_resolve_references()
    other.model.K = config.model.K + 1
    with pytest.raises(
        errors.UserError,
        match=rf'config.model.K: {config.model.K} in '
        rf'{RUN}/config.json, {config.model.K + 1} now',
    ):
        workdir_lib.check(other, RUN, 'train')
    with pytest.raises(errors.UserError, match=f'--workdir={RUN} holds no checkpoint'):
        workdir_lib.check(config, RUN, 'trained')

    monkeypatch.setattr(lock, 'SETTLE_S', 0.0)
    with lock.WorkdirLock(RUN):
        assert f'{RUN}/{lock.LOCK_FILE}' in fake_gcs
        with pytest.raises(errors.UserError, match=f'pid {os.getpid()} on host'):
            with lock.WorkdirLock(RUN):
                pass
    assert f'{RUN}/{lock.LOCK_FILE}' not in fake_gcs


def _events(content: bytes):
    """The events of a TensorBoard event file (records: length, crc, data, crc)."""
    events, offset = [], 0
    while offset < len(content):
        (length,) = struct.unpack('Q', content[offset : offset + 8])
        events.append(event_pb2.Event.FromString(content[offset + 12 : offset + 12 + length]))
        offset += 12 + length + 4
    return events


def test_samples_tensorboard_and_fid_statistics_on_gs(fake_gcs):
    pictures = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), np.uint8)
    images.save_grid(f'{RUN}/samples/step_00000010.png', pictures)
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(storage.read_bytes(f'{RUN}/samples/step_00000010.png')))),
        images.grid(pictures),
    )

    writer = storage.summary_writer(f'{RUN}/tensorboard')
    writer.add_scalar('train/loss', 0.25, 10)
    writer.add_image('samples', images.grid(pictures), 10, dataformats='HWC')
    writer.close()
    (name,) = [k for k in fake_gcs if k.startswith(f'{RUN}/tensorboard/events.out.tfevents.')]
    events = _events(fake_gcs[name].getvalue())
    scalars = [
        (v.tag, v.simple_value, e.step)
        for e in events
        for v in e.summary.value
        if v.HasField('simple_value')
    ]
    assert scalars == [('train/loss', 0.25, 10)]
    assert any(v.tag == 'samples' for e in events for v in e.summary.value)

    mu, sigma = np.arange(3.0), np.eye(3)
    frechet.save_statistics(f'{RUN}/eval/train_stats_digits_8.npz', mu, sigma)
    assert frechet.is_statistics(f'{RUN}/eval/train_stats_digits_8.npz')
    loaded = frechet.load_statistics(f'{RUN}/eval/train_stats_digits_8.npz')
    np.testing.assert_array_equal(loaded[0], mu)
    np.testing.assert_array_equal(loaded[1], sigma)


def _stored_events(store, logdir):
    """The events of the event files in `logdir` of the fake store, the files in name order."""
    files = sorted(k for k in store if k.startswith(f'{logdir}/events.out.tfevents.'))
    return files, _events(b''.join(store[name].getvalue() for name in files))


def _image_steps(events):
    return [e.step for e in events for v in e.summary.value if v.tag == 'samples']


def test_tensorboard_on_gs_writes_again_a_bounded_part_at_each_flush(fake_gcs, monkeypatch):
    """Event files on gs:// are written in parts: a flush writes again less than
    EVENT_PART_BYTES of earlier records, and the parts in name order hold every event."""
    monkeypatch.setattr(storage, 'EVENT_PART_BYTES', 100_000)
    rewritten = []  # the length of what each write replaces
    write_bytes = storage.write_bytes

    def counted(location, data):
        rewritten.append(len(fake_gcs[location].getvalue()) if location in fake_gcs else 0)
        write_bytes(location, data)

    monkeypatch.setattr(storage, 'write_bytes', counted)
    logdir = f'{RUN}/tensorboard'
    pictures = np.random.default_rng(0).integers(0, 256, (12, 100, 100, 3), np.uint8)
    writer = storage.summary_writer(logdir)
    for step, picture in enumerate(pictures):  # each a PNG of 30 kB
        writer.add_scalar('train/loss', step / 4, step)
        writer.add_image('samples', picture, step, dataformats='HWC')
        deadline = time.time() + 30
        # A flush writes the events that tensorboardX's thread has taken from its queue.
        while step not in _image_steps(_stored_events(fake_gcs, logdir)[1]):
            assert time.time() < deadline
            writer.flush()
    writer.close()

    files, events = _stored_events(fake_gcs, logdir)
    assert files == [files[0], f'{files[0]}.000001', f'{files[0]}.000002']
    assert 0 < max(rewritten) < 100_000
    values = [(v, e.step) for e in events for v in e.summary.value]
    assert [(v.tag, v.simple_value, step) for v, step in values if v.tag == 'train/loss'] == [
        ('train/loss', step / 4, step) for step in range(12)
    ]
    assert _image_steps(events) == list(range(12))
    image = next(v.image for v, step in values if v.tag == 'samples' and step == 5)
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), pictures[5]
    )


def _copy_checkpoint(trained, run, step, finished=True):
    """Copies the files of the `trained` checkpoint to step `step` of `run` and returns their
    names. With finished=False, orbax's commit marker is left out: an interrupted save as orbax
    leaves it on gs://, where it writes into the step's folder and adds the marker last.
    (orbax itself cannot write to the fake gs://: it writes arrays through tensorstore.)"""
    source = trained / 'checkpoints' / str(TRAINED_STEP)
    names = [str(p.relative_to(source)) for p in sorted(source.rglob('*')) if p.is_file()]
    assert atomicity.COMMIT_SUCCESS_FILE in names
    for name in names:
        if finished or name != atomicity.COMMIT_SUCCESS_FILE:
            location = f'{run}/checkpoints/{step}/{name}'
            storage.makedirs(storage.parent(location))
            storage.write_bytes(location, (source / name).read_bytes())
    return names


def _files(folder):
    """{name under `folder`: content} of every file under `folder`."""
    return {f.removeprefix(f'{folder}/'): storage.read_bytes(f) for f in storage.walk_files(folder)}


def test_an_interrupted_save_on_gs_is_no_checkpoint_and_the_lock_holder_removes_it(
    config, trained, fake_gcs, caplog
):
    unfinished = f'{RUN}/checkpoints/{TRAINED_STEP + 1}'
    _copy_checkpoint(trained, RUN, TRAINED_STEP + 1, finished=False)
    workdir_lib.save_config(config, RUN)
    assert checkpoint.steps_on_disk(RUN) == []
    with pytest.raises(errors.UserError, match=f'--workdir={RUN} holds no checkpoint'):
        workdir_lib.check(config, RUN, 'trained')

    names = _copy_checkpoint(trained, RUN, TRAINED_STEP)
    assert checkpoint.steps_on_disk(RUN) == [TRAINED_STEP]
    with checkpoint.make_manager(RUN) as manager:  # a job without the lock leaves the save
        assert manager.all_steps() == [TRAINED_STEP]
    assert storage.isdir(unfinished) and 'did not finish' not in caplog.text
    checkpoint.make_manager(RUN, remove_unfinished=True).close()
    deadline = time.time() + 30  # orbax removes it in a background thread
    while storage.exists(unfinished) and time.time() < deadline:
        time.sleep(0.05)
    assert f'Ignoring and removing {unfinished}: a checkpoint save that did not finish.' in (
        caplog.text
    )
    assert set(_files(f'{RUN}/checkpoints')) == {f'{TRAINED_STEP}/{name}' for name in names}


@pytest.mark.parametrize('where', ['local', 'gs'])
def test_an_unreadable_checkpoint_is_set_aside(trained, tmp_path, fake_gcs, caplog, where):
    """The newest checkpoint fails to restore: it moves to checkpoints_unreadable/, on a local
    disk (a rename) as on gs:// (which has no folders to rename), and the older one is used."""
    run = RUN if where == 'gs' else str(tmp_path / 'run')
    newer = TRAINED_STEP + 1
    _copy_checkpoint(trained, run, TRAINED_STEP)
    _copy_checkpoint(trained, run, newer)
    before = _files(f'{run}/checkpoints/{newer}')

    def restore(step):
        if step == newer:
            raise ValueError('a damaged file\nmore detail')
        return 'state'

    with checkpoint.make_manager(run) as manager:
        assert checkpoint._restore_newest(manager, restore) == ('state', TRAINED_STEP)
        assert manager.all_steps() == [TRAINED_STEP]
    assert f'Checkpoint {run}/checkpoints/{newer} cannot be read (ValueError: a damaged file)' in (
        caplog.text
    )
    assert _files(f'{run}/{checkpoint.UNREADABLE}/{newer}') == before
    assert not storage.exists(f'{run}/checkpoints/{newer}')
    assert checkpoint.steps_on_disk(run) == [TRAINED_STEP]


def test_a_failed_move_aside_stops_the_job_with_one_error(trained, fake_gcs, monkeypatch):
    for step in (TRAINED_STEP, TRAINED_STEP + 1):
        _copy_checkpoint(trained, RUN, step)

    def move_tree(location, target):
        raise PermissionError('403 Forbidden\nmore detail')

    monkeypatch.setattr(storage, 'move_tree', move_tree)
    with checkpoint.make_manager(RUN) as manager:
        with pytest.raises(
            errors.UserError,
            match=rf'^Checkpoints \[{TRAINED_STEP + 1}\] in {RUN}/checkpoints cannot be read, '
            rf'and moving them to {RUN}/{checkpoint.UNREADABLE} failed \(PermissionError: 403 '
            r'Forbidden\)\. Move or delete them, then launch again\.$',
        ):
            checkpoint._restore_newest(
                manager, lambda step: 'state' if step == TRAINED_STEP else 1 / 0
            )
    assert checkpoint.steps_on_disk(RUN) == [TRAINED_STEP, TRAINED_STEP + 1]


def test_an_image_folder_on_gs_reads_as_its_local_copy(config, tmp_path, fake_gcs):
    generator = np.random.default_rng(1)
    for name in ('cats/b.png', 'cats/a.jpg', 'dogs/c.png', 'notes.txt'):
        local = tmp_path / name
        local.parent.mkdir(exist_ok=True)
        if name.endswith('.txt'):
            local.write_text('not an image')
        else:
            Image.fromarray(generator.integers(0, 256, (20, 12, 3), np.uint8)).save(local)
        storage.write_bytes(f'gs://bucket/images/{name}', local.read_bytes())
    config = config.copy_and_resolve_references()
    config.data.dataset, config.data.num_channels = 'folder', 3
    config.data.data_dir = 'gs://bucket/images'
    data.check(config)
    remote = data.make_source(config)
    local = data.FolderSource(str(tmp_path), config.data.image_size, 3)
    assert (
        [p.removeprefix('gs://bucket/images/') for p in remote.paths]
        == [os.path.relpath(p, tmp_path) for p in local.paths]
        == ['cats/a.jpg', 'cats/b.png', 'dogs/c.png']
    )
    np.testing.assert_array_equal(remote.load(np.arange(3)), local.load(np.arange(3)))
    config.data.data_dir = 'gs://bucket/none'
    with pytest.raises(errors.UserError, match="data_dir='gs://bucket/none' does not exist"):
        data.check(config)


def test_an_unprepared_tfds_data_dir_on_gs_names_the_prepare_command(config, fake_gcs, monkeypatch):
    monkeypatch.setattr(data, 'PREPARE_PACKAGE', 'a_package_that_is_not_installed')
    config = config.copy_and_resolve_references()
    config.data.dataset, config.data.image_size = 'mnist', 28
    config.data.data_dir = 'gs://bucket/tfds'
    with pytest.raises(
        errors.UserError,
        match=r'not prepared in gs://bucket/tfds.*'
        r"python -m pip install -e '\.\[prepare\]'",
    ):
        data.check(config)


def test_storage_without_its_package_names_it():
    with pytest.raises(
        errors.UserError,
        match=r'--workdir=s3://bucket/run is on s3:// storage, '
        r'which needs the package s3fs: pip install s3fs',
    ):
        storage.check_reachable('s3://bucket/run', '--workdir')
