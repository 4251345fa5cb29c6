"""torchrun with the workers' exit status passed through.

``python -m traintel.cli.torchrun ARGS`` (or ``traintel-torchrun ARGS``) takes exactly torchrun's
arguments and runs torch's own launcher, ``torch.distributed.run.main``. torchrun exits 1 whenever a
worker failed, or it was itself signalled, whatever the worker's own status; a scheduler reading the
status (a Kubernetes ``podFailurePolicy``) then cannot tell bad input, which retrying cannot fix,
from a failed or a stopped run. This launcher exits instead with:

- 0: every worker finished;
- 1: a worker failed in any other way (exit 1 or another status, killed by SIGKILL or another signal);
- else 2: a worker exited 2 (traintel's bad input);
- else 130 / 143: the workers were stopped by SIGINT / SIGTERM (exit 130 / 143, or killed by it);
- 128 + N: the launcher itself got signal N (SIGTERM: 143). torch's agent sends that signal to the
  workers and waits for them (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, 30 s) before it kills the rest:
  traintel finishes the step, checkpoints it, ends the run as ``terminated`` and exits 143.

When one worker fails, torch's agent stops the others with SIGTERM: their 143s (or deaths by SIGTERM)
follow the failure, so they count only when every failed worker ended that way. torchrun's failure
summary stays on stderr; its usage errors exit 2 and its other errors (rendezvous) exit 1, as in
torchrun.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterable, Sequence

TERMINATED = 128 + signal.SIGTERM
INTERRUPTED = 128 + signal.SIGINT
BAD_INPUT = 2
MEANING = {1: "a worker failed", BAD_INPUT: "bad input", INTERRUPTED: "interrupted", TERMINATED: "terminated"}


def exit_status(exitcodes: Iterable[int]) -> int:
    """The launcher's status for its failed workers' exit codes (negative: killed by that signal)."""
    codes = [128 - code if code < 0 else code for code in exitcodes]
    causes = [code for code in codes if code != TERMINATED] or codes
    if any(code not in (BAD_INPUT, INTERRUPTED, TERMINATED) for code in causes):
        return 1
    if BAD_INPUT in causes:
        return BAD_INPUT
    return INTERRUPTED if INTERRUPTED in causes else TERMINATED


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        run.main(list(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)  # torchrun's summary of the failures
        status = exit_status(failure.exitcode for failure in exc.failures.values())
    except SignalException as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        status = 128 + int(exc.sigval)
    else:
        return 0
    print(f"traintel.cli.torchrun: exit {status} ({MEANING.get(status, 'signalled')})", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
