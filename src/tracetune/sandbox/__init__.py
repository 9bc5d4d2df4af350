"""Isolated execution of model-written code.

A code-acting agent's Python never runs in the tracetune process. Each episode gets a
worker process (``python -I``, standard library only) that keeps the episode's variables
between steps. Tools are plain functions inside the code; calling one sends its name and
arguments to the host, which runs the real tool and sends back plain JSON data (or a file
name, for an image). ``final_answer(x)`` records the answer and ends the step. The state can
be forked (``os.fork`` in the worker, copy-on-write) so that several candidate next steps
each run from their own copy of one prefix.

Only JSON crosses from the worker to the host, in frames of at most 16 MB; printed output is
capped inside the worker, so printing 100 MB costs the host nothing.

Layers, from the kernel up (``Sandbox.isolation`` reports which ones took on this machine):

1. **Process**: a separate process in its own session; killed (with its process group) when
   it does not stop in time. Environment stripped to a few variables: no API keys.
2. **Network namespace**: a fresh one, without even loopback up. A root host uses
   ``unshare(CLONE_NEWNET)``; a non-root host a user namespace
   (``CLONE_NEWUSER|CLONE_NEWNET``, what ``unshare -rn`` does). If neither is allowed, a
   warning is logged and network access is refused by Landlock (TCP, ABI >= 4) and the audit
   hook only.
3. **Own uid** (root host only): the worker drops to a uid of its own (random in
   1.9e9-2.0e9, or ``SandboxLimits.uid``), which loses all capabilities and makes
   ``RLIMIT_NPROC`` (``max_processes``) count this sandbox and its forks alone; root itself is
   exempt from that limit. A Python installed under a 0700 directory (pyenv in /root) stays
   reachable through a private mount namespace: a tmpfs over the closed directory and bind
   mounts of exactly the paths needed. The working directory is chowned to that uid. If
   that mount namespace is refused too (Docker's default seccomp profile), the worker keeps
   uid 0 but drops every capability, and has no process cap; a note in ``isolation`` says
   so. A non-root host keeps its uid and gets no process cap: process creation is then
   refused by the audit hook, and executing programs by Landlock.
4. **rlimits**: address space (``memory_mb``), CPU seconds per step (``cpu_s``: the code is
   interrupted on SIGXCPU), file size, open files, no core dumps.
5. **Landlock** (Linux >= 5.13, unprivileged): reads only from the Python installation,
   system libraries and the working directory; writes only to the working directory;
   executing any program is denied; TCP bind/connect denied (ABI >= 4); no signals to, or
   abstract sockets of, processes outside the sandbox (ABI >= 6); ptrace of outside
   processes denied. Without Landlock a warning is logged and files are confined by the
   audit hook alone.
6. **Audit hook** (``sys.addaudithook``): refuses opening files outside the working
   directory (reading the Python installation is allowed), sockets other than Unix ones,
   ``os.system``/``subprocess``/``fork``/``exec``, ``ctypes`` calls, changing rlimits and
   inspecting the worker through ``gc``; each refusal raises ``PermissionError`` with a
   message the model can act on. This layer gives clear errors; it is not a security
   boundary on its own (code that reaches the worker's frames can switch it off), which is
   what the kernel layers are for.

Limits become typed step errors (``tracetune.schema.ErrorKind``): TIMEOUT (wall clock, then
CPU), MEMORY, SANDBOX (a refused operation), OUTPUT_LIMIT, TOOL (an uncaught tool error),
CODE (any other exception, with a traceback of the model's own lines). On a time limit the
code is first interrupted (its variables survive); if it does not stop within
``grace_s``, or if the worker dies, a fresh worker replaces it, the error says that earlier
variables were lost and ``ExecResult.state_lost`` is set. The episode goes on either way;
whether to end it is the agent's choice.

The worker dies with the host (``PR_SET_PDEATHSIG``). Forks share the working directory
(files are not copied); ``.sandbox/`` in it is the code's HOME and TMPDIR. On macOS only the
process, the rlimits the kernel honours and the audit hook apply.
"""

from tracetune.sandbox._sandbox import (
    LEVELS,
    ExecResult,
    Sandbox,
    SandboxError,
    SandboxLimits,
    ToolHandler,
    ToolReply,
    ToolStub,
    isolation_level,
    layers,
    probe,
)

__all__ = [
    "LEVELS",
    "ExecResult",
    "Sandbox",
    "SandboxError",
    "SandboxLimits",
    "ToolHandler",
    "ToolReply",
    "ToolStub",
    "isolation_level",
    "layers",
    "probe",
]
