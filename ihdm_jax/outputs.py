"""Where jobs write their results: <workdir>/<folder>/, JSON files."""

import json
import os

from ihdm_jax import parallel


def folder(workdir: str, *parts: str) -> str:
    """<workdir>/<parts...>, created on process 0 (which alone writes results)."""
    path = os.path.join(workdir, *parts)
    if parallel.is_main_process():
        os.makedirs(path, exist_ok=True)
    return path


def write_json(path: str, content):
    with open(path, 'w') as f:
        json.dump(content, f, indent=2)
        f.write('\n')
