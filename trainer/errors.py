"""The one exception type users see: a message that says what is wrong and how to fix it."""


class ConfigError(ValueError):
    """Bad input from the user (config, data, model path). Printed without a traceback by the CLI."""


class TrainingHalted(RuntimeError):
    """Training stopped on purpose (a non-finite loss); the message says where and what was kept."""
