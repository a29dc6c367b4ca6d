"""``tformer env``: what this install got and why, for bug reports.

    tformer env            # one "name: value" line each
    tformer env --json     # the same, as JSON

Versions (tformer, Python, torch, Triton, the CUDA toolkit, the NVIDIA driver), the visible GPUs
and their compute capability, each backend with the reason it is unavailable, the CUDA archs the
extension was compiled for (recorded by ``setup.py``) and whether they cover each GPU, and
whether DeepSpeed, FSDP2, W&B and the optional libraries import.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import io
import json
import os
import platform
import shutil
import subprocess
import sys

# (import name, distribution, what needs it): the libraries behind optional features.
OPTIONAL_LIBRARIES: tuple[tuple[str, str, str], ...] = (
    ("deepspeed", "deepspeed", "DeepSpeed engine (train extra)"),
    ("wandb", "wandb", "W&B logging (train extra)"),
    ("yaml", "pyyaml", "YAML configs (train extra)"),
    ("tqdm", "tqdm", "progress bars (train extra)"),
    ("safetensors", "safetensors", "model export (train extra)"),
    ("tokenizers", "tokenizers", "BPE for IMDb (train extra)"),
    ("matplotlib", "matplotlib", "plots (train extra)"),
    ("transformers", "transformers", "Hugging Face integration (transformers extra)"),
    ("liger_kernel", "liger-kernel", "benchmark anchor (bench extra)"),
    ("sentence_transformers", "sentence-transformers", "tformer embed"),
    ("librosa", "librosa", "tformer transcribe"),
    ("jiwer", "jiwer", "tformer transcribe (WER/CER)"),
    ("seqscore", "seqscore", "NER entity metrics"),
    ("sklearn", "scikit-learn", "classification metrics"),
)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def import_status(module: str, distribution: str) -> dict:
    """``{"ok": True, "version": ...}`` or ``{"ok": False, "error": "ImportError: ..."}``."""
    try:
        # Some libraries (DeepSpeed) print banners on import; keep the report clean.
        with contextlib.redirect_stdout(io.StringIO()):
            importlib.import_module(module)
    except Exception as error:  # any failure to import is what the report is for
        return {"ok": False, "error": f"{type(error).__name__}: {error}".splitlines()[0]}
    return {"ok": True, "version": _version(distribution)}


def _fsdp2_status() -> dict:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except Exception as error:
        return {"ok": False, "error": f"{type(error).__name__}: {error}"}
    import torch.distributed

    if not torch.distributed.is_available():
        return {"ok": False, "error": "torch.distributed is not available in this torch build"}
    return {"ok": True, "version": "torch.distributed.fsdp.fully_shard"}


def _find_cuda_home() -> str | None:
    """CUDA_HOME, CUDA_PATH, the toolkit above a real ``nvcc`` on PATH, or /usr/local/cuda (as setup.py
    looks for it), whichever first holds ``bin/nvcc``."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None, "/usr/local/cuda"]
    return next((home for home in candidates if home and os.path.isfile(os.path.join(home, "bin", "nvcc"))), None)


def _cuda_toolkit() -> dict:
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return {"cuda_home": None, "nvcc": None, "why_not": "no CUDA toolkit found (CUDA_HOME unset, no nvcc on PATH)"}
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return {"cuda_home": cuda_home, "nvcc": None, "why_not": f"{nvcc} does not run ({error})"}
    release = next((line.split("release")[1].split(",")[0].strip() for line in out.splitlines() if "release" in line),
                   None)
    return {"cuda_home": cuda_home, "nvcc": release, "why_not": None if release else f"no version in {nvcc} --version"}


def _driver() -> dict:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"version": None, "why_not": "no NVIDIA driver found (nvidia-smi is not on PATH)"}
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return {"version": None, "why_not": f"nvidia-smi failed ({error})"}
    if out.returncode != 0 or not out.stdout.strip():
        return {"version": None, "why_not": f"nvidia-smi failed: {(out.stderr or out.stdout).strip()[:200]}"}
    return {"version": out.stdout.splitlines()[0].strip(), "why_not": None}


def _gpus(torch) -> list[dict]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
                     "memory_gib": round(props.total_memory / 2**30, 1)})
    return gpus


def _build(record: dict | None, gpus: list[dict], running_torch: str) -> dict:
    from tformer.build_info import RECORD_PATH, arch_covers, torch_mismatch

    if record is None:
        return {"record": None, "cuda_extension": False, "arch_list": [],
                "why_not": f"no build record ({RECORD_PATH} is missing: tformer was not installed by pip)",
                "covers": {}, "torch_mismatch": None}
    covers = {}
    for gpu in gpus:
        major, minor = (int(part) for part in gpu["capability"].split("."))
        covers[str(gpu["index"])] = record["cuda_extension"] and arch_covers(record["arch_list"], (major, minor))
    return {"record": str(RECORD_PATH), "cuda_extension": record["cuda_extension"], "arch_list": record["arch_list"],
            "built_against_torch": record.get("torch"), "why_not": record.get("why_not"), "covers": covers,
            "torch_mismatch": torch_mismatch(record, running_torch)}


def collect() -> dict:
    """Everything the report shows, as plain JSON-able data."""
    import torch

    import tformer
    from tformer.build_info import load_record

    gpus = _gpus(torch)
    triton_version = _version("triton")
    return {
        "tformer": {"version": tformer.__version__, "location": os.path.dirname(tformer.__file__)},
        "python": {"version": platform.python_version(), "executable": sys.executable, "platform": platform.platform()},
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None},
        "triton": {"version": triton_version, "why_not": None if triton_version else "Triton is not installed"},
        "cuda_toolkit": _cuda_toolkit(),
        "driver": _driver(),
        "gpus": gpus,
        "gpus_why_none": None if gpus else "no CUDA GPU is visible (torch.cuda.is_available() is False)",
        "backends": tformer.available_backends(),
        "auto": _auto_report(torch),
        "build": _build(load_record(), gpus, torch.__version__),
        "fsdp2": _fsdp2_status(),
        "libraries": {module: dict(import_status(module, dist), purpose=purpose)
                      for module, dist, purpose in OPTIONAL_LIBRARIES},
    }


