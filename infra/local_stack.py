"""Start (and stop) a local MLflow tracking server with S3 artifacts served by moto, on loopback.

    python -m infra.local_stack start   # prints the environment to export, writes .fedhq/stack.json
    python -m infra.local_stack stop

The S3 endpoint is moto's server mode (for tests and demos); in production point
MLFLOW_S3_ENDPOINT_URL at MinIO or S3 (see docker-compose.yml). Processes are started in their own
process groups and stopped by PID; everything binds to 127.0.0.1 unless FEDHQ_BIND is set.
"""
from __future__ import annotations

import json
import re
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from fedhq_core.config import redact_uri

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@dataclass
class Stack:
    mlflow_pid: int
    s3_pid: int
    tracking_uri: str
    s3_endpoint: str
    bucket: str
    prefix: str
    workdir: str

    def env(self) -> dict[str, str]:
        # dummy credentials for moto; real ones come from the environment and are never logged
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
                "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
                "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
                "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}

    def stop(self) -> None:
        stop_groups([self.mlflow_pid, self.s3_pid])

    def stop_mlflow(self) -> None:
        """The tracking server goes away (SIGKILL, as in a crash); S3 stays."""
        stop_groups([self.mlflow_pid], kill=True)

    def restart_mlflow(self) -> None:
        """The tracking server comes back on the same port, with the same store and bucket."""
        port = int(self.tracking_uri.rsplit(":", 1)[1])
        host = self.tracking_uri.split("//", 1)[1].rsplit(":", 1)[0]
        env = dict(os.environ, **self.env())
        self.mlflow_pid = _spawn_mlflow(host, port, Path(self.workdir), f"s3://{self.bucket}/{self.prefix}", env).pid
        wait_http(f"{self.tracking_uri}/health", timeout=120)


def _spawn_mlflow(host: str, port: int, work: Path, artifacts: str, env: dict[str, str] | None = None):
    log = open(work / "mlflow-server.log", "ab")
    return subprocess.Popen([str(BIN / "mlflow"), "server", "--host", host, "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{work / 'mlflow-server.db'}",
                             "--artifacts-destination", artifacts, "--workers", "1"],
                            env=env, stdout=log, stderr=log, start_new_session=True)


def stop_groups(pids: list[int], kill: bool = False) -> None:
    """SIGTERM each process group (SIGKILL with ``kill``: gone at once, as in a crash), SIGKILL
    after 5 s, and reap our own children."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL if kill else signal.SIGTERM)
        except ProcessLookupError:
            continue
    for pid in pids:
        for attempt in range(100):
            if attempt == 50:  # 5 s after SIGTERM
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.waitpid(pid, os.WNOHANG)  # reap our own child so its group disappears
            except ChildProcessError:
                pass
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)


def start(workdir: str, bucket: str = "fedhq", prefix: str = "mlflow", host: str | None = None) -> Stack:
    host = host or os.environ.get("FEDHQ_BIND", "127.0.0.1")
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    s3_port, ml_port = free_port(), free_port()
    s3_endpoint = f"http://{host}:{s3_port}"
    env = dict(os.environ, AWS_ACCESS_KEY_ID=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
               AWS_SECRET_ACCESS_KEY=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
               AWS_DEFAULT_REGION=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
               MLFLOW_S3_ENDPOINT_URL=s3_endpoint)
    log = open(work / "stack.log", "ab")
    s3 = subprocess.Popen([str(BIN / "moto_server"), "-H", host, "-p", str(s3_port)], env=env, stdout=log,
                          stderr=log, start_new_session=True)
    try:
        wait_http(f"{s3_endpoint}/moto-api/")
        import boto3

        boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                     aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
        ml = _spawn_mlflow(host, ml_port, work, f"s3://{bucket}/{prefix}", env)
    except Exception:
        os.killpg(s3.pid, signal.SIGKILL)
        raise
    stack = Stack(ml.pid, s3.pid, f"http://{host}:{ml_port}", s3_endpoint, bucket, prefix, str(work))
    try:
        wait_http(f"{stack.tracking_uri}/health", timeout=120)
    except Exception:
        stack.stop()
        raise
    return stack


SECRET_VAR = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL", re.IGNORECASE)


def main(argv: list[str]) -> int:
    state = Path(os.environ.get("FEDHQ_STATE_DIR", ".fedhq")) / "stack"
    info = state / "stack.json"
    if argv[:1] == ["start"]:
        stack = start(str(state))
        info.write_text(json.dumps(asdict(stack)))
        env_file = state / "stack.env"     # every variable, credentials included: readable by the owner only
        env_file.write_text("".join(f"export {k}={v}\n" for k, v in stack.env().items()))
        env_file.chmod(0o600)
        for k, v in stack.env().items():
            if not SECRET_VAR.search(k):
                print(f"export {k}={redact_uri(v)}")
        print(f"# credentials are not printed: source {env_file}")
        return 0
    if argv[:1] == ["stop"] and info.is_file():
        Stack(**json.loads(info.read_text())).stop()
        info.unlink()
        return 0
    print("usage: python -m infra.local_stack start|stop", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
