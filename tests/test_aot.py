"""GPU readiness without a GPU: every fused kernel compiled for real NVIDIA targets, judged by its machine code.

The compile matrix (every spec of ``bench.aot.harness.spec_modules()`` x every dtype x sm_75 ... sm_120,
plus one unaligned strided view in float32) is built once per session in worker processes and cached
under ``$FASTVAE_AOT_CACHE`` (``~/.cache/fastvae-aot``), so a second run reads it back.
"""
from __future__ import annotations

import os
import textwrap

import pytest
import torch

from bench.aot import harness as aot

VECTOR_DTYPES = ("float16", "bfloat16", "float32")
VECTOR_MIN_TARGET = 86


@pytest.fixture(scope="module")
def results() -> list[aot.Result]:
    return aot.compile_matrix(aot.TARGETS, aot.DTYPES, workers=min(4, os.cpu_count() or 1))


def _compiled(results):
    return [r for r in results if r.error is None]


def _named(rows, detail) -> str:
    return "\n".join(f"{r.label}: {detail(r)}" for r in rows)


def test_every_kernel_compiles_for_every_target_and_dtype(results):
    aot.check_compiled(results)  # names kernel, dtype, layout and target of each failure
    done = {(r.module, r.spec, r.dtype, r.layout, r.target) for r in _compiled(results)}
    expected = {(j["module"], j["spec"], j["dtype"], j["layout"], t) for j in aot.jobs() for t in j["targets"]}
    assert {t for j in aot.jobs() if j["layout"] == "aligned" for t in j["targets"]} == set(aot.TARGETS)
    assert expected <= done, f"missing from the compile matrix: {sorted(expected - done)}"
    assert {j["dtype"] for j in aot.jobs()} == {"float16", "bfloat16", "float32", "float64"}


def test_no_spills_on_any_target(results):
    spilled = [r for r in _compiled(results) if r.spill_stores or r.spill_loads]
    assert not spilled, "register spills:\n" + _named(
        spilled, lambda r: f"{r.registers} registers, {r.spill_stores} B spill stores, {r.spill_loads} B spill loads")


def test_aligned_inputs_get_128_bit_global_loads_and_stores(results):
    """On sm_86 and above, the 128-bit accesses carry all the elementwise traffic of aligned fp16/bf16/fp32."""
    rows = [r for r in _compiled(results)
            if r.layout == "aligned" and r.dtype in VECTOR_DTYPES and r.target >= VECTOR_MIN_TARGET]
    assert rows
    narrow = [r for r in rows if not (r.vector_bytes_cover("loads") and r.vector_bytes_cover("stores"))]
    assert not narrow, "elementwise traffic not in 128-bit accesses:\n" + _named(
        narrow, lambda r: f"loads {r.loads}, stores {r.stores} by width, {r.reads} tensors read and {r.writes} "
                          f"written, {r.elements_per_thread:g} elements per thread")


def test_unaligned_strided_view_is_specialized_like_the_jit(results):
    """The strided variant has no 16-byte divisibility to rely on, so no 128-bit loads: the AOT compile
    sees the same pointer and stride specializations as the JIT would (were every pointer assumed
    aligned, this would fail, and the aligned figures would mean nothing)."""
    strided = [r for r in _compiled(results) if r.layout == "strided"]
    assert strided
    vectorized = [r for r in strided if r.loads.get(128, 0)]
    assert not vectorized, _named(vectorized, lambda r: f"loads {r.loads}")


def test_global_addresses_use_64_bit_arithmetic(results):
    narrow = [r for r in _compiled(results) if r.int32_address_ops]
    assert not narrow, "32-bit index arithmetic on the way to a global address:\n" + _named(
        narrow, lambda r: "; ".join(r.int32_address_ops[:3]))


def test_machine_code_figures_are_plausible(results):
    for r in _compiled(results):
        assert 0 < r.registers <= 255, r.label
        assert r.sass_instructions > 0 and r.loads and r.stores, r.label
        assert r.elements_per_thread > 0, r.label
        assert 0 < r.resident_warps() <= 64, r.label


CONTROL = '''
import torch
import triton
import triton.language as tl

from bench.aot.harness import Spec


@triton.jit
def int32_offsets_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32: wraps past 2**31 elements
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


@triton.jit
def fp8_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(tl.float8e4nv).to(tl.float32), mask=mask)


def _pair(dtype, aligned):
    x = torch.randn(4096, dtype=dtype)
    return x, torch.empty_like(x)


def _launcher(kernel):
    return lambda x, y: kernel[(4,)](x, y, x.numel(), BLOCK=1024)


AOT_SPECS = [
    Spec("int32_copy", "forward", "control", _pair, _launcher(int32_offsets_kernel),
         traffic={"int32_offsets_kernel": (1, 1)}, tile=("BLOCK",), dtypes=(torch.float32,)),
    Spec("fp8_roundtrip", "forward", "control", _pair, _launcher(fp8_kernel),
         traffic={"fp8_kernel": (1, 1)}, tile=("BLOCK",), dtypes=(torch.float32,)),
]
'''