def _auto_report(torch) -> dict:
    """What backend="auto" picks here and why (one sample call per op), the overrides set, and
    the self-check's verdict for the first GPU when one is cached (no check is started)."""
    from tformer.ops import auto, overrides, registry
    from tformer.ops.selftest import cache

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    verdict_path = cache.key_file(cache.device_key(device))
    verdict = cache.read(verdict_path, cache.device_key(device))
    # On a GPU without a cached verdict, asking auto would start the self-check: report instead.
    unchecked = device.type == "cuda" and overrides.selftest() and verdict is None
    choices = {}
    x = torch.empty(8, 1024, device="meta")
    q = torch.empty(4, 8, 1024, 64, device="meta")
    samples = {"attention": dict(q=q, k=q, v=q, causal=True), "layer_norm": dict(x=x), "rms_norm": dict(x=x),
               "softmax": dict(x=x)}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for op, args in samples.items():
        if unchecked:
            choices[op] = {"backend": "torch", "why": "until this device's self-check has run ('tformer selftest')"}
            continue
        try:
            order, why = auto.candidates(op, device, dtype, args)
        except Exception as error:  # noqa: BLE001 - reported, the rest of the report still prints
            order, why = (), f"{type(error).__name__}: {error}"
        chosen = next((name for name in order if registry.unavailable_reason(name) is None), None)
        choices[op] = {"backend": chosen, "why": why}
    selftest = ("off (TFORMER_SELFTEST=0)" if not overrides.selftest() else
                f"verdict cached at {verdict_path}" if verdict else
                "no verdict cached for this device yet (run 'tformer selftest')")
    return {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "choices": choices,
            "selftest": selftest, "overrides": overrides.active()}


def _status_text(status: dict) -> str:
    return (status.get("version") or "imports") if status["ok"] else f"does not import ({status['error']})"


def format_report(report: dict) -> list[str]:
    """The report as ``name: value`` lines, in a fixed order."""
    torch_info, build = report["torch"], report["build"]
    toolkit, driver = report["cuda_toolkit"], report["driver"]
    toolkit_text = f"{toolkit['nvcc']} ({toolkit['cuda_home']})" if toolkit["nvcc"] else toolkit["why_not"]
    lines = [
        f"tformer: {report['tformer']['version']} ({report['tformer']['location']})",
        f"Python: {report['python']['version']} ({report['python']['platform']})",
        f"torch: {torch_info['version']} (CUDA {torch_info['cuda'] or 'none: CPU-only build'}, "
        f"cuDNN {torch_info['cudnn'] or 'none'})",
        f"Triton: {report['triton']['version'] or report['triton']['why_not']}",
        f"CUDA toolkit: {toolkit_text}",
        f"NVIDIA driver: {driver['version'] or driver['why_not']}",
    ]
    if report["gpus"]:
        lines += [f"GPU {gpu['index']}: {gpu['name']}, compute capability {gpu['capability']}, {gpu['memory_gib']} GiB"
                  for gpu in report["gpus"]]
    else:
        lines.append(f"GPUs: none ({report['gpus_why_none']})")
    lines += [f"backend {name}: {'available' if why is None else 'unavailable: ' + why}"
              for name, why in report["backends"].items()]
    auto_info = report["auto"]
    lines += [f"auto on {auto_info['device']} {auto_info['dtype']} {op}: {choice['backend']} ({choice['why']})"
              for op, choice in auto_info["choices"].items()]
    lines.append(f"self-check: {auto_info['selftest']}")
    lines.append("overrides: " + (", ".join(f"{k}={v}" for k, v in auto_info["overrides"].items()) or "none set"))
    if build["cuda_extension"]:
        lines.append(f"CUDA extension: built for archs {';'.join(build['arch_list'])} "
                     f"against torch {build['built_against_torch']}")
    else:
        lines.append(f"CUDA extension: not built ({build['why_not']})")
    if build["torch_mismatch"]:
        lines.append(f"CUDA extension ABI: {build['torch_mismatch']}")
    if not build["cuda_extension"]:
        lines.append("CUDA extension archs cover the GPUs: no extension")
    elif not report["gpus"]:
        lines.append("CUDA extension archs cover the GPUs: no GPU visible")
    else:
        lines += [f"CUDA extension archs cover GPU {index}: "
                  + ("yes" if covered else f"no: rebuild with TORCH_CUDA_ARCH_LIST including "
                                           f"{report['gpus'][int(index)]['capability']}")
                  for index, covered in build["covers"].items()]
    libraries = report["libraries"]
    lines += [f"DeepSpeed: {_status_text(libraries['deepspeed'])}",
              f"FSDP2: {_status_text(report['fsdp2'])}",
              f"W&B: {_status_text(libraries['wandb'])}"]
    lines += [f"{module} [{status['purpose']}]: {_status_text(status)}"
              for module, status in libraries.items() if module not in ("deepspeed", "wandb")]
    return lines


def build_parser(prog: str = "tformer env") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the report as JSON (for bug reports)")
    return parser


def main(argv: list[str] | None = None, *, prog: str = "tformer env") -> int:
    args = build_parser(prog).parse_args(argv)
    report = collect()
    print(json.dumps(report, indent=2) if args.json else "\n".join(format_report(report)))
    return 0
