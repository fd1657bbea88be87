"""Program sandbox on the executor: run uploaded programs beside the backend.

Public interface: `ProgramRunner`, `ProgramFailed`, `SandboxSettings`.
See docs/programs.md.
"""

from qrelay.executor.programs.runner import ProgramFailed, ProgramRunner
from qrelay.executor.programs.settings import SandboxSettings

__all__ = ["ProgramFailed", "ProgramRunner", "SandboxSettings"]
