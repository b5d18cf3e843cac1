"""The one exception type users see: a message that says what is wrong and how to fix it."""


class ConfigError(ValueError):
    """Bad input from the user (config, data, model path). Printed without a traceback by the CLI."""
