"""M-TRACE synthesis: LLM-written tasks, files, verified teacher trajectories.

Stages (each resumable, on ``tracetune.runner.run_stage``): query generation and
filtering (``queries``), file association (``files``), the query-file verifier
(``verify``), teacher rollouts (``teacher``), the trajectory verifier (``verify``); the
chain and its statistics (``pipeline``); the image pool (``pool``).
"""

from tracetune.synth.mtrace.config import (
    FilesConfig,
    QueriesConfig,
    SynthConfig,
    TeacherConfig,
    VerifyTasksConfig,
    VerifyTrajectoriesConfig,
)
from tracetune.synth.mtrace.pipeline import chain_stats, check_config, run_chain
from tracetune.synth.mtrace.pool import Pool, PoolConfig, PoolError, build_pool

__all__ = [
    "FilesConfig",
    "Pool",
    "PoolConfig",
    "PoolError",
    "QueriesConfig",
    "SynthConfig",
    "TeacherConfig",
    "VerifyTasksConfig",
    "VerifyTrajectoriesConfig",
    "build_pool",
    "chain_stats",
    "check_config",
    "run_chain",
]
