"""Benchmarks (see README "Benchmarks"); each script is run with ``python -m benchmarks.<name>``."""

import argparse
import math


def positive(kind):
    """An argparse type: a finite ``kind`` (int or float) > 0, else a usage error naming it."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number > 0")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def busy_machine_note(threads):
    """A warning line when other processes load the cores these threads will use (busy-waiting
    OpenMP threads then make every figure several times slower), else None."""
    import os

    load = os.getloadavg()[0]
    if load + threads <= (os.cpu_count() or 1) or os.environ.get("OMP_WAIT_POLICY",
                                                                    "").upper() == "PASSIVE":
        return None
    return (f"note: load average {load:.1f} before starting ({threads} threads on "
            f"{os.cpu_count()} cores): other processes compete for the cores, and OpenMP threads "
            "busy-wait for descheduled siblings: figures may be several times too slow. Run on "
            "an idle machine, or set OMP_WAIT_POLICY=PASSIVE (or use fewer threads).")
