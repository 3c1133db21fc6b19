"""The Ray head the tests start keeps token authentication on: a job without the token is refused."""

import pytest
from ray_head import RayHead

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    h = RayHead(tmp_path_factory.mktemp("rayhead"), num_cpus=1).start()
    yield h
    h.stop()


def test_job_without_token_is_refused(head, tmp_path):
    (tmp_path / "hello.py").write_text("print('should never run')\n")
    proc = head.submit(["--working-dir", str(tmp_path), "--", "python", "hello.py"], cwd=tmp_path,
                       with_token=False, timeout=120)
    assert proc.returncode != 0
    assert "Unauthorized" in proc.stderr + proc.stdout or "authentication" in (proc.stderr + proc.stdout).lower()
    assert "should never run" not in proc.stdout


def test_job_with_token_runs(head, tmp_path):
    (tmp_path / "hello.py").write_text("import ray\nray.init()\nprint('hello from', ray.__version__)\n")
    proc = head.submit(["--working-dir", str(tmp_path), "--", "python", "hello.py"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "hello from" in proc.stdout
