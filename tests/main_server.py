"""Runs ``python main.py ARGS`` many times without paying for its imports each time: this
script imports main once, then forks a child per request that goes on exactly as
``python main.py ARGS`` would, up to the interpreter's own exit (which terminates and joins
whatever child processes are left, such as data loader workers).

One JSON request per line on stdin: {"argv": [...], "log": path, "fault": null or "oom"}.
Answers on stdout, one JSON line each: {"pid": pid} when the run has started (the pid is
also its process group, as for a shell job), then {"code": exit code, or -signal}.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import main  # noqa: E402


def raise_out_of_memory_in_the_second_step():
    """A failure nobody planned for, in the middle of a step (any exception would do)."""
    build_model = main.build_model

    def build(args):
        model = build_model(args)
        forward, calls = model.forward, []

        def failing_forward(x):
            calls.append(1)
            if len(calls) == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return forward(x)

        model.forward = failing_forward
        return model

    main.build_model = build


def serve():
    """Answer requests until stdin closes; in each forked child, return its request."""
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return request
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
    sys.exit(0)


request = serve()
os.setsid()  # a process group of its own, as a shell job: Ctrl-C reaches it and its workers
log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
os.dup2(log, sys.stdout.fileno())
os.dup2(log, sys.stderr.fileno())
if request.get("fault") == "oom":
    raise_out_of_memory_in_the_second_step()
sys.argv = ["main.py", *request["argv"]]
sys.exit(main.cli())
