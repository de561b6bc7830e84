"""The process environment, read safely while other threads change it.

Reading `os.environ` as a whole (`items()`, `dict(os.environ)`, `{**os.environ}`, `os.environ | {...}`) walks
it key by key in Python, so a variable that another thread sets or removes meanwhile raises `KeyError` or
`RuntimeError`. Such threads run in every pipeline process: MLflow's telemetry thread unsets
`_MLFLOW_TELEMETRY_SESSION_ID` shortly after MLflow is imported. `environ_copy` takes the copy in one step
instead. Reading one variable by name (`os.environ.get`) is already one step and needs nothing from here.
This module does not change the environment.
"""

import os


def environ_copy(**extra: str) -> dict[str, str]:
    """A consistent copy of the environment, with `extra` set on top (for a child process's `env=`).

    `os.environ` keeps its variables in a private dict (`_data`, encoded); copying that dict is one C call
    under the interpreter lock, so no other thread's change can land in the middle of it."""
    data = os.environ._data.copy()  # private, but the one atomic way to read the whole mapping
    copy = {os.environ.decodekey(key): os.environ.decodevalue(value) for key, value in data.items()}
    return copy | extra
