"""Runs a user's Python script inside the sandbox (never imported by the worker).

argv[1] is the event file ``{script, variables, outputLimit, memoryMb}``. The script gets its
variables as globals, ``setResult(value)`` and ``console.log/warn/error``; ``print`` and stderr
writes are console lines too. The last stdout line is ``MARKER {result, console, error}``.
"""

import builtins
import io
import json
import linecache
import os
import sys
import traceback

MARKER = "\x1eflux-script-response "
SCRIPT_NAME = "<script>"


class OutputLimitExceeded(BaseException):
    """A BaseException so that a script's ``except Exception`` does not swallow it."""


class Console:
    def __init__(self, limit):
        self.lines = []
        self.size = 0
        self.limit = limit
        self.overflowed = False

    def _add(self, prefix, args):
        line = prefix + " ".join(str(a) for a in args)
        self.size += len(line.encode("utf-8", "replace")) + 1
        if self.overflowed or self.size > self.limit:
            self.overflowed = True
            raise OutputLimitExceeded()
        self.lines.append(line)

    def log(self, *args):
        self._add("", args)

    info = debug = log

    def warn(self, *args):
        self._add("[WARN] ", args)

    warning = warn

    def error(self, *args):
        self._add("[ERROR] ", args)


class LineStream(io.TextIOBase):
    """``print``/``sys.stderr`` → console lines (a partial line waits for its newline)."""

    def __init__(self, emit):
        self.emit = emit
        self.pending = ""

    def writable(self):
        return True

    def write(self, text):
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.emit(line)
        return len(text)

    def flush_pending(self):
        if self.pending:
            line, self.pending = self.pending, ""
            self.emit(line)


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        event = json.load(f)
    script = event["script"]
    limit = event["outputLimit"]
    main_pid = os.getpid()
    real_stdout = sys.stdout
    console = Console(limit)
    state = {"result": None}

    def set_result(value):
        state["result"] = value

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    for var in event.get("variables") or []:
        name = var.get("name")
        if isinstance(name, str) and name.isidentifier():
            namespace[name] = var.get("value")
    namespace.update(setResult=set_result, console=console)

    out = LineStream(console.log)
    err = LineStream(console.error)
    sys.stdout, sys.stderr = out, err
    error = None
    try:
        linecache.cache[SCRIPT_NAME] = (len(script), None, script.splitlines(True), SCRIPT_NAME)
        code = compile(script, SCRIPT_NAME, "exec")
        exec(code, namespace)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            error = f"The script exited with status {exc.code}"
    except OutputLimitExceeded:
        pass
    except MemoryError:
        error = f"MemoryError: the script used more than its {event['memoryMb']} MB of memory"
    except BaseException as exc:  # the user's failure, reported as the response's error
        tb = exc.__traceback__.tb_next if exc.__traceback__ else None  # hide this wrapper's frame
        error = "".join(traceback.format_exception(type(exc), exc, tb)).strip()
    finally:
        if os.getpid() != main_pid:  # a process the script forked must not answer too
            os._exit(0)
    try:
        out.flush_pending()
        err.flush_pending()
    except OutputLimitExceeded:
        pass
    sys.stdout, sys.stderr = real_stdout, sys.__stderr__
    if console.overflowed:
        error = f"The script's console output exceeded the {limit}-byte limit"
    try:
        result = json.dumps(state["result"], default=str)
    except ValueError as exc:  # a circular structure
        result, error = "null", f"The result could not be converted to JSON: {exc}"
    if len(result.encode("utf-8")) > limit:
        result, error = "null", f"The script's result exceeded the {limit}-byte limit"
    line = f'{{"result": {result}, "console": {json.dumps(console.lines)}, "error": {json.dumps(error)}}}'
    real_stdout.write("\n" + MARKER + line + "\n")
    real_stdout.flush()


if __name__ == "__main__":
    main()
