"""Mutation testing of wsmanager's sans-I/O layers: would the fast unit tests notice a broken codec?

Each mutant is one small change to one function of the codec, the handshake or
permessage-deflate (the fixed list ``TARGETS``): an operator swapped, a
comparison moved by one, a constant changed, a condition forced or negated, a
``raise`` removed. The module with that change is written to a temporary
directory beside copies of the tests, and the unit tests run against it in a
subprocess::

    python -m pytest -x -q -p no:cacheprovider -m "not peers"

A mutant is *killed* when they fail, *timeout* when they run past the limit
(also a detection: an endless loop), and *survives* when they pass. Survivors
listed in ``EQUIVALENT`` behave exactly like the original (the reason is given
there); any other survivor is a behaviour no unit test checks.

Usage::

    python mutate_wsmanager.py --sample 200 --seed 1       # a seeded sample
    python mutate_wsmanager.py --sample 0 --jobs 2          # every mutant
    python mutate_wsmanager.py --list --targets parse_close # what would run
    python mutate_wsmanager.py --mutant 'parse_close+6:7 Eq->NotEq'

The exit status is 0 when at least ``--threshold`` percent (default 95) of the
non-equivalent mutants run were detected. Standard library only.
"""

import argparse
import ast
import concurrent.futures
import copy
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Set, TextIO, Tuple

HERE = Path(__file__).resolve().parent
MODULE = HERE / "wsmanager.py"
# Copied beside each mutant: the tests, and the pytest settings (markers) they run with.
SUPPORT_FILES = ("test_wsmanager.py", "setup.cfg", "README.rst", "pyproject.toml", "mutate_wsmanager.py")
PYTEST_ARGS = ("-x", "-q", "-p", "no:cacheprovider", "-m", "not peers", "test_wsmanager.py")

# The codec, handshake and permessage-deflate layers: module-level functions and classes (every
# method of a class), by name. The sockets, the manager and the integrations are out of scope: the
# unit tests do not reach them by design.
TARGETS = (
    # Codec
    "apply_mask", "_byte_view", "encode_frame", "_first_byte_error", "FrameParser", "_feed_utf8",
    "MessageAssembler", "_Receiver", "encode_close", "parse_close",
    # permessage-deflate
    "_deflate_settings", "_shared_compressor", "PerMessageDeflate",
    # Handshake
    "Headers", "Request", "_token_list", "_tokens", "accept_key", "new_key", "_header_lines", "HeadReader",
    "_parse_head", "parse_request", "_origin_form", "validate_request", "encode_switching_protocols",
    "_switch_fields", "_encode_switch", "_status_text", "encode_response", "_complete_response",
    "encode_request", "parse_response", "validate_response",
    # Extension negotiation
    "_parse_extension", "parse_extensions", "_deflate_request_params", "_format_deflate", "negotiate_deflate",
    "encode_deflate_offer", "parse_deflate_response",
)

