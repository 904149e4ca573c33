"""``--dtype auto``: bfloat16 only where it is computed natively (else torch emulates it, ~6x slower
on this project's CPUs), always for the mock engine and CUDA."""

from __future__ import annotations

from tandem.engine.config import EngineConfig, cpu_has_native_bf16, resolve_auto_dtype

AMD_NO_BF16 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
XEON_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


def test_cpu_flags() -> None:
    assert not cpu_has_native_bf16(AMD_NO_BF16)
    assert cpu_has_native_bf16(XEON_BF16)
    assert cpu_has_native_bf16(ARM_BF16)
    assert not cpu_has_native_bf16("")


def test_auto_resolution() -> None:
    assert resolve_auto_dtype("model", "cpu", AMD_NO_BF16) == "float32"
    assert resolve_auto_dtype("model", "cpu", XEON_BF16) == "bfloat16"
    assert resolve_auto_dtype("model", "cuda:0", AMD_NO_BF16) == "bfloat16"
    assert resolve_auto_dtype("mock", "cpu", AMD_NO_BF16) == "bfloat16"


def test_engine_config_resolves_auto_and_keeps_explicit() -> None:
    assert EngineConfig().dtype in ("bfloat16", "float32")
    assert EngineConfig(engine="mock").dtype == "bfloat16"
    assert EngineConfig(dtype="bfloat16").dtype == "bfloat16"
    assert EngineConfig(dtype="float32", engine="mock").dtype == "float32"
