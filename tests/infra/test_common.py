"""Every MoRAG host: service account, virtualenv, env file, Redis with authentication."""


def test_service_account_fixed_ids(facts):
    user = facts.host.user("morag")
    assert user.exists
    assert (user.uid, user.gid) == (
        facts.var("morag_app_uid", 2300),
        facts.var("morag_app_gid", 2300),
    )


def test_env_file_mode_and_owner(facts):
    f = facts.host.file("/etc/morag/morag.env")
    assert f.exists
    assert f.mode == 0o640
    assert f.user == "root"
    assert f.group == "morag"


def test_env_file_has_the_essentials(facts):
    env = facts.env()
    for key in ("MORAG_REDIS_URL", "MORAG_WORKER_TOKEN", "MORAG_API_URL", "MORAG_SHARED_DIR"):
        assert env.get(key), f"{key} missing in /etc/morag/morag.env"
    if facts.is_server:
        # In api.env, which only the API's user reads (test_os_users.py), not in morag.env.
        assert "MORAG_API_KEYS" not in env, "the workers on the server must not get the API keys"
        assert facts.api_env().get("MORAG_API_KEYS")
    else:
        assert "MORAG_API_KEYS" not in env, "API keys belong on the server only"


def test_venv_imports_the_app(facts):
    out = facts.venv_python("import morag, morag.worker, morag.config; print('ok')", sudo=False)
    assert out.rc == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_secrets_not_in_process_list(facts):
    env = facts.env()
    args = facts.host.check_output("ps -eo args")
    assert env["MORAG_WORKER_TOKEN"] not in args
    password = env["MORAG_REDIS_URL"].split("@")[0].rpartition(":")[2]
    if password:
        assert password not in args


def test_redis_reachable_with_auth(facts):
    out = facts.redis("print(r.ping())")
    assert out.rc == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_redis_refuses_without_auth(facts):
    out = facts.redis(
        "from urllib.parse import urlsplit\n"
        "u = urlsplit(url)\n"
        "tls = u.scheme == 'rediss'\n"
        "anon = redis.Redis(host=u.hostname, port=u.port or 6379, socket_timeout=5, ssl=tls,\n"
        "    ssl_ca_certs='/etc/morag/redis-ca.crt' if tls else None)\n"
        "try:\n"
        "    anon.ping(); print('open')\n"
        "except (redis.AuthenticationError, redis.ResponseError) as e:\n"
        "    print('refused', e)\n"
    )
    assert out.rc == 0, out.stderr
    assert out.stdout.startswith("refused"), out.stdout


def test_visibility_timeout_above_job_limit(facts):
    env = facts.env()
    assert int(env["MORAG_VISIBILITY_TIMEOUT"]) > int(env["MORAG_JOB_TIME_LIMIT"])