def test_the_checks_catch_what_they_look_for(tmp_path, monkeypatch):
    """Control kernels with known defects: int32 offsets are flagged in the PTX, and a kernel that does
    not compile for one target (fp8e4nv needs sm_89) fails the check with that target named."""
    (tmp_path / "aot_control_kernels.py").write_text(textwrap.dedent(CONTROL))
    monkeypatch.setenv("FASTVAE_AOT_CACHE", str(tmp_path / "cache"))
    results = aot.compile_matrix((80, 89), (torch.float32,), modules=["aot_control_kernels"], strided_dtypes=(),
                                 extra_path=[tmp_path], workers=1)
    by = {(r.kernel, r.target): r for r in results}
    assert set(by) == {(k, t) for k in ("int32_offsets_kernel", "fp8_kernel") for t in (80, 89)}
    assert all(by["int32_offsets_kernel", t].int32_address_ops for t in (80, 89))
    assert by["int32_offsets_kernel", 89].loads == {128: 2}  # 1024 floats / 128 threads = two LDG.128
    assert not by["fp8_kernel", 89].int32_address_ops and by["fp8_kernel", 89].error is None
    with pytest.raises(aot.CompileErrors) as failed:
        aot.check_compiled(results)
    message = str(failed.value)
    assert "1 of 4 compiles failed" in message
    assert "fp8_kernel (fp8_roundtrip forward) float32 aligned sm_80" in message
    assert "not supported in this architecture" in message


def test_parsers_on_known_text():
    sass = """
        /*0070*/                   LDG.E.128 R4, [R2.64] ;
        /*0080*/              @!P0 LDG.E.64 R8, [R2.64+0x10] ;
        /*0090*/                   LDG.E.CONSTANT R9, [R6.64] ;
        /*00a0*/                   STG.E.U16 [R10.64], R11 ;
        /*00b0*/                   NOP ;
        /*00c0*/                   EXIT ;
    """
    assert aot.parse_sass(sass) == {"instructions": 5, "loads": {128: 1, 64: 1, 32: 1}, "stores": {16: 1}}
    log = ("ptxas info    : Function properties for k\n"
           "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 96 registers, used 0 barriers")
    assert aot.parse_ptxas_log(log) == {"registers": 96, "stack": 8, "spill_stores": 4, "spill_loads": 12}
    with pytest.raises(ValueError, match="registers"):
        aot.parse_ptxas_log("no report")


def test_bad_arguments_are_rejected_before_any_work():
    with pytest.raises(ValueError, match="targets"):
        aot.compile_matrix((70,))
    with pytest.raises(ValueError, match="targets"):
        aot.compile_matrix(())
    with pytest.raises(ValueError, match="workers"):
        aot.compile_matrix(workers=0)
    with pytest.raises(ValueError, match="AOT_SPECS"):
        aot.compile_matrix(modules=["fastvae.reference"])


# --------------------------------------------------------------------------------------------------
# The cost model on paper and the static table (bench/static.py)
# --------------------------------------------------------------------------------------------------
def test_traffic_counter_counts_each_intermediate_written_and_read_again():
    from bench.static import count_traffic

    a = torch.randn(1000, device="meta", requires_grad=True)
    b = torch.randn(1000, device="meta")
    launches = count_traffic(lambda a, b: ((a * b + a).sum(),), (a, b), "forward")
    assert [(launch.name, launch.read, launch.written) for launch in launches] == [
        ("mul", 8000, 4000), ("add", 8000, 4000), ("sum", 4000, 4)]
    noise = count_traffic(lambda a: (torch.randn_like(a).expand(3, 1000).exp(),), (a,), "forward")
    assert [(launch.name, launch.read, launch.written) for launch in noise] == [
        ("randn_like", 0, 4000), ("exp", 4000, 12000)]


