"""vitlab's exceptions: each one a class of mistake the CLI answers with one line (exit 2), importable
without torch, so the front door can refuse bad input before any heavy import."""


class VitlabError(Exception):
    """Something vitlab refuses, with a message that names the fix."""


class ParamsError(VitlabError, ValueError):
    """A params file or override that vitlab cannot run."""


class RunError(VitlabError, RuntimeError):
    """A run folder that is missing, incomplete or cannot be resumed."""


class DataError(VitlabError, RuntimeError):
    """A data set that is missing, malformed or does not fit the run."""


class ModelError(VitlabError, RuntimeError):
    """A checkpoint that cannot be found or loaded."""


class AttentionError(VitlabError, RuntimeError):
    """An attention kernel this machine or this model cannot run."""


class QuantError(VitlabError, ValueError):
    """A quantization setting that does not fit the model."""


class SpeedPathError(VitlabError, RuntimeError):
    """A speed path this machine or model cannot take."""


class TimeLimitReached(VitlabError, RuntimeError):
    """`vitlab run --time-limit` ran out at a step or epoch boundary; the state is kept for --resume."""


# What the CLI exits with when a run stopped at its --time-limit (resumable), not at an error (1).
TIME_LIMIT_EXIT = 3
