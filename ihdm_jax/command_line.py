"""Flag parsing for the command lines (ihdm_jax.main, ihdm_jax.convert_original): a mistake in
the flags or in the config file ends with one line, `Error: ...`, and exit status 1, instead of
usage text or a traceback."""

import ast
import os
import sys

from absl import flags

from ihdm_jax import validation


def _check_config_file(argv):
    """The --config path of the command line, checked before ml_collections loads it."""
    paths = [arg.split('=', 1)[1] for arg in argv[1:] if arg.startswith('--config=')]
    if not paths:
        sys.exit('Error: --config is required, e.g. --config=configs/digits.py.')
    path = paths[-1]
    if not os.path.isfile(path):
        sys.exit(f'Error: --config={path}: no such file; the shipped configs are in configs/.')
    try:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
    except SyntaxError as error:
        sys.exit(f'Error: --config={path} has a syntax error at line {error.lineno}: {error.msg}.')
    if not any(isinstance(node, ast.FunctionDef) and node.name == 'get_config'
               for node in tree.body):
        sys.exit(f'Error: --config={path} defines no get_config(); a config file returns its '
                 'ConfigDict from get_config() (see configs/digits.py).')


def parse_flags(argv):
    """absl's flag parsing, with one line for each mistake instead of usage text or traceback."""
    _check_config_file(argv)
    try:
        return flags.FLAGS(argv)
    except Exception as error:  # a bad flag, override or value, or a config file that fails
        for arg in argv[1:]:
            if arg.startswith('--config.'):
                message = validation.unknown_key(arg[len('--config.'):].split('=')[0])
                if message:
                    sys.exit(f'Error: {message} (in {arg})')
        sys.exit(f'Error: {_one_line(error)}')


def _one_line(error) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return f'{lines[0]} {lines[-1]}' if 'Traceback' in str(error) else lines[0]