# Survivors that behave exactly like the original, by mutant id, with the reason. Ids name the
# function and the line within it, so they stay valid while the rest of the file changes.
EQUIVALENT: Dict[str, str] = {
    # Performance-only: another path to the same bytes.
    "encode_frame+11:7 condition-True":
        "every payload goes through _byte_view; a view of bytes or a bytearray has the same bytes (only the "
        "exact-type fast check is skipped)",
    "encode_frame+14:7 condition-False":
        "no frame takes the precomputed-header fast path: the general path writes the same header bytes",
    "_byte_view+9:7 condition-True":
        "every view is copied with tobytes() (C order) instead of cast: the same bytes",
    "encode_frame+14:68 2->1":
        "BINARY frames skip the precomputed-header fast path: the general path writes the same header bytes",
    "apply_mask+9:7 GtE->Gt":
        "a payload of exactly 512 bytes is masked by the small-payload path: the same bytes",
    "FrameParser.feed+21:29 8->7":
        "opcode 7 is reserved: the first-byte table has already refused it, so only 0-2 and 8-10 get here",
    "FrameParser.feed+53:23 condition-False":
        "a large masked payload is unmasked from a slice instead of a view: the same bytes",
    "FrameParser.feed+83:13 Lt->LtE":
        "with nothing left over, the (already empty) buffer is replaced by a new empty bytearray",
    "MessageAssembler.receive_partial+5:15 And->Or":
        "a TEXT frame pending while a text message is open is refused by check_pending first, and a pending "
        "continuation of a text message always has its decoder: the changed condition has the same value",
    "_tokens+3:34 condition-True":
        "a blank value gives {''} instead of set(): callers only ask whether 'websocket' or 'upgrade' is in it",
    "HeadReader.__init__+4:24 0->1":
        "the first scan skips byte 0 when counting lines: a newline there ends an (empty) head at once, "
        "two lines at most, far below any limit",
    "FrameParser.feed+65:25 GtE->Gt":
        "an unmasked payload of exactly 512 bytes is copied from a slice instead of a view: the same bytes",
    "FrameParser.pending_rsv1+3:27 2->1":
        "pending_rsv1() is asked only once pending() has a header, so the buffer holds 2 bytes or more anyway",
    "PerMessageDeflate.decompress+14:29 2048->2047":
        "the size at which the tail goes in a second call instead of a copy moves by one byte: the same output",
    "PerMessageDeflate.decompress+14:29 2048->2049":
        "the size at which the tail goes in a second call instead of a copy moves by one byte: the same output",
    "FrameParser.feed+63:23 condition-False":
        "a payload of a bytes input is copied out through a view or a slice instead of sliced: the same bytes",
    "PerMessageDeflate.decompress+14:17 Lt->LtE":
        "a payload of exactly 2048 bytes inflates in two steps (payload, then tail) instead of one call on a "
        "copy: the same output",
    "PerMessageDeflate.decompress+18:65 1->0":
        "a large final frame inflates up to the limit instead of one byte past it; the tail call that follows "
        "then yields the next byte zlib holds (the rest of a literal run, a match or a stored block), so the "
        "message still measures limit + 1 bytes and fails with the same 1009 (no difference found over 300 "
        "random large payloads and limits)",
    "_shared_compressor+6:7 condition-True":
        "a new compressor for every message: each message ends with a full flush, which resets the shared "
        "compressor, so the output is the same bytes",
    # Values that cannot reach the mutated code.
    "MessageAssembler.receive+5:21 8->7":
        "opcode 7 is reserved: FrameParser refuses it and Opcode has no 7, so the assembler only ever sees "
        "0, 1, 2, 8, 9 and 10",
    "_status_text+0:44 str-changed": "the default reason is never used: both callers pass the response's reason",
    "_first_byte_error+0:53 False->True":
        "the default of allow_rsv1 is never used: its one caller, FrameParser.feed, passes the parser's setting",
    "negotiate_deflate+37:62 15->16":
        "the default is min()-ed with the server's own server_max_window_bits, which _deflate_settings keeps "
        "at 15 or less",
    "_deflate_request_params+11:26 True->False":
        "the value stored for a *_no_context_takeover flag is never read: callers only ask whether it is there",
    "parse_deflate_response+36:59 15->16":
        "the default is min()-ed with our own client_max_window_bits, which _deflate_settings keeps at 15 or less",
    # Tuning defaults (issue 22 sets them by benchmark): any value makes a valid stream of the same message.
    "PerMessageDeflate.__init__+0:96 8->9":
        "mem_level is a zlib memory/speed trade-off: any value in 1..9 compresses to a valid stream that "
        "inflates to the same message",
    "PerMessageDeflate.__init__+0:76 6->7":
        "level is a zlib ratio/speed trade-off: any value compresses to a valid stream that inflates to the "
        "same message",
    "PerMessageDeflate.__init__+0:96 8->7":
        "mem_level is a zlib memory/speed trade-off: any value in 1..9 compresses to a valid stream that "
        "inflates to the same message",
}

_BINARY_SWAPS = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv,
    ast.BitOr: ast.BitAnd, ast.BitAnd: ast.BitOr, ast.BitXor: ast.BitOr, ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
}
_COMPARE_SWAPS = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}


class Mutant(NamedTuple):
    id: str  # "<function qualname>+<line within it>:<column> <change>"
    function: str
    line: int  # in wsmanager.py
    start: int  # character offsets of the replaced text in the source
    end: int
    replacement: str

    def apply(self, source: str) -> str:
        return source[:self.start] + self.replacement + source[self.end:]


def _offsets(source: str) -> List[int]:
    """Character offset of the start of each line (1-based line numbers index it directly)."""
    offsets = [0, 0]
    for line in source.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    return offsets


