"""The main process decides, every rank gets the answer or the error.

Anything that reads the filesystem or the environment to make a choice (which checkpoint to resume,
the rollback target, whether a FID is the best, the tracker's mode, unreadable files, the weights
path) is decided on the main process alone: ranks on other nodes may see a different filesystem
state a moment later, and ranks that decide differently deadlock in the next collective. The
answer, or the error, is broadcast, so every rank goes on together or stops together with the
same message, instead of the others waiting in a collective until its timeout.

Before the process group exists (or without one), the launcher's environment says which process
this is: `launch_rank` is the one place that reads it. Importing this module costs no torch (the
config module uses it for `--print-config`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from trainer.util.errors import RunError, UserError

if TYPE_CHECKING:
    import torch.distributed as dist
    from accelerate import Accelerator

T = TypeVar("T")


def launch_rank(*, local: bool = False, environ: Mapping[str, str] = os.environ) -> int:
    """This process's global rank (`local`: its rank on its node) as the launcher set it, 0 without a launcher.

    For what happens before the process group exists or without one: which process prints an error,
    the worker of `one_process_first`, a device index. Inside the group, ask the Accelerator.
    """
    return int(environ.get("LOCAL_RANK" if local else "RANK", "0"))


class MainProcessFailed(RunError):
    """An unexpected error on the main process, as the other ranks see it."""


def _share(
    accelerator: Accelerator, outcome: tuple[object, BaseException | None]
) -> tuple[object, BaseException | None]:
    box = [outcome]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

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


def every_rank(accelerator: Accelerator, work: Callable[[], T]) -> T:
    """`work()` on every rank (its own files, its own copy of a model); if it fails on any rank, every
    rank raises, the first failing rank's error. A rank that failed alone would leave the others
    waiting in the next collective; this way they stop together, with that rank's message.

    User and run errors travel as they are; anything else is raised as it is on its own rank and as
    a RunError naming the rank and the error on the others.
    """
    result: Any = None
    error: BaseException | None = None
    unexpected: BaseException | None = None
    try:
        result = work()
    except (UserError, RunError) as exc:
        error = exc
    except Exception as exc:  # noqa: BLE001  (shared as text: arbitrary exceptions may not pickle)
        unexpected = exc
        first = (str(exc).splitlines() or [""])[0][:300]
        error = RunError(f"process {accelerator.process_index} failed: {type(exc).__name__}: {first}")
    errors = [error]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        errors = gather_object(errors)  # every rank gets every rank's outcome
    if unexpected is not None:
        raise unexpected
    shared = next((e for e in errors if e is not None), None)
    if shared is not None:
        raise shared
    return result


# ---- before the process group exists -------------------------------------------------------------
WAIT_NOTE_EVERY_S = 60


def _launch_store() -> dist.Store:
    """The launcher's key-value store (torchrun's TCPStore, on MASTER_ADDR:MASTER_PORT).

    Mirrors torch.distributed's own choice: with torchrun's agent store every process is a client;
    otherwise rank 0 hosts it (multi-tenant, so the process group can share it later).
    """
    import torch.distributed as dist

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    world = int(os.environ["WORLD_SIZE"])
    hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and launch_rank() == 0
    return dist.TCPStore(host, port, world, is_master=hosts, timeout=timedelta(minutes=5), multi_tenant=True)


def one_process_first(work: Callable[[], Any], *, name: str, per_node: bool = False) -> Any:
    """`work()` on one process before the process group exists; every process returns its JSON-able result.

    The worker is global rank 0, or with `per_node` each node's local rank 0 (for caches on node-local
    disks). The others wait on the launcher's store: no collective is open, so no collective timeout
    (NCCL's is 10 minutes) ends a preparation that takes longer. An error in `work` reaches every
    waiting process within a second, with its message; a worker that dies outright ends the job
    through the launcher, which stops all its processes.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return work()
    node = os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")) if per_node else "job"
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = f"dcgan-trainer/{name}/{run}/{attempt}/{node}"
    worker = launch_rank(local=per_node) == 0
    store = _launch_store()
    if worker:
        try:
            result = work()
        except (UserError, RunError) as exc:
            store.set(key, json.dumps({"error": str(exc), "exit_code": exc.exit_code}))
            # Printed here even off the main process (a node's own preparation with data.cache_per_node):
            # the main process may have succeeded and would never say why the job ends.
            exc.report_here = True
            raise
        except BaseException as exc:
            store.set(key, json.dumps({"error": f"{type(exc).__name__}: {exc}", "exit_code": 1}))
            raise
        store.set(key, json.dumps({"result": result}))
        return result
    started = last_note = time.monotonic()
    while not store.check([key]):
        time.sleep(0.5)
        if time.monotonic() - last_note > WAIT_NOTE_EVERY_S:
            last_note = time.monotonic()
            if launch_rank(local=True) == 0:  # one line per node
                print(f"waiting for {name} on another process ({time.monotonic() - started:.0f}s)", file=sys.stderr)
    answer = json.loads(store.get(key))
    if "error" in answer:
        error = UserError(answer["error"]) if answer["exit_code"] == 2 else RunError(answer["error"])
        error.exit_code = answer["exit_code"]
        raise error
    return answer["result"]
