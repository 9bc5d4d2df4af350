"""Task programs: seeded generators of verifiable multimodal tool-use tasks."""

from tracetune.synth.programs.base import (
    GoldStep,
    ProgramError,
    ProgramFile,
    TaskDraft,
    TaskProgram,
    count_of,
    get_program,
    label_of_max,
    load_program_modules,
    number_of,
    program,
    registered_programs,
    task_seed,
    text_in,
)

__all__ = [
    "GoldStep",
    "ProgramError",
    "ProgramFile",
    "TaskDraft",
    "TaskProgram",
    "count_of",
    "get_program",
    "label_of_max",
    "load_program_modules",
    "number_of",
    "program",
    "registered_programs",
    "task_seed",
    "text_in",
]
