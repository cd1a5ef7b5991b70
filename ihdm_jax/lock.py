"""One training job per workdir: <workdir>/lock.json, held by process 0 of the job.

The lock names its holder (host, pid) and carries a heartbeat, the holder's wall-clock time,
written again every HEARTBEAT_S seconds by a background thread. A lock is stale, and is taken
over, when its heartbeat is older than STALE_S seconds or its holder ran on this machine and its
pid is gone; so a crashed job blocks the workdir for at most STALE_S seconds (not at all on the
same machine). A second job finds a live lock and ends with one `Error:` line naming the holder.
Under SLURM the lock also names the job (cluster and job id): a requeued job runs again under its
id, with its previous run's lock perhaps still fresh, and takes that lock over at once.

The lock is always written whole. On a local disk a new lock is created exclusively (a hard
link fails if the name exists). Cloud storage has no exclusive create through epath, so there a
job writes its lock, waits SETTLE_S seconds and reads it back: of two jobs started within that
time, the one whose write landed last holds the lock. Jobs that take over a stale lock check
the same way.
"""

import json
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ihdm_jax import errors
from ihdm_jax import parallel
from ihdm_jax import storage

LOCK_FILE = 'lock.json'
HEARTBEAT_S = 20.0
STALE_S = 120.0
SETTLE_S = 2.0


def this_machine() -> str:
    """This machine: its host name and, where there is one, its boot id (host names repeat)."""
    try:
        with open('/proc/sys/kernel/random/boot_id') as f:
            boot = f.read().strip()
    except OSError:
        boot = ''
    return f'{socket.gethostname()} {boot}'.strip()


def _slurm_job():
    """This process's SLURM job, as `cluster/id` or `id` (job ids of two clusters may be equal);
    None outside SLURM."""
    job = os.environ.get('SLURM_JOB_ID')
    if not job:
        return None
    cluster = os.environ.get('SLURM_CLUSTER_NAME')
    return f'{cluster}/{job}' if cluster else job


def _alive_here(holder) -> bool:
    """False if the holder ran on this machine and its process is gone; True otherwise."""
    if holder.get('machine') != this_machine():
        return True
    try:
        os.kill(int(holder['pid']), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def _read(location):
    """The lock's content; None if there is none, {} (a stale lock) if it cannot be read."""
    try:
        content = json.loads(storage.read_text(location))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return content if isinstance(content, dict) else {}


def _live(holder) -> bool:
    age = time.time() - float(holder.get('heartbeat', 0))
    return age < STALE_S and _alive_here(holder)


def _describe(holder, workdir) -> str:
    age = time.time() - float(holder.get('heartbeat', 0))
    job = f' (SLURM job {holder["slurm_job"]})' if holder.get('slurm_job') else ''
    return (
        f'--workdir={workdir} is in use by another job: pid {holder.get("pid")} on host '
        f'{holder.get("host")}{job}, started {holder.get("started")}, heartbeat {age:.0f} s ago '
        f'({storage.join(workdir, LOCK_FILE)}). Wait for it to end or stop it, or use '
        f'another --workdir; a lock whose heartbeat is older than {STALE_S:.0f} s is taken '
        'over.'
    )


class WorkdirLock:
    """The lock of one job on `workdir`; process 0 holds it, the other processes wait for its
    outcome. Use as a context manager: entering raises errors.UserError if another job holds
    the workdir; leaving stops the heartbeat and removes the lock."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.location = storage.join(workdir, LOCK_FILE)
        self.content = {
            'host': socket.gethostname(),
            'machine': this_machine(),
            'pid': os.getpid(),
            'slurm_job': _slurm_job(),
            'token': uuid.uuid4().hex,
            'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
        }
        self._stop = threading.Event()
        self._thread = None

    def _payload(self) -> str:
        return json.dumps({**self.content, 'heartbeat': time.time()}, indent=2) + '\n'

    def _write(self):
        """Writes the lock whole: a reader never sees a part of it (an object write on cloud
        storage; a rename on a local disk)."""
        if storage.is_remote(self.location):
            storage.write_text(self.location, self._payload())
            return
        tmp = f'{self.location}.{self.content["token"]}'
        storage.write_text(tmp, self._payload())
        storage.rename(tmp, self.location)

    def _create_local(self) -> bool:
        """Creates the lock with its content if there is none (a hard link fails if the name
        exists); False if another job's lock is there."""
        tmp = f'{self.location}.{self.content["token"]}'
        storage.write_text(tmp, self._payload())
        try:
            os.link(tmp, self.location)
        except FileExistsError:
            return False
        finally:
            storage.remove(tmp)
        return True

    def _holds(self) -> bool:
        time.sleep(SETTLE_S)
        return (_read(self.location) or {}).get('token') == self.content['token']

    def _take(self):
        """Takes the lock; returns None, or the content of a live holder's lock."""
        storage.makedirs(self.workdir)
        job = self.content['slurm_job']
        for _ in range(3):  # another job may take or renew the lock meanwhile: look again
            previous = _read(self.location)
            if job is not None and previous is not None and previous.get('slurm_job') == job:
                logging.info(
                    'Taking over the lock %s of pid %s on host %s: an earlier run of this '
                    'SLURM job, %s (SLURM runs a job id once at a time; a requeued job runs '
                    'again under its id).',
                    self.location,
                    previous.get('pid'),
                    previous.get('host'),
                    job,
                )
            elif previous is not None and _live(previous):
                return previous
            elif previous is not None:
                logging.warning(
                    'Taking over the stale lock %s of pid %s on host %s.',
                    self.location,
                    previous.get('pid'),
                    previous.get('host'),
                )
            if storage.is_remote(self.location):
                self._write()
                if self._holds():
                    return None
                continue
            if previous is not None:
                storage.remove(self.location)
            if self._create_local() and (previous is None or self._holds()):
                # Two jobs that both found the stale lock may both create one; the one whose
                # lock is there after SETTLE_S holds it.
                return None
        return _read(self.location) or {'host': '?', 'pid': '?'}

    def __enter__(self):
        holder = self._take() if parallel.is_main_process() else None
        refused = holder is not None
        if jax.process_count() > 1:
            refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refused)))
        if refused:
            raise errors.UserError(
                _describe(holder, self.workdir)
                if holder is not None
                else f'--workdir={self.workdir} is in use by another job (see '
                'the error of process 0).'
            )
        if parallel.is_main_process():
            self._thread = threading.Thread(
                target=self._beat, daemon=True, name='ihdm_jax workdir lock'
            )
            self._thread.start()
        return self

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except Exception as error:  # a storage hiccup must not end the job
                logging.warning('Could not renew the lock %s: %s', self.location, error)

    def __exit__(self, *exc):
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        held = _read(self.location)
        if held is not None and held.get('token') == self.content['token']:
            storage.remove(self.location)
