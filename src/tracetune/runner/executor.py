"""Which executor runs a stage's items: in this process (asyncio), or on a Ray cluster.

A stage is written once, as a process function handed to :func:`~tracetune.runner.run_stage`;
the executor decides where that function runs. The default is the in-process asyncio
executor. ``executor: ray`` (YAML) or ``--executor ray`` (command line) runs the same
function in Ray actors, on a local Ray instance or a cluster (``--ray-address``)::

    executor:
      kind: ray
      address: auto          # or ray://HOST:10001, or HOST:6379; unset: a local instance
      workers: 8             # actors (default: the cluster's CPUs / num_cpus)
      num_cpus: 1            # per actor (OCR, face detection: where the cores are)
      num_gpus: 0            # per actor (a local: model loads on the actor's GPU)

``executor: ray`` alone is short for ``executor: {kind: ray}``. From Python, wrap the calls
in ``with use_executor(ExecutorConfig(kind="ray")):``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tracetune.errors import ConfigError


class ExecutorConfig(BaseModel):
    """Where a stage's items are processed (YAML key ``executor``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "ray"] = Field(
        default="local",
        description="local: in this process (asyncio); ray: Ray actors on a cluster.",
    )
    address: str | None = Field(
        default=None,
        description="Ray cluster to join: 'auto' (the cluster this machine belongs to), "
        "HOST:PORT (its GCS) or ray://HOST:PORT (Ray Client). Unset: start a local instance.",
    )
    workers: int | None = Field(
        default=None, ge=1, description="Actors to run (default: cluster CPUs / num_cpus)."
    )
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs each actor reserves.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs each actor reserves.")
    concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Items in flight per actor (default: the stage's concurrency).",
    )
    batch_size: int | None = Field(
        default=None, ge=1, description="Items sent to an actor per call (default: automatic)."
    )
    flush_interval_s: float | None = Field(
        default=None,
        gt=0,
        description="How often an actor puts its finished items on disk and marks them done "
        "(seconds; default: the stage's, 10 s): what a killed node loses at most of "
        "each actor's work.",
    )
    connect_timeout_s: float = Field(
        default=20.0, gt=0, description="How long to wait for the cluster to answer."
    )
    start_timeout_s: float = Field(
        default=300.0, gt=0, description="How long actors may take to start (load tools, models)."
    )

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"kind": value}
        return value


_active = ExecutorConfig()
_flags: dict[str, Any] = {}
_yaml: Any = None


def active_executor() -> ExecutorConfig:
    """The executor that :func:`~tracetune.runner.run_stage` uses now."""
    return _active


def set_executor(config: ExecutorConfig) -> None:
    global _active
    _active = config


@contextmanager
def use_executor(config: ExecutorConfig | str) -> Iterator[ExecutorConfig]:
    """Run the stages called inside the block on ``config`` (e.g. ``"ray"``)."""
    chosen = config if isinstance(config, ExecutorConfig) else ExecutorConfig.model_validate(config)
    before = _active
    set_executor(chosen)
    try:
        yield chosen
    finally:
        set_executor(before)


# -- the command line's view: flags laid over the YAML key ------------------------------------
def reset_command() -> None:
    """Forget the executor flags and YAML of an earlier command (a command starts)."""
    global _yaml
    _flags.clear()
    _yaml = None
    set_executor(ExecutorConfig())


def set_flag(name: str, value: Any) -> None:
    """An executor flag given on the command line (``--executor``, ``--ray-address``...)."""
    if value is None:
        return
    _flags[name] = value
    apply_yaml(None)


def apply_yaml(section: Any) -> None:
    """The ``executor`` key of a command's YAML (None: keep the one seen before), with the
    command line's flags taking precedence. Raises ConfigError naming what is wrong."""
    global _yaml
    if section is not None:
        _yaml = section
    data: dict[str, Any] = {}
    if _yaml is not None:
        if isinstance(_yaml, str):
            data = {"kind": _yaml}
        elif isinstance(_yaml, dict):
            data = dict(_yaml)
        else:
            raise ConfigError(
                "executor: must be 'local', 'ray' or a mapping such as "
                "{kind: ray, address: auto, workers: 4}"
            )
    data.update(_flags)
    if any(k != "kind" for k in _flags) and "kind" not in data:
        data["kind"] = "ray"  # --ray-address and friends mean the Ray executor
    try:
        set_executor(ExecutorConfig.model_validate(data))
    except ValidationError as exc:
        lines = [
            f"  executor.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        ]
        raise ConfigError("invalid executor settings:\n" + "\n".join(lines)) from None
