"""``describe_machine(device)``: what produced a measurement, as a dict: the CPU (model, the ISA flags that decide
fast paths, cores) or the GPU (name, compute capability), torch's threads, and the versions of torch, Triton and
Python. Benchmarks record it beside every result and the auto-precision cache keys its decisions by it, so that
numbers and choices of different machines are never mixed up.
"""
from __future__ import annotations

import os
import platform
import re

__all__ = ["describe_machine", "machine_label", "machine_slug", "ISA_FLAGS"]

# the /proc/cpuinfo flags that change which code is fast: vector width, bf16 dot products, AMX tiles
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16",
             "amx_int8", "asimd", "sve", "bf16")


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, [flag for flag in ISA_FLAGS if flag in flags]


def describe_machine(device: str = "cpu") -> dict:
    """``{"kind", "name", "isa", "cores", "torch_threads", "torch", "triton", "python"}`` for ``device``
    (``cpu`` or ``cuda[:k]``); ``isa`` lists the flags of ``ISA_FLAGS`` this CPU has (for a GPU: its compute
    capability)."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any failure to import Triton means "no Triton" here
        triton_version = None
    described = {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
                 "torch_threads": torch.get_num_threads()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        return {"kind": "cuda", "name": torch.cuda.get_device_name(index), "isa": [f"sm_{major}{minor}"],
                "cores": torch.cuda.get_device_properties(index).multi_processor_count, **described}
    model, isa = _cpuinfo()
    return {"kind": "cpu", "name": model, "isa": isa, "cores": os.cpu_count() or 1, **described}


def machine_label(described: dict) -> str:
    """One line for a report: ``AMD EPYC (avx512f, avx512_bf16; 2 cores, 2 torch threads); torch 2.13.0+cpu,
    triton 3.9.0, Python 3.11.7``."""
    units = "SMs" if described["kind"] == "cuda" else "cores"
    versions = [f"torch {described['torch']}", f"triton {described['triton']}" if described["triton"] else "no triton",
                f"Python {described['python']}"]
    return (f"{described['name']} ({', '.join(described['isa']) or 'no listed ISA flags'}; {described['cores']} "
            f"{units}, {described['torch_threads']} torch threads); " + ", ".join(versions))


def machine_slug(described: dict) -> str:
    """A file-name part that tells machines apart: ``amd-epyc-avx512-bf16-2c`` (name, the widest bf16/AMX flag
    or vector width, cores)."""
    isa = described["isa"]
    widest = next((flag for flag in ("amx_bf16", "avx512_bf16", "avx512f", "avx2", "sve", "asimd") if flag in isa),
                  isa[0] if isa else "base")
    name = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*$", "", described["name"].lower())
    words = re.sub(r"[^a-z0-9]+", "-", f"{name} {widest.replace('_', '-')}").strip("-")
    return f"{words}-{described['cores']}{'sm' if described['kind'] == 'cuda' else 'c'}"
