"""Flag parsing for the command lines (ihdm_jax.main, ihdm_jax.convert_original): a mistake in
the flags or in the config file ends with one line, `Error: ...`, and exit status 1, instead of
usage text or a traceback; --help prints the program's usage, the shipped configs and the
flags, and exits with status 0."""

import ast
import glob
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
    if not any(
        isinstance(node, ast.FunctionDef) and node.name == 'get_config' for node in tree.body
    ):
        sys.exit(
            f'Error: --config={path} defines no get_config(); a config file returns its '
            'ConfigDict from get_config() (see configs/digits.py).'
        )


_HELP = ('-h', '-?', '--help', '--helpshort', '--helpfull')
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def shipped_configs() -> list:
    """(path relative to the repository, first line of its docstring) for each shipped config."""
    listed = []
    for path in sorted(glob.glob(os.path.join(CONFIGS, '*.py'))):
        if os.path.basename(path) == '__init__.py':
            continue
        with open(path) as f:
            doc = ast.get_docstring(ast.parse(f.read(), path)) or ''
        listed.append((os.path.join('configs', os.path.basename(path)), doc.split('\n')[0]))
    return listed


def usage(argv) -> str:
    """The usage of the program run: its docstring, the override syntax, the shipped configs
    and its own flags."""
    main = sys.modules['__main__']
    program = main.__spec__.name if getattr(main, '__spec__', None) else os.path.basename(argv[0])
    configs = '\n'.join(f'  {path:26} {line}' for path, line in shipped_configs()) or (
        f'  none in {CONFIGS} (they ship in the repository, not in the installed package)'
    )
    return (
        f'{(main.__doc__ or "").strip()}\n\n'
        'Config values: --config=FILE loads a config file and --config.KEY=VALUE overrides '
        'one of its\nvalues (the keys and their meaning: ihdm_jax/defaults.py), e.g.\n'
        f'  python -m {program} --config=configs/digits.py --workdir=runs/digits \\\n'
        '      --config.training.n_iters=500 --config.model.dtype=bfloat16\n\n'
        f'Shipped configs:\n{configs}\n\n'
        f'Flags:\n{flags.FLAGS.module_help(main)}\n'
    )


def parse_flags(argv):
    """absl's flag parsing, with one line for each mistake instead of usage text or traceback."""
    if any(arg in _HELP for arg in argv[1:]):
        print(usage(argv))
        sys.exit(0)
    _check_config_file(argv)
    try:
        return flags.FLAGS(argv)
    except Exception as error:  # a bad flag, override or value, or a config file that fails
        for arg in argv[1:]:
            if arg.startswith('--config.'):
                message = validation.unknown_key(arg[len('--config.') :].split('=')[0])
                if message:
                    sys.exit(f'Error: {message} (in {arg})')
        sys.exit(f'Error: {_one_line(error)}')


def _one_line(error) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return f'{lines[0]} {lines[-1]}' if 'Traceback' in str(error) else lines[0]
