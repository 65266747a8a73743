"""The database and queue seams (SPEC 10): the same flows on SQLite + SqliteHuey and on
PostgreSQL + Redis (the machine's own servers on their standard ports)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import create_pg_database, drop_pg_database, wait_for

from flowd import api, catalog
from flowd.config import load_config
from flowd.queue.workers import WorkerPool

REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture(params=["sqlite", "postgres-redis"])
def backend(request: Any, config_file: Any) -> Iterator[Any]:
    """An engine on one backend pair, with a real worker pool."""
    sections: dict[str, Any] = {}
    dbname = None
    if request.param == "postgres-redis":
        dbname = create_pg_database("flowd_test")
        queue_name = f"flowd-test-{uuid.uuid4().hex[:8]}"
        sections = {"database": {"url": f"postgresql://postgres@127.0.0.1:5432/{dbname}"},
                    "queue": {"backend": "redis", "url": REDIS_URL, "name": queue_name}}
    engine = api.configure(load_config(config_file(**sections)), create=True)
    pool = WorkerPool(engine.config)
    pool.start()
    yield engine
    pool.stop(grace=2)
    api.reset()
    if dbname:
        redis.Redis.from_url(REDIS_URL).flushdb()
        drop_pg_database(dbname)


def ended(flow_id: int) -> Any:
    return wait_for(lambda: (f := api.get_flow(flow_id)).state in ("DONE", "FAILED", "CANCELLED") and f, 20,
                    message=f"flow {flow_id} to end")


def test_flows_run_retry_and_respect_modes_on_each_backend(backend: Any, tmp_path: Path) -> None:
    paths = backend.config.flowd.task_paths
    counter = tmp_path / "count"
    catalog.save_task("add", "t.Add", task_paths=paths, options={"n": 2})
    catalog.save_task("results", "t.Results", task_paths=paths)
    catalog.save_task("flaky", "t.FailTimes", task_paths=paths, retries=2, retry_delay=0.1,
                      options={"counter": str(counter), "times": 1})
    catalog.save_task("sleep", "t.Sleep", task_paths=paths, options={"seconds": 1})
    catalog.save_routine("chain", ["add", "add", "results"])
    catalog.save_routine("flaky-r", ["add", "flaky"])
    catalog.save_routine("single-r", ["sleep"], mode="single")

    flow = ended(api.submit_flow("chain", 1, total=5, request_id="b-1").id)
    assert flow.state == "DONE", flow.error
    assert flow.result["kwargs"]["results"] == [{"args": [1], "kwargs": {"total": 7}},
                                                {"args": [1], "kwargs": {"total": 9}}]
    assert api.submit_flow("chain", request_id="b-1").id == flow.id

    flaky = ended(api.submit_flow("flaky-r").id)
    assert flaky.state == "DONE", flaky.error
    assert [(r.position, r.attempt, r.state) for r in api.flow_trace(flaky.id)] == [
        (0, 1, "DONE"), (1, 1, "FAILED"), (1, 2, "DONE")]

    first = api.submit_flow("single-r")
    refused = api.submit_flow("single-r")
    assert refused.state == "CANCELLED" and "mode single" in refused.error
    assert ended(first.id).state == "DONE"
    assert api.counts_by_state()["DONE"] == 3
