"""Ahead-of-time compilation of every fused kernel for real NVIDIA targets, on a machine without a GPU,
and what its machine code says: registers, spills, shared memory, access widths, instruction counts.

A spec module (``bench/aot/<op>.py``, one per kernel module of ``fastvae.kernels``) lists the launches
worth compiling in ``AOT_SPECS``: a ``Spec`` names the op, the pass (forward or backward), the constexpr
variant in words, a function that builds typical inputs for a dtype and a layout, and a function that
calls the kernel module's launcher on them. The launch is captured (never run),
so the arguments, tile and ``num_warps`` are exactly the launcher's, and Triton's own JIT binder turns them
into the signature and specializations the JIT would choose (16-byte pointer divisibility, integers
divisible by 16, unit strides folded into constants). ``triton.compile`` then builds PTX and a cubin for
each ``GPUTarget("cuda", capability, 32)``; ``ptxas -v`` gives registers and spills, ``cuobjdump -sass``
the instructions.

Layouts: ``aligned`` (contiguous tensors from the allocator, the training case) in every dtype for every
target, and ``strided`` (an unaligned strided view, e.g. ``logvar`` as the second half of ``h.chunk(2, -1)``
with odd D) once per kernel: float32 for sm_89.

Compiles run in worker processes without ``TRITON_INTERPRET`` (the kernels of an interpreted process are
not compilable), and their results are cached under ``$FASTVAE_AOT_CACHE`` (default
``~/.cache/fastvae-aot``), keyed by the sources of the spec module, the kernel modules it launches, this
file, the job and the Triton version.

    python -m bench.aot         # compile all, one line per kernel and target
    python -m bench.static      # the same, written to bench/results/static.md
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import triton

TARGETS: tuple[int, ...] = (75, 80, 86, 89, 90, 120)
"""Compute capabilities every kernel is compiled for: Turing, A100, RTX 30, RTX 40 / L4, H100, RTX 50."""
TARGET_NAMES = {75: "Turing (T4, RTX 20)", 80: "A100", 86: "RTX 30 / A10", 89: "RTX 40 / L4", 90: "H100", 120: "RTX 50"}
DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
STRIDED_DTYPES: tuple[torch.dtype, ...] = (torch.float32,)
STRIDED_TARGETS: tuple[int, ...] = (89,)
"""The unaligned strided view is compiled once per kernel: float32, sm_89."""


def spec_modules() -> tuple[str, ...]:
    """The modules whose ``AOT_SPECS`` are compiled: those the declared ops name (``fastvae.ops.ALL``, each
    op's ``aot``), in the order declared, each once."""
    from fastvae.ops import ALL

    return tuple(dict.fromkeys(op.aot for op in ALL.values() if op.aot))


_REPO = Path(__file__).resolve().parents[2]
"""The checkout that holds ``bench/``: the compile workers import this file from it."""

LATENT_SHAPE = (16384, 64)
"""Typical latents ``(B, D)``: the shape the aligned variants are specialized for."""
LATENT_SHAPE_ODD = (16384, 33)
"""Latents with odd D: the halves of ``h.chunk(2, -1)`` are then unaligned views with an odd row stride."""
IMAGE_SHAPE = (128, 3, 64, 64)
"""Typical reconstructions ``(N, C, H, W)``, seen by the kernels as ``(N, C*H*W)``."""
BATCH_SHAPE = (100_000, 64)
"""Typical latents of a whole data set ``(N, D)``, reduced over N by the moments kernels."""

_WARP = 32
_MAX_REGS_PER_SM = 65536
_MAX_WARPS_PER_SM = {75: 32, 80: 64, 86: 48, 89: 48, 90: 64, 100: 64, 120: 48}


# --------------------------------------------------------------------------------------------------
# What a kernel module declares
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Spec:
    """One launcher call that CI compiles for every target and dtype.

    ``inputs(dtype, aligned)`` returns the launcher's tensor arguments at a typical size;
    ``launch(*inputs)`` calls the launcher (its kernel launches are captured, not run). ``traffic`` maps
    the name of each kernel the launcher launches to ``(reads, writes)``: the full-size tensors it reads
    and writes per element of the op's main input (broadcast gradients, scalars and per-program partials
    excluded). It is the fused side of the cost model and what the 128-bit access check covers.
    ``tile`` names the constexprs whose product is the elements one program handles in one pass (those
    a kernel lacks are left out: a finish kernel's tile is its ``BLOCK_C x BLOCK_D``). ``memsets``: the
    workspace zero fills the launcher issues besides its kernels (launches, but not Triton ones).
    """

    op: str
    pass_: str
    variant: str
    inputs: Callable[[torch.dtype, bool], tuple]
    launch: Callable[..., Any]
    traffic: dict[str, tuple[int, int]]
    tile: tuple[str, ...] = ("BLOCK_R", "BLOCK_C", "BLOCK_D")
    dtypes: tuple[torch.dtype, ...] = DTYPES
    tag: str = ""
    memsets: int = 0

    @property
    def name(self) -> str:
        """``op.pass`` (``op.pass.tag`` when an op has several specs for one pass)."""
        return ".".join(filter(None, (self.op, self.pass_, self.tag)))


def latent_pair(dtype: torch.dtype, aligned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu, logvar)``: two contiguous ``LATENT_SHAPE`` tensors, or strided views: ``mu`` the first half
    of an encoder output ``h`` of shape ``(B, 2 * 33)`` (rows 66 elements apart) and ``logvar`` a
    column-major ``(B, 33)`` view (the transpose of a contiguous ``(33, B)``: column stride ``B``), so
    that a column offset computed in 32 bits shows on an address path."""
    if aligned:
        return torch.randn(LATENT_SHAPE, dtype=dtype), torch.randn(LATENT_SHAPE, dtype=dtype)
    B, D = LATENT_SHAPE_ODD
    mu = torch.randn(B, 2 * D, dtype=dtype)[:, :D]
    logvar = torch.randn(D, B + 1, dtype=dtype)[:, 1:].t()  # unaligned too: starts one element in
    return mu, logvar


def image_pair(dtype: torch.dtype, aligned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_hat, x)`` as ``(N, C*H*W)`` rows of ``IMAGE_SHAPE``: contiguous, or views that start one
    element into a buffer with one spare column (unaligned pointer, odd row stride)."""
    N, M = IMAGE_SHAPE[0], math.prod(IMAGE_SHAPE[1:])
    if aligned:
        return torch.randn(N, M, dtype=dtype), torch.randn(N, M, dtype=dtype)
    return torch.randn(N, M + 1, dtype=dtype)[:, 1:], torch.randn(N, M + 1, dtype=dtype)[:, 1:]


def batch_slab(dtype: torch.dtype, aligned: bool) -> tuple[torch.Tensor]:
    """``(z,)`` as the ``(1, N, D)`` view the moments kernels take: contiguous ``BATCH_SHAPE``, or the
    second half of an ``(N, 2 * 33)`` encoder output."""
    N, D = BATCH_SHAPE
    if aligned:
        return (torch.randn(N, D, dtype=dtype)[None],)
    return (torch.randn(N, 66, dtype=dtype)[:, 33:][None],)


def batch_pair(dtype: torch.dtype, aligned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu, logvar)`` as two ``(1, N, D)`` views for the variance law: two contiguous ``BATCH_SHAPE``
    tensors, or the first half of an ``(N, 2 * 33)`` encoder output and a column-major ``(N, 33)`` view."""
    N, D = BATCH_SHAPE
    if aligned:
        return torch.randn(N, D, dtype=dtype)[None], torch.randn(N, D, dtype=dtype)[None]
    mu = torch.randn(N, 66, dtype=dtype)[:, :33]
    logvar = torch.randn(33, N + 1, dtype=dtype)[:, 1:].t()
    return mu[None], logvar[None]


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    """The machine-code figures of one kernel compiled for one dtype, layout and target.

    ``loads`` / ``stores``: global loads and stores (SASS ``LDG`` / ``STG``) by access width in bits.
    ``elements_per_thread``: elements one thread handles in one pass over its tile.
    ``int32_address_ops``: PTX instructions that scale a program-id or argument-derived index in 32 bits
    on the way to a global address (an offset that overflows past 2**31); empty when addressing is 64-bit.
    """

    module: str
    spec: str
    op: str
    pass_: str
    variant: str
    dtype: str
    layout: str
    target: int
    kernel: str = "?"
    error: str | None = None
    num_warps: int = 0
    elements_per_thread: float = 0.0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    loads: dict[int, int] = dataclasses.field(default_factory=dict)
    stores: dict[int, int] = dataclasses.field(default_factory=dict)
    sass_instructions: int = 0
    int32_address_ops: list[str] = dataclasses.field(default_factory=list)
    reads: int = 0
    writes: int = 0
    compile_s: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.kernel} ({self.op} {self.pass_}) {self.dtype} {self.layout} sm_{self.target}"

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def vector_share(self, kind: str) -> tuple[int, int]:
        """``(128-bit accesses, all accesses)`` for ``kind`` ``"loads"`` or ``"stores"``."""
        counts = getattr(self, kind)
        return counts.get(128, 0), sum(counts.values())

    def vector_bytes_cover(self, kind: str) -> bool:
        """True when the 128-bit accesses carry at least the elementwise traffic of one pass:
        ``16 * n_128 >= tensors * element_size * elements_per_thread``."""
        tensors = self.reads if kind == "loads" else self.writes
        needed = tensors * self.element_size * self.elements_per_thread
        return 16 * getattr(self, kind).get(128, 0) >= needed

    def sass_per_element(self) -> float:
        """Static SASS instructions over the elements a thread handles in one pass (loops counted once)."""
        return self.sass_instructions / self.elements_per_thread if self.elements_per_thread else float("nan")

    def resident_warps(self) -> int:
        """Warps per SM that the register file allows for this kernel's blocks (whole blocks, capped by
        the architecture's limit): the occupancy ceiling that registers set."""
        per_warp = math.ceil(self.registers * _WARP / 256) * 256
        blocks = (_MAX_REGS_PER_SM // per_warp) // self.num_warps if per_warp else 0
        return min(blocks * self.num_warps, _MAX_WARPS_PER_SM.get(self.target, 48))

    @classmethod
    def from_json(cls, data: dict) -> "Result":
        data = dict(data)
        data["loads"] = {int(k): v for k, v in data.get("loads", {}).items()}
        data["stores"] = {int(k): v for k, v in data.get("stores", {}).items()}
        return cls(**data)


class CompileErrors(AssertionError):
    """Kernels that failed to compile, each named with its dtype, layout and target."""


def failures(results: Sequence[Result]) -> list[Result]:
    return [r for r in results if r.error is not None]


# --------------------------------------------------------------------------------------------------
# Machine code parsing
# --------------------------------------------------------------------------------------------------
_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)[^;]*;")
_WIDTHS = {"128": 128, "64": 64, "U8": 8, "S8": 8, "U16": 16, "S16": 16}


def parse_sass(sass: str) -> dict[str, Any]:
    """Counts from ``cuobjdump -sass`` text: ``instructions`` (NOPs excluded) and global ``loads`` /
    ``stores`` (``LDG`` / ``STG``) by access width in bits (32 when no width modifier)."""
    loads: dict[int, int] = {}
    stores: dict[int, int] = {}
    n = 0
    for match in _SASS_LINE.finditer(sass):
        opcode, *mods = match.group(1).split(".")
        if opcode == "NOP":
            continue
        n += 1
        if opcode in ("LDG", "STG"):
            width = next((_WIDTHS[m] for m in mods if m in _WIDTHS), 32)
            counts = loads if opcode == "LDG" else stores
            counts[width] = counts.get(width, 0) + 1
    return {"instructions": n, "loads": loads, "stores": stores}


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Registers, stack frame and spill bytes from ``ptxas -v`` output."""
    def grab(pattern: str) -> int:
        match = re.search(pattern, log)
        if match is None:
            raise ValueError(f"ptxas -v output has no match for {pattern!r}:\n{log}")
        return int(match.group(1))

    return {
        "registers": grab(r"Used (\d+) registers"),
        "stack": grab(r"(\d+) bytes stack frame"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
    }


_PTX_INSTRUCTION = re.compile(r"^\s*(?:@!?%p\w+\s+)?([a-z][\w.:]*)\s*(.*?);\s*$")
_PTX_REGISTER = re.compile(r"%[a-z]+\d+|%ctaid\.[xyz]")
_FLOAT_TYPES = {"f16", "f16x2", "bf16", "bf16x2", "f32", "f64"}
_NARROW_SCALING = re.compile(r"^(mul\.lo|mad\.lo|mul24\.lo|mad24\.lo)\.[su]32$|^shl\.b32$")
_MEMORY = ("ld.global", "st.global", "atom.global", "red.global")


def _split_operands(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def int32_address_ops(ptx: str) -> list[str]:
    """PTX instructions that can overflow a global address offset past 2**31.

    An offset overflows when an index that grows with the problem (derived from ``%ctaid`` or from an
    integer kernel argument) is multiplied or shifted in 32 bits before it is widened. Returns each
    32-bit ``mul.lo`` / ``mad.lo`` / ``shl.b32`` that takes such an index and lies on the def-use path
    to the address of a global load, store or atomic. Taint stops at values of floating-point type
    (random bits turned into floats no longer index anything). A quotient multiplied back by its own
    divisor (``a - (a / n) * n``, how a remainder is lowered) is bounded by the dividend and passes.
    """
    instructions = []
    for line in ptx.splitlines():
        line = line.split("//")[0]
        match = _PTX_INSTRUCTION.match(line)
        if match is None or line.lstrip().startswith("."):
            continue
        opcode, operands = match.group(1), _split_operands(match.group(2))
        if opcode.startswith(("st.", "red.", "bar", "bra", "ret", "membar", "fence", "exit")) or not operands:
            dests, sources = [], operands
        else:
            dests, sources = operands[:1], operands[1:]
        instructions.append((opcode, [r for d in dests for r in _PTX_REGISTER.findall(d)],
                             [r for s in sources for r in _PTX_REGISTER.findall(s)], line.strip(),
                             [r for s in operands if s.startswith("[") for r in _PTX_REGISTER.findall(s)]))

    defs: dict[str, list[int]] = {}
    quotients: dict[str, str] = {}  # quotient register -> its divisor
    for i, (opcode, dests, sources, _, _) in enumerate(instructions):
        for reg in dests:
            defs.setdefault(reg, []).append(i)
        if opcode.startswith("div.") and len(dests) == 1 and len(sources) == 2:
            quotients[dests[0]] = sources[1]

    def remainder_product(sources: list[str]) -> bool:
        return len(sources) >= 2 and (quotients.get(sources[0]) == sources[1]
                                      or quotients.get(sources[1]) == sources[0])

    def float_dest(opcode: str) -> bool:
        types = [t for t in opcode.split(".")[1:] if re.fullmatch(r"[bsuf]\d+(x2)?|bf16(x2)?|pred", t)]
        if opcode.startswith("cvt"):
            return bool(types) and types[0] in _FLOAT_TYPES
        return any(t in _FLOAT_TYPES for t in types)

    tainted: set[str] = set()
    changed = True
    while changed:
        changed = False
        for opcode, dests, sources, _, _ in instructions:
            if float_dest(opcode):
                continue
            source = opcode.startswith("ld.param") or any(r.startswith("%ctaid") or r in tainted for r in sources)
            for reg in dests:
                if source and reg not in tainted:
                    tainted.add(reg)
                    changed = True

    on_address_path: set[int] = set()
    stack = [reg for opcode, _, _, _, address in instructions if opcode.startswith(_MEMORY) for reg in address]
    seen: set[str] = set()
    while stack:
        reg = stack.pop()
        if reg in seen:
            continue
        seen.add(reg)
        for i in defs.get(reg, []):
            on_address_path.add(i)
            stack.extend(instructions[i][2])

    return [instructions[i][3] for i in sorted(on_address_path)
            if _NARROW_SCALING.match(instructions[i][0]) and not remainder_product(instructions[i][2])
            and any(r in tainted or r.startswith("%ctaid") for r in instructions[i][2])]


# --------------------------------------------------------------------------------------------------
# The worker: capture launches, compile them, measure
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _captured_launches():
    """Make ``kernel[grid](*args, **kwargs)`` record ``(kernel, grid, args, kwargs)`` instead of running
    (the way Triton's own compile warm-up captures launches)."""
    from triton.runtime.jit import KernelInterface

    launches: list[tuple] = []
    previous = KernelInterface.__getitem__
    KernelInterface.__getitem__ = (
        lambda kernel, grid: lambda *args, **kwargs: launches.append((kernel, grid, args, kwargs))
    )
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = previous


def _specialize(kernel, target: int, args: tuple, kwargs: dict):
    """``(options, signature, constexprs, attrs, bound_args)`` as the JIT derives them for ``target``."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)  # as JITFunction.run completes them
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # Triton >= 3.9; 3.8 has no such option
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    backend = make_backend(GPUTarget("cuda", target, _WARP))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, options, bound, specialization, options)
    return options, signature, constexprs, attrs, bound


def _disassemble(cubin: bytes) -> str:
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], check=True, capture_output=True,
                              text=True).stdout


def _compile_one(kernel, target: int, args: tuple, kwargs: dict, spec: Spec) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    options, signature, constexprs, attrs, bound = _specialize(kernel, target, args, kwargs)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):  # ptxas -v output (TRITON_DUMP_PTXAS_LOG) and error reports
        compiled = triton_compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", target, _WARP), options=options.__dict__)
    seconds = time.perf_counter() - start
    sass = parse_sass(_disassemble(compiled.asm["cubin"]))
    tile = math.prod(int(bound[name]) for name in spec.tile if name in bound)
    return {
        "kernel": compiled.metadata.name,
        "num_warps": compiled.metadata.num_warps,
        "shared": compiled.metadata.shared,
        "elements_per_thread": tile / (compiled.metadata.num_warps * _WARP),
        **parse_ptxas_log(log.getvalue()),
        "loads": sass["loads"],
        "stores": sass["stores"],
        "sass_instructions": sass["instructions"],
        "int32_address_ops": int32_address_ops(compiled.asm["ptx"]),
        "compile_s": round(seconds, 3),
    }


_compiled_here: dict[tuple, dict] = {}  # a worker compiles a kernel specialization once, whatever spec launched it


def _run_job(job: dict) -> list[dict]:
    """Compile one ``(module, spec, dtype, layout)`` for each of ``job["targets"]``; one record per
    kernel the launcher launches and target. Failures become records with ``error`` set."""
    module = importlib.import_module(job["module"])
    spec = next(s for s in module.AOT_SPECS if s.name == job["spec"])
    dtype = getattr(torch, job["dtype"])
    base = {"module": job["module"], "spec": spec.name, "op": spec.op, "pass_": spec.pass_, "variant": spec.variant,
            "dtype": job["dtype"], "layout": job["layout"]}
    try:
        with _captured_launches() as launches:
            spec.launch(*spec.inputs(dtype, job["layout"] == "aligned"))
        if not launches:
            raise RuntimeError(f"{spec.name}: the launcher launched no kernel")
    except Exception as error:  # noqa: BLE001 - reported per target, with the error text
        return [{**base, "target": t, "error": f"launch capture failed: {error!r}"} for t in job["targets"]]
    records = []
    for kernel, _grid, args, kwargs in launches:
        for target in job["targets"]:
            name = getattr(kernel, "__name__", "?")
            record = {**base, "target": target, "kernel": name}
            try:
                if name not in spec.traffic:
                    raise KeyError(f"{spec.name}: launched {name}, which its traffic does not list")
                record["reads"], record["writes"] = spec.traffic[name]
                if not isinstance(kernel, triton.runtime.jit.JITFunction):
                    raise TypeError(f"{record['kernel']} is a {type(kernel).__name__}, not a JITFunction "
                                    "(TRITON_INTERPRET must be unset in the compile worker)")
                key = (kernel.cache_key, target, repr(_specialize(kernel, target, args, kwargs)[:4]), spec.tile)
                if key not in _compiled_here:
                    _compiled_here[key] = _compile_one(kernel, target, args, kwargs, spec)
                record.update(_compiled_here[key])
            except Exception as error:  # noqa: BLE001
                record["error"] = f"{type(error).__name__}: {str(error).strip()[-2000:]}"
            records.append(record)
    return records


def _worker_main(jobs_path: str, results_path: str) -> None:
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # ptxas must run for its -v report
    results = []
    for job in json.loads(Path(jobs_path).read_text()):
        results.extend(_run_job(job))
    Path(results_path).write_text(json.dumps(results))


# --------------------------------------------------------------------------------------------------
# The driver: jobs, cache, worker processes
# --------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$FASTVAE_AOT_CACHE``, else ``$XDG_CACHE_HOME/fastvae-aot`` (``~/.cache/fastvae-aot``)."""
    if os.environ.get("FASTVAE_AOT_CACHE"):
        return Path(os.environ["FASTVAE_AOT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastvae-aot"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_KERNEL_IMPORT = re.compile(r"fastvae\.kernels\.(\w+)|from fastvae\.kernels import (\w+)|from \.(\w+) import")


def _kernel_sources(source: str) -> list[Path]:
    """The files of ``fastvae.kernels`` that ``source`` imports (``fastvae.kernels.x``, ``from
    fastvae.kernels import x``), and those that they import in turn (``from .x import``)."""
    kernels = Path(importlib.util.find_spec("fastvae.kernels").origin).parent
    found: set[Path] = set()
    pending = [source]
    while pending:
        for groups in _KERNEL_IMPORT.findall(pending.pop()):
            path = kernels / f"{next(n for n in groups if n)}.py"
            if path.exists() and path not in found:
                found.add(path)
                pending.append(path.read_text())
    return sorted(found)


def _sources_digest(module: str) -> str:
    """A digest of the sources that can change the compiles of ``module``'s specs: the module, the
    kernel modules it launches and theirs (``_launch``), this file and Triton's version."""
    digest = hashlib.sha256(triton.__version__.encode())
    origin = Path(importlib.util.find_spec(module).origin)
    files = [origin, Path(__file__)] + _kernel_sources(origin.read_text())
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def jobs(modules: Sequence[str] | None = None, dtypes: Sequence[torch.dtype] = DTYPES,
         targets: Sequence[int] = TARGETS, strided_dtypes: Sequence[torch.dtype] = STRIDED_DTYPES,
         strided_targets: Sequence[int] = STRIDED_TARGETS) -> list[dict]:
    """The compile matrix: one job per ``(module, spec, dtype, layout)`` with the targets it is compiled for
    (``modules``: default ``spec_modules()``)."""
    out = []
    for name in (spec_modules() if modules is None else modules):
        specs = getattr(importlib.import_module(name), "AOT_SPECS", None)
        if specs is None:
            raise ValueError(f"modules: {name} has no AOT_SPECS list")
        for spec in specs:
            for dtype in spec.dtypes:
                job = {"module": name, "spec": spec.name, "dtype": _dtype_name(dtype)}
                if dtype in dtypes:
                    out.append({**job, "layout": "aligned", "targets": list(targets)})
                strided = [t for t in targets if t in strided_targets]
                if dtype in strided_dtypes and strided:
                    out.append({**job, "layout": "strided", "targets": strided})
    return out


def compile_matrix(
    targets: Sequence[int] = TARGETS,
    dtypes: Sequence[torch.dtype] = DTYPES,
    *,
    modules: Sequence[str] | None = None,
    strided_dtypes: Sequence[torch.dtype] = STRIDED_DTYPES,
    strided_targets: Sequence[int] = STRIDED_TARGETS,
    workers: int = 2,
    extra_path: Sequence[str | os.PathLike] = (),
    use_cache: bool = True,
) -> list[Result]:
    """Compile every spec of ``modules`` for every target and dtype; one ``Result`` per kernel, dtype,
    layout and target, failures included (``error`` set, never cached).

    ``workers``: compile processes run side by side. ``extra_path``: directories prepended to the
    workers' ``PYTHONPATH`` (for spec modules outside the package).
    """
    if not targets:
        raise ValueError("targets must name at least one compute capability")
    for target in targets:
        if not isinstance(target, int) or target < 75:
            raise ValueError(f"targets: {target!r} is not a compute capability >= 75 (e.g. 86 for sm_86)")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    for path in extra_path:
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    modules = spec_modules() if modules is None else modules
    matrix = jobs(modules, dtypes, targets, strided_dtypes, strided_targets)
    digests = {name: _sources_digest(name) for name in modules}
    directory = cache_dir()
    results: list[Result] = []
    pending: dict[tuple, dict] = {}
    for job in matrix:
        targets_of_job = job.pop("targets")
        for target in targets_of_job:
            key = hashlib.sha256(json.dumps([digests[job["module"]], job, target], sort_keys=True).encode()).hexdigest()
            path = directory / f"{key}.json"
            if use_cache and path.exists():
                results.extend(Result.from_json(r) for r in json.loads(path.read_text()))
            else:
                unit = pending.setdefault(tuple(sorted(job.items())), {**job, "targets": [], "keys": {}})
                unit["targets"].append(target)
                unit["keys"][target] = path
    if pending:
        records = _run_workers(list(pending.values()), workers, extra_path)
        for unit in pending.values():
            for target in unit["targets"]:
                mine = [r for r in records if r["target"] == target and r["module"] == unit["module"]
                        and r["spec"] == unit["spec"] and r["dtype"] == unit["dtype"] and r["layout"] == unit["layout"]]
                if mine and use_cache and not any(r.get("error") for r in mine):
                    with contextlib.suppress(OSError):  # a read-only cache only costs time
                        directory.mkdir(parents=True, exist_ok=True)
                        unit["keys"][target].write_text(json.dumps(mine))
        results.extend(Result.from_json(r) for r in records)
    order = {t: i for i, t in enumerate(targets)}
    results.sort(key=lambda r: (r.module, r.op, r.pass_, r.kernel, r.layout, r.dtype, order.get(r.target, 0)))
    return results


def _run_workers(units: list[dict], workers: int, extra_path: Sequence) -> list[dict]:
    """Run the compile units in ``workers`` processes without TRITON_INTERPRET; the records they write."""
    # Units of one module, dtype and layout go to one worker, which then compiles a kernel specialization
    # that several specs launch only once; groups are dealt out greedily by number of compiles.
    groups: dict[tuple, list[dict]] = {}
    for unit in units:
        groups.setdefault((unit["module"], unit["dtype"], unit["layout"]), []).append(unit)
    shares: list[list[dict]] = [[] for _ in range(min(workers, len(groups)))]
    size = lambda group: sum(len(u["targets"]) for u in group)  # noqa: E731
    for group in sorted(groups.values(), key=size, reverse=True):
        min(shares, key=lambda share: size(share)).extend(group)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    env["TRITON_DISABLE_LINE_INFO"] = "1"  # same machine code, a third of the cubin to disassemble
    env["PYTHONPATH"] = os.pathsep.join([*map(str, extra_path), str(_REPO), *filter(None, [env.get("PYTHONPATH")])])
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fastvae-aot-") as tmp:
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton")
        procs = []
        for i, share in enumerate(shares):
            jobs_path, results_path = Path(tmp) / f"jobs{i}.json", Path(tmp) / f"results{i}.json"
            jobs_path.write_text(json.dumps([{k: v for k, v in u.items() if k != "keys"} for u in share]))
            code = (f"from bench.aot.harness import _worker_main; "
                    f"_worker_main({str(jobs_path)!r}, {str(results_path)!r})")
            procs.append((subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True), results_path, share))
        for proc, results_path, share in procs:
            output, _ = proc.communicate()
            if proc.returncode != 0 or not results_path.exists():
                message = f"compile worker exited with {proc.returncode}:\n{output[-4000:]}"
                records.extend({"module": u["module"], "spec": u["spec"], "op": u["spec"].split(".")[0],
                                "pass_": u["spec"].split(".")[1], "variant": "?", "dtype": u["dtype"],
                                "layout": u["layout"], "target": t, "error": message}
                               for u in share for t in u["targets"])
            else:
                records.extend(json.loads(results_path.read_text()))
    return records


def error_summary(error: str) -> str:
    """The first and last lines of a compile error (Triton puts the source excerpt between them)."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"


def check_compiled(results: Sequence[Result]) -> None:
    """Raise ``CompileErrors`` naming every kernel, dtype, layout and target that failed to compile."""
    failed = failures(results)
    if failed:
        lines = [f"{r.label}: {error_summary(r.error or '')}" for r in failed]
        raise CompileErrors(f"{len(failed)} of {len(results)} compiles failed:\n" + "\n".join(lines))


def main(argv: Sequence[str] | None = None) -> None:
    """Compile everything and print one line per kernel, dtype, layout and target."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=int, action="append", help="compute capability (repeatable); default: all")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    results = compile_matrix(tuple(args.target or TARGETS), workers=args.workers)
    for r in results:
        if r.error:
            print(f"FAIL {r.label}: {error_summary(r.error)}")
            continue
        v_ld, n_ld = r.vector_share("loads")
        v_st, n_st = r.vector_share("stores")
        print(f"{r.label}: {r.registers} regs, spills {r.spill_stores}/{r.spill_loads} B, shared {r.shared} B, "
              f"128-bit loads {v_ld}/{n_ld}, stores {v_st}/{n_st}, {r.sass_per_element():.1f} SASS/element")
    check_compiled(results)

