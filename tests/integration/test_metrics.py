"""GET /metrics of a real stack: the fleet's numbers after real jobs, the API's own HTTP and
process metrics, the bearer token, OpenMetrics and gzip, and a real Prometheus scraping it
with the alert rules and the dashboard's queries."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from morag import fleet
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from tests.conftest import RedisServer, free_port
from tests.integration.conftest import running_stack
from tests.integration.stack import API_KEY, FLEET, METRICS_TOKEN, Scrape, Stack, wait_until

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "prometheus" / "morag-alerts.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "morag-fleet.json"
METRIC = re.compile(r"\bmorag_[a-z0-9_]+\b")
# Grafana's variables, as Prometheus needs them to run a dashboard query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(redis_server, tmp_path_factory.mktemp("metrics"), FLEET) as s:
        yield s


def _process(stack: Stack, path: Path, *, gpu: bool, options: dict | None = None) -> dict:
    with stack.client() as c, open(path, "rb") as f:
        resp = c.post(
            "/process/file",
            params={"gpu": str(gpu).lower()},
            files={"file": (path.name, f)},
            data={"options": json.dumps(options or {})},
        )
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_a_gpu_job_and_a_gpu_failure_fallback_show_in_the_scrape(
    stack: Stack, speech_wav: Path
) -> None:
    on_gpu = _process(stack, speech_wav, gpu=True)
    assert on_gpu["route"]["code"] == "gpu_worker"
    fell_back = _process(stack, speech_wav, gpu=True, options={"fault": "cuda_oom"})
    assert stack.job(fell_back["task_id"])["route"]["code"] == "gpu_failure"

    m = stack.scrape()
    # Routing: both went to gpu-tasks; the failure re-routed one to celery with its code.
    decided = m.value(
        "morag_route_decisions_total", queue="gpu-tasks", code="gpu_worker", gpu_requested="true"
    )
    assert decided >= 2
    assert m.value("morag_route_decisions_total", queue="celery", code="gpu_failure") >= 1
    assert m.value("morag_gpu_fallbacks_total", code="gpu_failure", content_type="audio") >= 1
    assert m.value("morag_gpu_fallbacks_total", code="no_gpu_worker", content_type="audio") == 0
    # Once per job at its end: the one that fell back, and the one that stayed on the GPU.
    finished = "morag_gpu_jobs_finished_total"
    assert m.value(finished, content_type="audio", fell_back="true") == 1
    assert m.value(finished, content_type="audio", fell_back="false") == 1
    submitted = m.value(
        "morag_jobs_submitted_total", content_type="audio", queue="gpu-tasks", gpu_requested="true"
    )
    assert submitted >= 2
    # The fleet: the GPU worker computes on the CPU in tests, and the gauge says so.
    assert m.value("morag_workers", queue="gpu-tasks", device="cpu") == 1
    assert m.value("morag_workers", queue="gpu-tasks", device="cuda") == 0
    assert m.value("morag_workers", queue="celery", device="cpu") == 1
    assert m.value("morag_worker_info", worker="gpu0@test", kind="gpu", device="cpu") == 1
    assert m.value("morag_worker_info", worker="cpu0@test", kind="cpu", device="cpu") == 1
    assert m.value("morag_queue_consumers", queue="gpu-tasks") == 1
    assert m.value("morag_queue_consumers", queue="morag-store") == 0
    assert m.value("morag_workers_rescuing") == 0
    assert m.value("morag_store_ingested") == 0
    for queue in ("celery", "gpu-tasks", "morag-store"):
        assert m.value("morag_queue_depth", queue=queue) is not None
    # Ends and times: the GPU attempt that failed ran on gpu-tasks, its rerun on celery.
    assert m.value("morag_jobs_finished_total", state="succeeded", content_type="audio") >= 2
    gpu_runs = dict(content_type="audio", queue="gpu-tasks", device="cpu")
    assert m.value("morag_job_run_seconds_count", **gpu_runs) >= 2
    assert m.value("morag_job_run_seconds_count", content_type="audio", queue="celery") >= 1
    assert m.value("morag_job_run_seconds_sum", **gpu_runs) > 0
    assert m.value("morag_job_wait_seconds_count", queue="celery") >= 1
    for name in ("morag_job_run_seconds", "morag_job_wait_seconds"):
        buckets = m.series(f"{name}_bucket", **gpu_runs)
        counts = [b.value for b in buckets]
        assert counts == sorted(counts), "buckets must be cumulative"
        assert buckets[-1].labels["le"] == "+Inf"
        assert counts[-1] == m.value(f"{name}_count", **gpu_runs)
    assert m.value("morag_build_info") == 1
    assert m.value("morag_job_time_limit_seconds") == 7200


def test_queued_and_running_jobs_and_busy_workers(stack: Stack, speech_wav: Path) -> None:
    running = stack.ingest(speech_wav, gpu=False, options={"fault": "slow:4"})
    stack.wait_job(running["task_id"], timeout=30, states=("running",))
    # cpu0 is busy: these wait (one may sit in the worker's prefetch, not in the queue).
    waiting = [stack.ingest(speech_wav, gpu=False) for _ in range(2)]
    assert {w["route"]["code"] for w in waiting} == {"not_requested"}

    def scraped() -> Scrape | None:
        # The API reads heartbeats and queue lengths at most every MORAG_FLEET_CACHE_SECONDS.
        m = stack.scrape()
        busy = m.value("morag_worker_busy", worker="cpu0@test") == 1
        return m if busy and m.value("morag_queue_depth", queue="celery") else None

    m = wait_until(scraped, 10, "cpu0 busy and jobs waiting on celery")
    assert m.value("morag_jobs", state="running", content_type="audio") == 1
    assert m.value("morag_jobs", state="queued", content_type="audio") == 2
    assert m.value("morag_jobs", state="queued", content_type="document") == 0
    assert m.value("morag_queue_depth", queue="celery") >= 1
    assert m.value("morag_jobs_oldest_seconds", state="running") > 0
    assert m.value("morag_jobs_oldest_seconds", state="queued") > 0
    assert m.value("morag_worker_busy", worker="gpu0@test") == 0
    assert m.value("morag_route_decisions_total", code="not_requested", queue="celery") >= 2
    for job in (running, *waiting):
        assert stack.wait_job(job["task_id"])["status"] == "succeeded"
    done = stack.scrape()
    assert done.value("morag_jobs", state="running") == 0
    assert done.value("morag_jobs_oldest_seconds", state="queued") == 0


def test_gpu_telemetry_from_heartbeats(stack: Stack) -> None:
    # No GPU here: a worker heartbeat as a GPU host publishes it (NVML values), short-lived.
    fleet.publish(
        stack.redis,
        {
            "name": "gpu7@gpuhost",
            "hostname": "gpuhost",
            "queues": ["gpu-tasks"],
            "consuming": ["gpu-tasks"],
            "device": "cuda",
            "processors": [],  # never chosen by routing
            "busy": True,
            "gpu_telemetry": [
                {
                    "index": 3,
                    "uuid": "GPU-5a1e0f00-0000-0000-0000-000000000003",
                    "name": "NVIDIA H100 80GB HBM3",
                    "utilization": 0.42,
                    "memory_used_bytes": 12 * 2**30,
                    "memory_total_bytes": 80 * 2**30,
                }
            ],
        },
        ttl=3,
    )
    labels = dict(worker="gpu7@gpuhost", hostname="gpuhost", gpu="3")
    m = wait_until(
        lambda: (s := stack.scrape()).value("morag_gpu_utilization_ratio", **labels) and s,
        5,
        "the GPU heartbeat in the scrape",
    )
    assert m.value("morag_gpu_utilization_ratio", **labels) == 0.42
    assert m.value("morag_gpu_memory_used_bytes", **labels) == 12 * 2**30
    assert m.value("morag_gpu_memory_total_bytes", **labels) == 80 * 2**30
    [series] = m.series("morag_gpu_utilization_ratio", **labels)
    assert series.labels["uuid"].startswith("GPU-5a1e0f00") and "H100" in series.labels["name"]
    assert m.value("morag_workers", queue="gpu-tasks", device="cuda") == 1
    assert m.value("morag_worker_info", worker="gpu7@gpuhost", kind="gpu", device="cuda") == 1
    stack.wait_gone("gpu7@gpuhost")


def test_metrics_take_the_bearer_token_only(stack: Stack) -> None:
    url = f"{stack.api_url}/metrics"
    refused = {
        "no credentials": {},
        "wrong token": {"Authorization": "Bearer not-the-token"},
        "API key header": {"X-API-Key": API_KEY},
        "API key as bearer": {"Authorization": f"Bearer {API_KEY}"},
    }
    for what, headers in refused.items():
        resp = httpx.get(url, headers=headers, timeout=10)
        assert resp.status_code == 401, (what, resp.text)
        assert "metrics token" in resp.json()["detail"]
    ok = httpx.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10)
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/plain")
    assert "morag_workers{" in ok.text


def test_without_a_metrics_token_the_endpoint_is_off(make_stack) -> None:
    stack = make_stack(metrics_token="")
    stack.start_api()
    resp = httpx.get(
        f"{stack.api_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
    )
    assert resp.status_code == 404 and "MORAG_METRICS_TOKEN" in resp.json()["detail"]


def test_the_api_exports_its_own_http_metrics_by_route_template(
    make_stack, speech_wav: Path
) -> None:
    # No worker: a /v1 transcription waits MORAG_OPENAI_WAIT for nothing, then answers 504.
    wait = 4
    stack = make_stack(openai_wait=wait)
    stack.start_api()
    task_id = "0123456789abcdef0123456789abcdef"
    with stack.client() as c:
        assert c.get("/api/v1/workers").status_code == 200
        assert c.get(f"/api/v1/status/{task_id}").status_code == 404
        assert c.get(f"/no/such/{task_id}").status_code == 404

    answers: list[httpx.Response] = []

    def transcribe() -> None:
        with open(speech_wav, "rb") as f:
            answers.append(
                httpx.post(
                    f"{stack.api_url}/v1/audio/transcriptions",
                    headers={"Authorization": f"Bearer {API_KEY}"},
                    files={"file": (speech_wav.name, f)},
                    data={"model": "whisper-1"},
                    timeout=60,
                )
            )

    waiting = threading.Thread(target=transcribe)
    waiting.start()
    v1 = "/v1/audio/transcriptions"
    wait_until(
        lambda: stack.scrape().value("morag_http_requests_inprogress", handler=v1) == 1,
        wait * 5,
        "the waiting transcription in the in-flight gauge",
    )
    waiting.join(60)
    assert answers and answers[0].status_code == 504, answers

    m = stack.scrape()
    requests = "morag_http_requests_total"
    assert m.value(requests, handler="/api/v1/workers", method="GET", status="200") == 1
    assert m.value(requests, handler="/api/v1/status/{task_id}", method="GET", status="404") == 1
    assert m.value(requests, handler=v1, method="POST", status="504") == 1
    assert m.value(requests, handler="none", status="404") == 1  # the unknown path
    assert task_id not in m.text, "a raw path (an id) became a label value"
    # Latency per route template: the 504 took the whole wait.
    latency = "morag_http_request_duration_seconds"
    assert m.value(f"{latency}_count", handler=v1, method="POST") == 1
    assert m.value(f"{latency}_sum", handler=v1) >= wait
    assert m.value(f"{latency}_bucket", handler=v1, le="1.0") == 0
    assert m.value(f"{latency}_bucket", handler="/api/v1/workers", le="+Inf") == 1
    # In flight now: the scrape itself, and the transcription no more.
    assert m.value("morag_http_requests_inprogress", handler=v1) == 0
    assert m.value("morag_http_requests_inprogress", handler="/metrics") == 1
    # The process.
    assert m.value("process_resident_memory_bytes") > 0
    assert m.value("process_cpu_seconds_total") > 0
    assert m.value("process_open_fds") > 0
    assert m.value("python_info") == 1
    assert m.value("morag_build_info") == 1  # the fleet's numbers still come with them


def test_openmetrics_and_gzip_when_the_scraper_asks(stack: Stack) -> None:
    url = f"{stack.api_url}/metrics"
    auth = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    with httpx.Client(timeout=30) as client:
        resp = client.get(
            url,
            headers={**auth, "Accept": "application/openmetrics-text; version=1.0.0"},
        )
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/openmetrics-text")
    assert resp.headers["content-encoding"] == "gzip"  # httpx asks for it, and unpacks it
    assert resp.text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(resp.text)}
    assert families["morag_http_requests"].type == "counter"
    assert families["morag_jobs_submitted"].type == "counter"
    assert families["morag_workers"].type == "gauge"
    plain = httpx.get(url, headers={**auth, "Accept-Encoding": "identity"}, timeout=30)
    assert plain.headers["content-type"].startswith("text/plain")
    assert "content-encoding" not in plain.headers and "# EOF" not in plain.text


def _dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]


def _rule_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(r["alert"], r["expr"]) for g in groups for r in g["rules"]]


def test_dashboard_and_alerts_query_only_exported_metrics(stack: Stack) -> None:
    exported = stack.scrape().names()
    for where, expr in [*_dashboard_queries(), *_rule_exprs()]:
        if "haproxy_" in expr:
            continue  # HAProxy's own metrics: checked against a real one in test_haproxy.py
        used = set(METRIC.findall(expr))
        assert used or where == "MoragMetricsDown", f"{where}: no morag_* metric in {expr}"
        assert used <= exported, f"{where}: not exported: {sorted(used - exported)}"


# -- a real Prometheus scraping the stack ------------------------------------------------------


def _prometheus() -> str:
    exe = shutil.which("prometheus")
    if exe is None:
        if os.environ.get("MORAG_REQUIRE_PROMETHEUS") or os.environ.get("CI"):
            pytest.fail("prometheus is missing: run `make deps` (Debian package prometheus)")
        pytest.skip("prometheus is not installed (Debian package prometheus; make deps)")
    return exe


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus scraping the stack's API every second with the bearer token."""
    exe = _prometheus()
    root = tmp_path_factory.mktemp("prometheus")
    token = root / "metrics-token"
    token.write_text(METRICS_TOKEN + "\n")
    token.chmod(0o600)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "morag",
                "metrics_path": "/metrics",
                "authorization": {"type": "Bearer", "credentials_file": str(token)},
                "static_configs": [{"targets": [f"127.0.0.1:{stack.api_port}"]}],
            }
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(root / "prometheus.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url), 30, "Prometheus to start")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        print((root / "prometheus.log").read_text(errors="replace")[-3000:])


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _query(url: str, expr: str) -> dict:
    resp = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]


