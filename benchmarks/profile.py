"""Where the time of a compiled program goes, by part of the model, from a jax.profiler trace.

`breakdown(compiled, call, calls)` runs a compiled program `calls` times under the profiler,
reads the time of every XLA operation from the trace and assigns it to a part (U-Net
convolutions, GroupNorm, attention, dropout, random numbers, heat operator, optimizer, EMA, ...)
by the Python call stack that XLA keeps in each operation's metadata: a fusion takes the part
of the most important operation inside it (`PARTS` in order). Forward and backward are told
apart by the `transpose(jvp(...))` JAX writes into the names of the backward pass.
"""

import collections
import gzip
import json
import pathlib
import re
import tempfile

import jax

# (part, function names of the call stack that mark it: the name or its last dotted
# component), the first match wins.
PARTS = (
    ('dropout', ('dropout',)),
    (
        'random numbers',
        (
            '_randint',
            '_normal',
            '_uniform',
            '_bernoulli',
            'example_noise',
            'RngStream.__call__',
            '_threefry_split',
            '_threefry_fold_in',
            'threefry_2x32',
        ),
    ),
    ('heat operator', ('heat_forward', 'dct_2d', 'idct_2d')),
    ('GroupNorm', ('GroupNorm.__call__',)),
    ('attention', ('Attention.__call__',)),
    ('convolutions', ('Conv.__call__',)),
    ('time embedding', ('timestep_embedding', 'Linear.__call__')),
    ('optimizer', ('update_fn', 'apply_updates', 'tree_norm', 'clip_fn')),
    ('EMA', ('ema_decay', 'make_train_step.<locals>.train_step.<locals>.<lambda>')),
    (
        'U-Net (other)',
        ('UNet.__call__', 'ResBlock.__call__', 'Upsample.__call__', 'Downsample.__call__'),
    ),
)
_OP_KINDS = (
    'convolution',
    'dot',
    'custom-call',
    'rng-bit-generator',
    'reduce',
    'exponential',
    'divide',
    'multiply',
    'add',
)


def _tables(hlo: str):
    """Function names of each stack frame id, from the tables at the head of the HLO text."""
    section, functions, locations, frames = None, {}, {}, {}
    for line in hlo.splitlines():
        if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
            section = line
            continue
        if not line.strip() or line.startswith(('HloModule', '%', 'ENTRY', '}', ' ')):
            if line.startswith(('%', 'ENTRY')):
                break
            continue
        index, _, rest = line.partition(' ')
        if section == 'FunctionNames':
            functions[int(index)] = rest.strip('"')
        elif section == 'FileLocations':
            locations[int(index)] = int(re.search(r'function_name_id=(\d+)', rest).group(1))
        elif section == 'StackFrames':
            location, parent = re.search(
                r'file_location_id=(\d+) parent_frame_id=(\d+)', rest
            ).groups()
            # The text prints a parent as its id + 1, with 1 for none.
            frames[int(index)] = (int(location), int(parent) - 1)

    def stack(frame):
        names, seen = [], set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            location, parent = frames[frame]
            names.append(functions.get(locations.get(location), ''))
            frame = parent
        return names

    return stack


def _part(names, op_name):
    names = set(names) | {name.rsplit('.', 1)[-1] for name in names}
    # jax.random's own functions are not in the stack, but their jitted names are in op_name.
    names |= set(re.findall(r'jit\((\w+)\)', op_name))
    for part, marks in PARTS:
        if names.intersection(marks):
            return part
    return 'other'


def operation_parts(hlo: str) -> dict:
    """{HLO instruction name: (part, 'forward' | 'backward')} for every instruction; a fusion
    takes the part of the most important instruction of its fused computation."""
    stack = _tables(hlo)
    computations, current = collections.defaultdict(list), None
    instructions = {}
    for line in hlo.splitlines():
        header = re.match(r'^(?:ENTRY )?%([\w.\-]+) ', line)
        if header and line.rstrip().endswith('{'):
            current = header.group(1)
            continue
        m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(', line)
        if not m:
            continue
        name, kind = m.groups()
        frame = re.search(r'stack_frame_id=(\d+)', line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        op_name = op_name.group(1) if op_name else ''
        calls = re.search(r'calls=%([\w.\-]+)', line)
        info = dict(
            kind=kind,
            part=_part(stack(int(frame.group(1))) if frame else [], op_name),
            backward='transpose(' in op_name,
            calls=calls.group(1) if calls else None,
        )
        instructions[name] = info
        computations[current].append(info)

    def rank(info):
        kind = info['kind']
        return (
            _OP_KINDS.index(kind) if kind in _OP_KINDS else len(_OP_KINDS),
            info['part'] == 'other',
        )

    result = {}
    for name, info in instructions.items():
        members = computations.get(info['calls']) if info['kind'] == 'fusion' else None
        chosen = min(members, key=rank) if members else info
        if chosen['part'] == 'other' and members:
            chosen = next((m for m in members if m['part'] != 'other'), chosen)
        if chosen['part'] != 'other':
            result[name] = (chosen['part'], 'backward' if chosen['backward'] else 'forward')
        elif chosen['kind'] == 'convolution':
            # XLA writes no metadata on the weight-gradient convolutions it derives.
            result[name] = ('convolutions', 'backward')
        elif name.startswith(('transpose', 'copy')) or chosen['kind'] in ('transpose', 'copy'):
            result[name] = ('layout transposes and copies', '')
        else:
            result[name] = ('other', '')
    return result


def trace_times(fn, calls: int) -> dict:
    """Microseconds per call of every XLA operation that ran while fn() was called `calls`
    times under the profiler (fn must wait for its results)."""
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory)
        for _ in range(calls):
            fn()
        jax.profiler.stop_trace()
        trace = next(pathlib.Path(directory).rglob('*.trace.json.gz'))
        events = json.loads(gzip.decompress(trace.read_bytes()))['traceEvents']
    times = collections.Counter()
    for event in events:
        if event.get('ph') == 'X':
            times[event['name']] += event.get('dur', 0) / calls
    return times


def breakdown(compiled, call, calls: int = 5) -> dict:
    """{(part, direction): ms per call} of the compiled program, run by call() (which waits
    for its results), plus ('total', '') for the sum of all operations. Operations run on
    several devices at once are each counted, so the total is device time, which exceeds the
    wall time when devices work in parallel."""
    parts = operation_parts(compiled.as_text())
    times = trace_times(call, calls)
    result = collections.Counter()
    for name, microseconds in times.items():
        if name in parts:
            result[parts[name]] += microseconds / 1e3
    result[('total', '')] = sum(result.values())
    return dict(result)


def markdown(columns: dict) -> str:
    """A table of breakdowns {column title: breakdown}, parts as rows, in ms and percent."""
    keys = sorted(
        {key for b in columns.values() for key in b if key[0] != 'total'},
        key=lambda key: (-max(b.get(key, 0) for b in columns.values()), key),
    )
    lines = ['| part | ' + ' | '.join(columns) + ' |', '|---|' + '---:|' * len(columns)]
    for key in keys + [('total', '')]:
        cells = []
        for b in columns.values():
            ms, total = b.get(key, 0.0), b[('total', '')]
            cells.append(
                f'{ms:.1f} ({100 * ms / total:.0f}%)' if key[0] != 'total' else f'{ms:.1f}'
            )
        lines.append(f'| {" ".join(k for k in key if k)} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)
