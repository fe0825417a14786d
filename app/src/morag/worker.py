"""The worker's entry point: ``celery -A morag.worker:celery_app worker`` and ``morag worker``.

The Celery app lives in `morag.celery_app`, a process's runtime in `morag.runtime`, the
tasks and signal handlers in `morag.tasks` (and the morag-store queue's in
`morag.server_tasks`). Importing this module registers them all, so a worker started
through it has every task and handler before it connects.
"""

from __future__ import annotations

from morag import server_tasks, tasks
from morag.celery_app import celery_app
from morag.runtime import require_api_identity, require_device

__all__ = ["celery_app", "require_api_identity", "require_device", "server_tasks", "tasks"]