def test_prometheus_scrapes_the_fleet_with_the_bearer_token(prometheus: str) -> None:
    def up() -> list:
        return _query(prometheus, 'up{job="morag"} == 1')["result"]

    wait_until(up, 30, "Prometheus to scrape the API (up == 1)", interval=0.5)
    workers = _query(prometheus, "morag_workers")["result"]
    by_labels = {(r["metric"]["queue"], r["metric"]["device"]): r["value"][1] for r in workers}
    assert by_labels[("gpu-tasks", "cpu")] == "1" and by_labels[("celery", "cpu")] == "1"
    names = httpx.get(f"{prometheus}/api/v1/label/__name__/values", timeout=10).json()["data"]
    assert {"morag_queue_depth", "morag_worker_info", "morag_jobs"} <= set(names)
    # The alert rules loaded and evaluate without errors.
    time.sleep(2)
    rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {r["name"]: r for g in rules for r in g["rules"]}
    assert set(loaded) == {name for name, _ in _rule_exprs()}
    assert all(r["health"] == "ok" for r in loaded.values()), loaded


def test_every_dashboard_query_runs_in_prometheus(prometheus: str, stack: Stack) -> None:
    wait_until(lambda: _query(prometheus, 'up{job="morag"} == 1')["result"], 30, "a first scrape")
    # The dashboard's job and instance variables, as Grafana fills them in for this target.
    variables = {
        **GRAFANA_VARIABLES,
        "$job": "morag",
        "$instance": f"127.0.0.1:{stack.api_port}",
    }

    def answered() -> set[str]:
        """The panels whose queries return data (a PromQL error fails, naming the query)."""
        titles = set()
        for title, expr in _dashboard_queries():
            for name, value in variables.items():
                expr = expr.replace(name, value)
            if _query(prometheus, expr)["result"]:
                titles.add(title)
        return titles

    # The API row reads the API's own traffic: Prometheus' scrapes are requests too.
    api_row = {"API requests per second by route", "API requests in flight"}
    wait_until(lambda: api_row <= answered(), 30, f"data in the panels {api_row}", interval=1)