def _skipped_nodes(function: ast.AST) -> Set[ast.AST]:
    """Nodes not to mutate: docstrings, annotations (no run-time effect) and f-string internals
    (their positions are unreliable before Python 3.12)."""
    skipped: Set[ast.AST] = set()
    for node in ast.walk(function):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            skipped.add(body[0].value)
        annotations: List[Optional[ast.AST]] = []
        if isinstance(node, ast.FunctionDef):
            annotations.append(node.returns)
            arguments = node.args
            for arg in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                        arguments.vararg, arguments.kwarg]:
                if arg is not None:
                    annotations.append(arg.annotation)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        elif isinstance(node, ast.JoinedStr):
            annotations.append(node)
        for annotation in annotations:
            if annotation is not None:
                skipped.update(ast.walk(annotation))
    return skipped


def _changes(node: Any) -> Iterator[Tuple[Any, str, str]]:
    """(node whose source is replaced, replacement text, short description) for each mutation of ``node``."""
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_SWAPS:
        new = copy.deepcopy(node)
        new.op = _BINARY_SWAPS[type(node.op)]()
        yield node, f"({ast.unparse(new)})", f"{type(node.op).__name__}->{type(new.op).__name__}"
    elif isinstance(node, ast.AugAssign) and type(node.op) in _BINARY_SWAPS:
        augmented = copy.deepcopy(node)
        augmented.op = _BINARY_SWAPS[type(node.op)]()
        yield node, ast.unparse(augmented), f"{type(node.op).__name__}=->{type(augmented.op).__name__}="
    elif isinstance(node, ast.Compare):
        for index, op in enumerate(node.ops):
            if type(op) in _COMPARE_SWAPS:
                compare = copy.deepcopy(node)
                compare.ops[index] = _COMPARE_SWAPS[type(op)]()
                which = f"#{index}" if len(node.ops) > 1 else ""
                swapped = type(compare.ops[index]).__name__
                yield node, f"({ast.unparse(compare)})", f"{type(op).__name__}->{swapped}{which}"
    elif isinstance(node, ast.BoolOp):
        boolean = copy.deepcopy(node)
        boolean.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        yield node, f"({ast.unparse(boolean)})", f"{type(node.op).__name__}->{type(boolean.op).__name__}"
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield node, f"({ast.unparse(node.operand)})", "not-removed"
    elif isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool):
            yield node, repr(not value), f"{value}->{not value}"
        elif isinstance(value, int):
            yield node, repr(value + 1), f"{value}->{value + 1}"
            if value > 0:
                yield node, repr(value - 1), f"{value}->{value - 1}"
        elif isinstance(value, str):  # a whole other text: a test that reads any part of it notices
            yield node, repr("mutant" if value != "mutant" else ""), "str-changed"
        elif isinstance(value, bytes):
            yield node, repr(b"mutant" if value != b"mutant" else b""), "bytes-changed"
    elif isinstance(node, ast.Raise):
        yield node, "pass", "raise-removed"
    if isinstance(node, (ast.If, ast.IfExp)):
        yield node.test, "True", "condition-True"
        yield node.test, "False", "condition-False"
    elif isinstance(node, ast.While):
        yield node.test, "False", "condition-False"


def _functions(tree: ast.Module, targets: Sequence[str]) -> Iterator[Tuple[str, Any]]:
    """(qualified name, node) of each target function and of each method of each target class."""
    wanted = set(targets)
    found = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in wanted:
            found.add(node.name)
            if isinstance(node, ast.FunctionDef):
                yield node.name, node
                continue
            for member in node.body:
                if isinstance(member, ast.FunctionDef):
                    yield f"{node.name}.{member.name}", member
    missing = wanted - found
    if missing:
        raise SystemExit(f"targets not found in {MODULE.name}: {', '.join(sorted(missing))}")


