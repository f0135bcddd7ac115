"""The two fuzz properties of tests/test_fuzz.py, run long: thousands of malformed photos through the reader and
the protect path.

What a clean run proves, for every generated file (see tests/test_fuzz.py): ``load_image`` returns 8-bit RGB or
raises ``ImageReadError`` with one line naming the file, within its pixel limit and memory budget, and prints no
raw Pillow warning; ``protect_paths`` gives each photo one record with a known status, never raises for a bad photo
and never modifies an input. Usage (from the repository root, with ``FACESHIELD_MIRROR=../shared/models``):

    python benchmarks/fuzz_images.py                                   # 20,000 reader inputs, 500 protect folders
    python benchmarks/fuzz_images.py --examples 1000 --protect-examples 50

Unlike the test suite, a run does not stop at the first failure (nor shrink it): every input is tried and each
distinct failure (exception type and the line that raised it) is printed once, with the input that caused it.
Prints one line per property: inputs tried, failures, wall time. The inputs are deterministic (hypothesis'
``derandomize``): the same command tries the same inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.strategies import SearchStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test_fuzz imports conftest (shared data)
import test_fuzz  # noqa: E402


@dataclass
class Sweep:
    """What one property did over a run."""

    tried: int = 0
    failures: int = 0
    kinds: dict[str, tuple[object, BaseException]] = field(default_factory=dict)  # first input of each failure


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """libtiff and libjpeg write their complaints about broken files straight to file descriptor 2 (thousands of
    lines over a long run); silence them so that the results stay readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def sweep(check: Callable[..., None], argument: str, inputs: SearchStrategy, examples: int) -> Sweep:
    """Runs ``check`` (a property's body) on ``examples`` generated inputs, recording failures instead of stopping."""
    result = Sweep()

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(inputs)
    def run(value: object) -> None:
        result.tried += 1
        try:
            check(**{argument: value})
        except Exception as exc:  # noqa: BLE001 - a failing input: counted, and the next one is tried
            result.failures += 1
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            result.kinds.setdefault(f"{type(exc).__name__} at {frame.filename}:{frame.lineno}", (value, exc))

    with quiet_stderr():
        run()
    return result


def report(name: str, result: Sweep, seconds: float) -> None:
    print(f"{name}: {result.tried} inputs tried, {result.failures} failures, {seconds:.1f} s", flush=True)
    for kind, (value, exc) in result.kinds.items():
        message = " ".join(str(exc).split())[:300]
        print(f"  {kind}\n    {type(exc).__name__}: {message}\n    input: {value!r}"[:2000], flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000, help="files for load_image (default 20000)")
    parser.add_argument("--protect-examples", type=int, default=500,
                        help="folders of 1-3 files for protect_paths (default 500)")
    args = parser.parse_args()
    properties = [
        ("reader", test_fuzz.test_load_image_returns_rgb_or_one_line_error, "sample", test_fuzz.READER_INPUTS,
         args.examples),
        ("protect", test_fuzz.test_protect_paths_gives_one_honest_record_per_photo, "samples",
         test_fuzz.PROTECT_INPUTS, args.protect_examples),
    ]
    failures = 0
    for name, test, argument, inputs, examples in properties:
        if examples <= 0:
            continue
        start = time.perf_counter()
        # the body of the test without its @given: hypothesis keeps it as ``inner_test``
        result = sweep(test.hypothesis.inner_test, argument, inputs, examples)
        report(name, result, time.perf_counter() - start)
        failures += result.failures
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
