"""Integration fixtures: isolated stacks of real processes on a real Redis."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisServer, free_port
from tests.integration.stack import FLEET, Stack


def _dump_logs(stack: Stack) -> None:
    for log in sorted(stack.logs.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-40:]
        print(f"----- {log.name} (last {len(lines)} lines) -----")
        print("\n".join(lines))


def _new_stack(redis_server: RedisServer, root: Path, **settings: Any) -> Stack:
    """A Stack on a fresh database; the API and workers log in as the role's ACL users."""
    db = redis_server.fresh_db()
    return Stack(
        redis_server.url(db), root, free_port(), users=redis_server.role_urls(db), **settings
    )


@pytest.fixture
def make_stack(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def make(**settings: Any) -> Stack:
        stack = _new_stack(redis_server, tmp_path / f"stack{len(stacks)}", **settings)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        _dump_logs(stack)
        stack.close()


@contextlib.contextmanager
def running_stack(
    redis_server: RedisServer, root: Path, workers: dict[str, str], **settings: Any
) -> Iterator[Stack]:
    """The API and the given workers (name -> queue), live; logs shown when it ends."""
    s = _new_stack(redis_server, root, **settings)
    try:
        s.start(workers)
        yield s
    finally:
        _dump_logs(s)
        s.close()


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API + one GPU-queue worker (gpu0) + one CPU worker (cpu0), shared by a module."""
    with running_stack(
        redis_server, tmp_path_factory.mktemp("stack"), FLEET, max_upload_bytes=2_000_000
    ) as s:
        yield s
