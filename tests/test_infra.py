"""Every infra file parses, names only entrypoints/configs/paths that exist, and keeps token auth on."""

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
YAML_FILES = sorted(INFRA.rglob("*.yaml"))


def load_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def repo_paths_named(text: str) -> set[str]:
    """Repo-relative files a command line or manifest names: jobs/*.py, configs/*.yaml, infra/*."""
    return set(re.findall(r"\b((?:jobs|configs|infra|benchmarks)/[\w./-]+\.(?:py|yaml|yml))\b", text))


def test_infra_files_present():
    names = {p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*") if p.is_file()}
    for required in ["runtime_env.yaml", "Dockerfile", "aws/cluster.yaml", "kuberay/raycluster.yaml",
                     "kuberay/rayjob.yaml", "mlflow/deployment.yaml"]:
        assert required in names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_yaml_parses_and_names_existing_paths(path):
    docs = load_all(path)
    assert docs, f"{path} is empty"
    named = repo_paths_named(path.read_text())
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"{path.name} names files that do not exist: {missing}"


def test_kuberay_manifests_are_ray_resources():
    cluster = load_all(INFRA / "kuberay/raycluster.yaml")[0]
    job = load_all(INFRA / "kuberay/rayjob.yaml")[0]
    assert cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    entry = job["spec"]["entrypoint"].split()
    assert entry[0] == "python" and (REPO / entry[1]).is_file()
    assert (REPO / entry[entry.index("--config") + 1]).is_file()


def _container_envs(doc) -> list[dict]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "containers" in node:
                for c in node["containers"]:
                    found.append({e["name"]: e.get("value") for e in c.get("env", [])})
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return found


@pytest.mark.reliability
@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_turns_token_auth_on_through_auth_options(name):
    doc = load_all(INFRA / name)[0]
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    # KubeRay >= 1.5.1 sets RAY_AUTH_MODE / RAY_AUTH_TOKEN on every Ray container (and the job submitter)
    assert cluster["authOptions"] == {"mode": "token", "secretName": "sketchgan-ray-token"}
    envs = _container_envs(doc)
    assert envs
    for env in envs:  # no container overrides what the operator sets
        assert "RAY_AUTH_MODE" not in env and "RAY_AUTH_TOKEN" not in env


@pytest.mark.parametrize("path", [p for p in YAML_FILES if "image:" in p.read_text()],
                         ids=lambda p: p.relative_to(INFRA).as_posix())
def test_images_are_pinned(path):
    images = re.findall(r"image:\s*\"?([\w./:-]+)", path.read_text())
    assert images
    for image in images:
        assert ":" in image and not image.endswith(":latest"), f"{path.name}: image {image} is not pinned"


@pytest.mark.reliability
def test_no_infra_file_disables_auth():
    for path in INFRA.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"RAY_AUTH_MODE\W+(disabled|none|off)", text, re.I), path
            # credentials come from secrets / instance roles, never literals in the repo
            assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[:=]\s*['\"]?\w{16,}", text), path


@pytest.mark.reliability
def test_cluster_launcher_starts_ray_with_token_auth():
    cfg = load_all(INFRA / "aws/cluster.yaml")[0]
    assert cfg["provider"]["type"] == "aws"
    for kind in ("head_start_ray_commands", "worker_start_ray_commands"):  # each kind starts Ray, with the token
        starts = [c for c in cfg[kind] if "ray start" in c]
        assert starts, f"{kind}: no `ray start`"
        assert all("RAY_AUTH_MODE=token" in c for c in starts), starts
    gpu_types = [t for t in cfg["available_node_types"].values()
                 if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu_types, "no GPU worker type"


def test_mlflow_server_uses_postgres_and_s3():
    docs = load_all(INFRA / "mlflow/deployment.yaml")
    text = (INFRA / "mlflow/deployment.yaml").read_text()
    assert any(d["kind"] == "Deployment" for d in docs)
    assert "--artifacts-destination s3://" in text and "postgres" in text


def test_dockerfile_copies_existing_paths_and_installs_project():
    text = (INFRA / "Dockerfile").read_text()
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for part in src.split():
            assert (REPO / part).exists(), f"Dockerfile copies missing {part}"
    # the locked versions, then the project as a regular package (an editable install points at the build context)
    assert "pip install --no-cache-dir -r requirements.lock" in text and '--no-deps ".[server]"' in text
    assert not re.search(r"pip install[^\n]*\s-e\s", text)
    assert "RAY_AUTH_MODE=token" in text


@pytest.mark.reliability
def test_runtime_env_keeps_secrets_out():
    env = load_all(INFRA / "runtime_env.yaml")[0]
    for key in env.get("env_vars", {}):
        assert not re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", key), key
