"""The main process decides, every rank gets the answer or the error.

Anything that reads the filesystem or the environment to make a choice (which checkpoint to resume,
the rollback target, whether a FID is the best, the tracker's mode, unreadable files, the weights
path) is decided on the main process alone: ranks on other nodes may see a different filesystem
state a moment later, and ranks that decide differently deadlock in the next collective. The
answer, or the error, is broadcast, so every rank goes on together or stops together with the
same message, instead of the others waiting in a collective until its timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from trainer.util.errors import RunError, UserError

T = TypeVar("T")


class MainProcessFailed(RunError):
    """An unexpected error on the main process, as the other ranks see it."""


def _share(
    accelerator: Accelerator, outcome: tuple[object, BaseException | None]
) -> tuple[object, BaseException | None]:
    box = [outcome]
    if accelerator.num_processes > 1:
        broadcast_object_list(box)
    return box[0]


def main_decides(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """`decide()` on the main process; every rank returns its result or raises its error.

    User and run errors reach every rank as they are. Anything else is raised as it is on the
    main process and as MainProcessFailed (with its message) on the others.
    """
    outcome: tuple[object, BaseException | None] = (None, None)
    unexpected: BaseException | None = None
    if accelerator.is_main_process:
        try:
            outcome = (decide(), None)
        except (UserError, RunError) as exc:
            outcome = (None, exc)
        except Exception as exc:  # noqa: BLE001  (shared as text: arbitrary exceptions may not pickle)
            unexpected = exc
            first = (str(exc).splitlines() or [""])[0][:300]
            outcome = (None, MainProcessFailed(f"the main process failed: {type(exc).__name__}: {first}"))
    value, error = _share(accelerator, outcome)
    if unexpected is not None:
        raise unexpected
    if error is not None:
        raise error
    return value  # type: ignore[return-value]


def main_first(accelerator: Accelerator, work: Callable[[], T]) -> T:
    """`work()` on the main process first, then on the others (which then find its results cached,
    e.g. a download); an error on the main process stops every rank with that error."""
    results: list[T] = []
    main_decides(accelerator, lambda: results.append(work()))  # raises everywhere if the main process failed
    return results[0] if accelerator.is_main_process else work()