def generate(source: str, targets: Sequence[str] = TARGETS) -> List[Mutant]:
    """Every mutant of the target functions of ``source``, in source order."""
    tree = ast.parse(source)
    offsets = _offsets(source)
    mutants: List[Mutant] = []
    seen = set()
    for name, function in _functions(tree, targets):
        skipped = _skipped_nodes(function)
        for node in ast.walk(function):
            if node in skipped or node is function:
                continue
            for replaced, text, description in _changes(node):
                if replaced in skipped:
                    continue
                start = offsets[replaced.lineno] + replaced.col_offset
                end = offsets[replaced.end_lineno] + replaced.end_col_offset
                mutant_id = f"{name}+{replaced.lineno - function.lineno}:{replaced.col_offset} {description}"
                if source[start:end] == text or mutant_id in seen:
                    continue
                seen.add(mutant_id)
                mutants.append(Mutant(mutant_id, name, replaced.lineno, start, end, text))
    mutants.sort(key=lambda m: (m.start, m.id))
    return mutants


class Outcome(NamedTuple):
    mutant: Mutant
    status: str  # "killed", "survived" or "timeout"
    seconds: float
    detail: str  # the first failing test, for a killed mutant


# The tests and settings as they were when the run started: editing them meanwhile cannot skew it.
_SUPPORT = {name: (HERE / name).read_bytes() for name in SUPPORT_FILES if (HERE / name).exists()}


def _workspace(source: str) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="wsmanager-mutant-"))
    for name, content in _SUPPORT.items():
        (directory / name).write_bytes(content)
    (directory / "wsmanager.py").write_text(source, encoding="utf-8")
    return directory


