"""Where jobs write their results: <workdir>/<folder>/, JSON files."""

import json

from ihdm_jax import parallel
from ihdm_jax import storage


def folder(workdir: str, *parts: str) -> str:
    """<workdir>/<parts...>, created on process 0 (which alone writes results)."""
    path = storage.join(workdir, *parts)
    if parallel.is_main_process():
        storage.makedirs(path)
    return path


def write_json(path: str, content):
    storage.write_text(path, json.dumps(content, indent=2) + '\n')
