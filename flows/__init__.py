"""Prefect flows: one per pipeline stage (`flows.stages`) and the whole pipeline (`flows.pipeline`)."""

import logging
import os

# llmcore reports progress through the standard `llmcore` logger; Prefect shows it in the terminal and
# in run logs. The variable must be set before Prefect configures logging (the first `import prefect`).
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "llmcore")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # llmcore used outside a flow
# Prefect's temporary server gives up after 20 s; a busy or cold machine needs longer to migrate its database.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
logging.getLogger("llmcore").setLevel(logging.INFO)
