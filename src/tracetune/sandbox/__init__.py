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

Layers, from the kernel up (``Sandbox.isolation`` reports which ones took on this machine;
``tracetune.sandbox.layers(report)`` lists them with details, ``tracetune tools sandbox``
prints them, and the active ones are logged when the first sandbox starts):

1. **Process**: a separate process in its own session; killed (with its process group) when
   it does not stop in time. Environment stripped to a few variables: no API keys.
2. **Network namespace**: a fresh one, without even loopback up. A root host uses
   ``unshare(CLONE_NEWNET)``; a non-root host a user namespace
   (``CLONE_NEWUSER|CLONE_NEWNET``, what ``unshare -rn`` does). If neither is allowed, a
   warning is logged and network access is refused by Landlock (TCP, ABI >= 4) and the audit
   hook only. Unix sockets have their own namespace per network namespace (abstract ones)
   or are refused by seccomp (pathname ones, see 6).
3. **Own uid** (root host only): the worker drops to a uid of its own (random in
   1.9e9-2.0e9, or ``SandboxLimits.uid``), which loses all capabilities and makes
   ``RLIMIT_NPROC`` (``max_processes``) count this sandbox and its forks alone; root itself is
   exempt from that limit. A Python installed under a 0700 directory (pyenv in /root) stays
   reachable through a private mount namespace: a tmpfs over the closed directory and bind
   mounts of exactly the paths needed. The working directory is chowned to that uid. If
   that mount namespace is refused too (Docker's default seccomp profile), the worker keeps
   uid 0 but drops every capability; a note in ``isolation`` says so. A non-root host keeps
   its uid; ``RLIMIT_NPROC`` is then set inside its user namespace, where (Linux >= 5.14) it
   counts the sandbox's processes only.
4. **rlimits**: address space per process (``memory_mb``), CPU seconds per step (``cpu_s``:
   the code is interrupted on SIGXCPU), file size, open files, no core dumps.
5. **Landlock** (Linux >= 5.13, unprivileged): reads only from the Python installation,
   system libraries and the working directory; writes only to the working directory;
   executing any program is denied; TCP bind/connect denied (ABI >= 4); no signals to, or
   abstract sockets of, processes outside the sandbox (ABI >= 6); ptrace of outside
   processes denied. Without Landlock a warning is logged and files are confined by the
   audit hook alone.
6. **seccomp** (x86_64 and aarch64; a BPF filter built in the worker, no library): denies
   ``unshare``, ``setns``, ``clone`` with any ``CLONE_NEW*`` flag, ``mount`` and the new mount
   API, ``chroot``, ``pivot_root``, ``io_uring_*``, ``keyctl``/``add_key``/``request_key``,
   ``bpf``, ``ptrace``, ``process_vm_*``, ``personality``, ``perf_event_open``,
   ``userfaultfd``, modules and kexec, file handles, and creating ``AF_UNIX`` sockets (a
   filter cannot read ``connect``'s address, so no Unix socket of the host user, ssh-agent
   or docker, is reachable); calls of another ABI (i386, x32) are refused. ``clone3``
   answers ENOSYS (its flags are out of a filter's reach) and libc falls back to ``clone``.
7. **cgroup** (v2, or v1 hierarchies; root or a delegated ``$TRACETUNE_CGROUP``): a group per
   sandbox (and per fork) with ``pids.max = max_processes``, ``memory_mb`` for the whole
   process tree, RAM and swap together (``memory.swap.max``/``memsw`` and, on v1,
   ``memory.swappiness = 0``; a watchdog thread where the kernel does not count swap per
   group), an optional ``cpus`` quota; on close every process in it is
   killed, a double-forked ``setsid`` daemon included. Without a cgroup, the worker's own
   network namespace is swept instead: every process in it is killed.
8. **Size-capped working directory** (root hosts): a tmpfs with ``size=workdir_mb`` is
   mounted over the working directory while the sandbox runs; its files are copied in at
   start and back at close, so a disk filler stops at the cap (ENOSPC, a SANDBOX error).
9. **Audit hook** (``sys.addaudithook``): refuses opening files outside the working
   directory (reading the Python installation is allowed), sockets other than Unix ones,
   ``os.system``/``subprocess``/``fork``/``exec``, ``ctypes`` calls, changing rlimits,
   tracing hooks and inspecting the worker through ``gc``; each refusal raises
   ``PermissionError`` with a message the model can act on. This layer gives clear errors;
   it is a convenience, not a boundary: the functions the code is given (tools,
   ``final_answer``, the signal handler) reach only a small ``Port`` and never the hook's
   policy, but code that walks the interpreter's frames can switch the hook off. Every
   boundary is held by layers 1-8.

``SandboxLimits.min_level`` (or ``$TRACETUNE_SANDBOX_MIN_LEVEL``) refuses to start below a
level of ``LEVELS``: ``basic`` (anywhere), ``standard`` (network namespace and Landlock) or
``strict`` (also seccomp, a cgroup and a process cap).

The host side never follows a path, pid or size the code controls:

* every host read or write in the working directory goes through a directory fd with
  ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` (or an ``O_NOFOLLOW`` walk) and an
  ``fstat`` of the opened file (tool inputs via ``ToolContext.open_file``/``read_bytes``/
  ``image``, tool outputs via ``ToolContext.write_file``, which creates new files only,
  snapshots of exploration branches); files the code produces for M-TRACE are read after
  its sandbox stopped, by fd, regular files only;
* a fork's pid comes from the kernel (``SO_PASSCRED`` credentials on its first message) and
  is checked to be a child of the worker under its uid before a pidfd pins it; a reported
  pid is never signalled;
* a tool call's arguments are capped (``tool_args_bytes``) before any tool runs, long ones
  are recorded as previews, and a host tool's thread is interrupted when the step's time
  runs out; malformed or forged frames end the step with a SANDBOX error.

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