def test_cost_model_fused_side_matches_the_kernels(results):
    """The model's fused reparameterize_kl: one Triton launch per pass, and the memset of the forward's
    workspace (as ``count_launches`` counts on the real op), reading mu and logvar and writing z (12 B per
    float32 element) forward, five tensors backward."""
    import fastvae
    from bench.static import cost_model
    from fastvae.kernels import count_launches

    rows = {(r.op, r.mode): r for r in cost_model(results)}
    forward, backward = rows["reparameterize_kl", "forward"], rows["reparameterize_kl", "backward"]
    assert forward.per_element(forward.fused) == pytest.approx(12.0, rel=1e-4)  # + the seed and the KL
    assert backward.per_element(backward.fused) == pytest.approx(20.0, rel=1e-4)
    assert forward.eager.launches > forward.fused.launches and forward.eager.bytes > 5 * forward.fused.bytes

    mu = torch.randn(64, 16, requires_grad=True)
    logvar = torch.randn(64, 16, requires_grad=True)
    with fastvae.use_backend("triton"), count_launches() as fwd:
        z, kl = fastvae.reparameterize_kl(mu, logvar)
    with fastvae.use_backend("triton"), count_launches() as bwd:
        torch.autograd.grad((z, kl), (mu, logvar), (torch.ones_like(z), torch.ones_like(kl)))
    # the batchmean KL takes a ticket on a zeroed workspace: a memset beside the kernel, counted by both
    # the model counts the memset and the seed's randint beside the kernel; count_launches the memset and the kernel
    assert sum(fwd.values()) == forward.fused.launches_triton + fwd["zero_fill"] and fwd["zero_fill"] == 1
    assert forward.fused.launches == forward.fused.launches_triton + fwd["zero_fill"] + 1
    assert sum(bwd.values()) == backward.fused.launches == backward.fused.launches_triton


def test_write_static_table(results, tmp_path):
    from bench.static import write_static_table

    text = write_static_table(tmp_path / "static.md")
    assert (tmp_path / "static.md").read_text() == text
    for kernel in {r.kernel for r in results}:
        assert f"`{kernel}`" in text
    for target in aot.TARGETS:
        assert f"sm_{target}" in text
    assert "predictions, not measurements" in text and "RTX 4090" in text and "no GPU run yet" in text


def test_measured_gpu_rows_are_shown_beside_the_predictions(results, tmp_path):
    from bench.measure import Row
    from bench.report import write_csv
    from bench.static import cost_model, measured_rows, model_table

    rows = [dict(device="cuda-nvidia-geforce-rtx-4090", op="reparameterize_kl", case="B=16384 D=64", mode="forward",
                 provider=provider, median_ms=ms) for provider, ms in (("eager", 0.150), ("fused", 0.020))]
    write_csv(tmp_path / "cuda-nvidia-geforce-rtx-4090.csv", rows, Row.columns())
    table = "\n".join(model_table(cost_model(results), measured_rows(tmp_path)))
    line = next(row for row in table.splitlines() if row.startswith("| reparameterize_kl | B=16384 D=64 | forward |"))
    assert line.endswith("| cuda-nvidia-geforce-rtx-4090: 150 / 20 us (7.5x) |")


def test_the_short_last_batch_reuses_the_compiled_kernels():
    """Batches of 128, 100 and 37 rows select the same compiled kernel of every op (the JIT's
    specialization key: options, signature, constexprs and attributes), so the short last batch of an
    epoch compiles nothing new. Checked on the real JIT in a process without the interpreter."""
    code = textwrap.dedent(
        """
        import torch
        import fastvae
        from bench.aot import harness as aot
        from fastvae.kernels import balanced_mse, moments, reparameterize

        def keys(n):
            mu, logvar = torch.randn(2, n, 16).unbind(0)
            x_hat, x = torch.rand(2, n, 784).unbind(0)
            z = torch.randn(n, 16)
            with aot._captured_launches() as launches:
                reparameterize.forward(mu, logvar, torch.zeros(1, dtype=torch.int64), "batchmean")
                reparameterize.backward(mu, torch.ones(1), mu, logvar, torch.zeros(1, dtype=torch.int64), "batchmean")
                balanced_mse.forward(x_hat, x, torch.ones(()), "batchmean", False, "min-ema", 0.99)
                balanced_mse.backward(torch.ones(1), x_hat, x, torch.ones(()), "batchmean", True, False)
                moments.moments(z[None])
                moments.moments_backward(torch.ones(16), torch.ones(16), z[None], torch.zeros(16))
            return [(k.__name__, repr(aot._specialize(k, 89, a, kw)[:4])) for k, _, a, kw in launches]

        full = keys(128)
        for n in (100, 37):
            for (name, key), (_, other) in zip(full, keys(n)):
                assert key == other, f"{name}: batch {n} selects another compiled kernel than batch 128"
        print("same", len(full))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same 6" in result.stdout


def test_training_step_launches_are_all_counted():
    """One training step's launches (bench/static.py): ATen kernels, the 4 Triton kernels of the two fused
    ops and their 2 workspace memsets; the running-MSE update adds no ATen op."""
    from bench.static import training_step_launches

    step = training_step_launches()
    assert (step.triton, step.memsets) == (4, 2)
    assert step.total == step.aten + 6 and step.aten == sum(step.aten_names.values())
    assert {"addmm", "mm"} <= set(step.aten_names)
    assert not {"clone", "minimum", "copy_"} & set(step.aten_names), step.aten_names