def run_tests(source: str, timeout: float, pytest_args: Sequence[str] = PYTEST_ARGS,
              env: Optional[Dict[str, str]] = None) -> Tuple[str, float, str]:
    """Run the unit tests against ``source`` as wsmanager.py, in a temporary directory: (status, seconds, detail).

    The status is "survived" (they pass), "killed" (they fail, or cannot even be collected), "timeout",
    or "error" (pytest could not run as asked: a bug of this script, not a detection).
    """
    directory = _workspace(source)
    # The "mutation" hypothesis profile of the tests does not shrink: a failing example is enough.
    environment = dict(os.environ, PYTHONPATH=str(directory), PYTHONDONTWRITEBYTECODE="1",
                       WSMANAGER_HYPOTHESIS="mutation", **(env or {}))
    started = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", *pytest_args], cwd=directory, env=environment,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - started, ""
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    seconds = time.monotonic() - started
    if result.returncode == 0:
        return "survived", seconds, ""
    output = result.stdout.decode("utf-8", "replace")
    failed = [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    lines = failed or output.strip().splitlines()[-1:] or [""]
    # 1: tests failed; 2 (or 4 with test ids given): the mutant breaks the import of the tests themselves.
    broken_import = any(line.startswith("ERROR test_wsmanager.py") for line in failed)
    return "killed" if result.returncode in (1, 2) or broken_import else "error", seconds, lines[0][:160]


# Which unit tests run which target function: a pytest plugin traces the calls into wsmanager.py
# while each test runs, and writes {test id: [seconds, [first lines of the functions it ran]]}.
_TRACE_PLUGIN = """
import json, os, sys, threading, time
import pytest

_MODULE = os.path.join(os.getcwd(), "wsmanager.py")
_seen = {}

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    lines = set()

    def trace(frame, event, arg):
        if frame.f_code.co_filename == _MODULE:
            lines.add(frame.f_code.co_firstlineno)
        return None

    started = time.perf_counter()
    sys.setprofile(trace)
    threading.setprofile(trace)
    try:
        yield
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
        _seen[item.nodeid] = [time.perf_counter() - started, sorted(lines)]

def pytest_sessionfinish(session):
    with open(os.environ["MUTATION_TRACE_OUT"], "w") as out:
        json.dump(_seen, out)
"""


def _function_lines(source: str, targets: Sequence[str]) -> Dict[int, str]:
    """First line of each function defined inside a target (nested ones too) -> the target function's name."""
    lines = {}
    for name, function in _functions(ast.parse(source), targets):
        for node in ast.walk(function):
            if isinstance(node, (ast.FunctionDef, ast.Lambda)):
                # A function's co_firstlineno is its first decorator's line, if it has one.
                decorators = node.decorator_list if isinstance(node, ast.FunctionDef) else []
                lines[decorators[0].lineno if decorators else node.lineno] = name
    return lines


def map_tests(source: str, targets: Sequence[str]) -> Tuple[float, Dict[str, List[str]]]:
    """Run the unit tests once, traced: (seconds, {target function: the tests that run it, fastest first})."""
    with tempfile.TemporaryDirectory(prefix="wsmanager-trace-") as scratch:
        out = Path(scratch) / "trace.json"
        _SUPPORT["_mutation_trace.py"] = _TRACE_PLUGIN.encode()
        try:
            status, seconds, detail = run_tests(source, 1800, ("-q", "-p", "no:cacheprovider", "-p", "_mutation_trace",
                                                               "-m", "not peers", "test_wsmanager.py"),
                                                env={"MUTATION_TRACE_OUT": str(out)})
        finally:
            del _SUPPORT["_mutation_trace.py"]
        if status != "survived":
            raise SystemExit(f"the unit tests fail on the unmutated module ({status}): {detail}")
        seen = json.loads(out.read_text(encoding="utf-8"))
    owner = _function_lines(source, targets)
    tests: Dict[str, List[str]] = {}
    for test, (_, lines) in sorted(seen.items(), key=lambda item: item[1][0]):
        for name in {owner[line] for line in lines if line in owner}:
            tests.setdefault(name, []).append(test)
    return seconds, tests


def run_mutant(mutant: Mutant, source: str, timeout: float, tests: Optional[Sequence[str]] = None) -> Outcome:
    """Run the unit tests against ``mutant``: all of them, or only ``tests`` (those that run its function)."""
    mutated = mutant.apply(source)
    compile(mutated, str(MODULE), "exec")  # a generator bug shows here, not as a "killed" mutant
    if tests is not None and not tests:
        return Outcome(mutant, "survived", 0.0, "no unit test runs this function")
    arguments = PYTEST_ARGS if tests is None else (*PYTEST_ARGS[:-1], *tests)
    status, seconds, detail = run_tests(mutated, timeout, arguments)
    return Outcome(mutant, status, seconds, detail)


def _line_of(source: str, mutant: Mutant) -> Tuple[str, str]:
    """The mutated line before and after the change."""
    before = source.splitlines()[mutant.line - 1].strip()
    mutated = mutant.apply(source)
    after = mutated.splitlines()[mutant.line - 1].strip()
    return before, after


def report(outcomes: Sequence[Outcome], source: str, out: TextIO = sys.stdout) -> float:
    """Print the table per function and the survivors; return the percentage of non-equivalent mutants detected."""
    rows: Dict[str, Dict[str, int]] = {}
    for outcome in outcomes:
        row = rows.setdefault(outcome.mutant.function, dict(mutants=0, killed=0, survived=0, timeout=0,
                                                            equivalent=0, error=0))
        row["mutants"] += 1
        if outcome.status == "survived" and outcome.mutant.id in EQUIVALENT:
            row["equivalent"] += 1
        else:
            row[outcome.status] += 1
    columns = ("mutants", "killed", "survived", "timeout", "equivalent", "error")
    width = max([len("function"), *map(len, rows)])
    print(f"{'function':<{width}}  " + "  ".join(f"{c:>10}" for c in columns), file=out)
    totals = dict.fromkeys(columns, 0)
    for name in sorted(rows, key=lambda n: min(o.mutant.start for o in outcomes if o.mutant.function == n)):
        print(f"{name:<{width}}  " + "  ".join(f"{rows[name][c]:>10}" for c in columns), file=out)
        for column in columns:
            totals[column] += rows[name][column]
    print(f"{'total':<{width}}  " + "  ".join(f"{totals[c]:>10}" for c in columns), file=out)
    relevant = totals["mutants"] - totals["equivalent"] - totals["error"]  # an error says nothing either way
    detected = totals["killed"] + totals["timeout"]
    score = 100.0 * detected / relevant if relevant else 100.0
    print(f"\ndetected {detected} of {relevant} non-equivalent mutants: {score:.1f}%", file=out)
    survivors = [o for o in outcomes if o.status == "survived"]
    if survivors:
        print("\nsurvivors:", file=out)
    for outcome in sorted(survivors, key=lambda o: o.mutant.start):
        before, after = _line_of(source, outcome.mutant)
        why = EQUIVALENT.get(outcome.mutant.id)
        print(f"  {outcome.mutant.id}  (line {outcome.mutant.line})", file=out)
        print(f"      - {before}\n      + {after}", file=out)
        print(f"      {'equivalent: ' + why if why else 'NOT DETECTED'}", file=out)
    for outcome in outcomes:
        if outcome.status == "error":
            print(f"\nerror (pytest could not run as asked): {outcome.mutant.id}: {outcome.detail}", file=out)
    stale = [o.mutant.id for o in outcomes if o.status != "survived" and o.mutant.id in EQUIVALENT]
    for mutant_id in stale:
        print(f"\nlisted as equivalent but detected (remove it from EQUIVALENT): {mutant_id}", file=out)
    return score


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=200, help="mutants to run, drawn at random (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per mutant (default: 4 times the unmutated run, at least 30)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated functions and classes")
    parser.add_argument("--mutant", action="append", default=[], help="run this mutant id (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--threshold", type=float, default=95.0, help="percent to detect for exit status 0")
    parser.add_argument("--from-log", metavar="FILE",
                        help="tabulate the outcomes printed by an earlier run (after EQUIVALENT has been edited)")
    parser.add_argument("--all-tests", action="store_true",
                        help="run every unit test against each mutant, not only those that run its function")
    args = parser.parse_args(argv)

    source = MODULE.read_text(encoding="utf-8")
    mutants = generate(source, [name.strip() for name in args.targets.split(",") if name.strip()])
    if args.mutant:
        by_id = {m.id: m for m in mutants}
        unknown = [mutant_id for mutant_id in args.mutant if mutant_id not in by_id]
        if unknown:
            raise SystemExit(f"unknown mutant ids: {unknown}")
        chosen = [by_id[mutant_id] for mutant_id in args.mutant]
    elif args.sample and args.sample < len(mutants):
        chosen = sorted(random.Random(args.seed).sample(mutants, args.sample), key=lambda m: m.start)
    else:
        chosen = mutants
    if args.from_log:
        by_id = {m.id: m for m in mutants}
        logged = []
        for line in Path(args.from_log).read_text(encoding="utf-8").splitlines():
            match = re.match(r"\[\d+/\d+\] (\w+) +([\d.]+)s (.+?)(?:  <- (.*))?$", line)
            if match and match.group(3) in by_id:
                logged.append(Outcome(by_id[match.group(3)], match.group(1), float(match.group(2)), match.group(4) or ""))
        score = report(logged, source)
        return 0 if score >= args.threshold else 1
    if args.list:
        for mutant in chosen:
            before, after = _line_of(source, mutant)
            print(f"{mutant.id}\n    - {before}\n    + {after}")
        print(f"{len(chosen)} of {len(mutants)} mutants")
        return 0

    targets = sorted({mutant.function.split(".")[0] for mutant in chosen})
    if args.all_tests:
        status, baseline, detail = run_tests(source, timeout=1800)
        if status != "survived":
            print(f"the unit tests fail on the unmutated module ({status}): {detail}", file=sys.stderr)
            return 2
        selection: Dict[str, Optional[List[str]]] = {}
    else:
        baseline, tests = map_tests(source, targets)
        selection = {mutant.function: tests.get(mutant.function, []) for mutant in chosen}
        # Test ids passed back to pytest must select what they name: checked once on the unmutated module.
        every = sorted({test for names in selection.values() for test in names or ()})
        status, _, detail = run_tests(source, 1800, (*PYTEST_ARGS[:-1], *every))
        if status != "survived":
            print(f"the selected unit tests fail on the unmutated module ({status}): {detail}", file=sys.stderr)
            return 2
    timeout = args.timeout or max(30.0, 4 * baseline)
    print(f"{len(chosen)} of {len(mutants)} mutants (seed {args.seed}); unmutated run {baseline:.1f} s, "
          f"timeout {timeout:.0f} s per mutant; "
          + ("every unit test for each" if args.all_tests else "the unit tests that run its function, for each"),
          flush=True)
    outcomes: List[Outcome] = []
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_mutant, mutant, source, timeout, selection.get(mutant.function))
                   for mutant in chosen]
        for count, future in enumerate(concurrent.futures.as_completed(futures), 1):
            outcome = future.result()
            outcomes.append(outcome)
            print(f"[{count}/{len(chosen)}] {outcome.status:<8} {outcome.seconds:5.1f}s {outcome.mutant.id}"
                  + (f"  <- {outcome.detail}" if outcome.detail else ""), flush=True)
    print(f"\n{len(outcomes)} mutants in {time.monotonic() - started:.0f} s\n")
    score = report(outcomes, source)
    return 0 if score >= args.threshold else 1


if __name__ == "__main__":
    sys.exit(main())
