"""The integer dot-product kernels (targets/tvm_dot.py) against numpy: every weight grid
(offset, integer zero point, symmetric) at 4 and 8 bits, the tile layout and the
embedding read from it; which targets get which instruction."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import te

from edgec.targets.registry import host_mcpu
from edgec.targets.tvm_dot import ARM_DOTPROD, AVX512_VNNI, dot_isa, fits, qembedding_tiles_te, qlinear_dot_func, tiles_te
from tests.conftest import parallel_bodies

HOST = tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu(), "num-cores": 2})
RPI5 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod"]})
GROUP, OUTPUTS, INPUTS, ROWS = 32, 48, 128, 3


def test_the_dot_product_is_taken_from_the_targets_own_features() -> None:
    assert dot_isa(RPI5) == ARM_DOTPROD
    no_dotprod = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]})
    assert dot_isa(no_dotprod) is None
    assert dot_isa(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"})) is None
    assert dot_isa(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"})) == AVX512_VNNI
    # A whole number of tiles, groups and 4-input slots, or the float kernel.
    assert fits(AVX512_VNNI, 4, 32, 576, 1536) and not fits(AVX512_VNNI, 4, 32, 576, 688)
    assert not fits(AVX512_VNNI, 4, 32, 200, 576) and not fits(AVX512_VNNI, 3, 32, 576, 576)
    assert fits(ARM_DOTPROD, 8, 4, 12, 64) and not fits(ARM_DOTPROD, 4, 4, 12, 64)


def _packed(codes: np.ndarray, bits: int) -> np.ndarray:
    """edgec.packing's plane: at 4 bits the even input in the low nibble."""
    return codes if bits == 8 else (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def _weights(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int) -> np.ndarray:
    scale = np.repeat(scales.T.astype(np.float32), GROUP, axis=1)
    if zeros is not None and zeros.dtype == np.float16:
        return codes * scale + np.repeat(zeros.T.astype(np.float32), GROUP, axis=1)
    zero = 2.0 ** (bits - 1) if zeros is None else np.repeat(zeros.T.astype(np.float32), GROUP, axis=1)
    return (codes.astype(np.float32) - zero) * scale


def _tile_order(values: np.ndarray, lanes: int) -> np.ndarray:
    """[K / group, N] -> [N / lanes, K / group, lanes]."""
    groups, outputs = values.shape
    return np.ascontiguousarray(values.reshape(groups, outputs // lanes, lanes).transpose(1, 0, 2))


@pytest.mark.skipif(dot_isa(HOST) is None, reason="the host CPU has no AVX-512 VNNI (the arm64 kernels: test_deploy_qemu.py)")
@pytest.mark.parametrize(("bits", "grid"), [(4, "offset"), (4, "zero point"), (4, "symmetric"), (8, "zero point"), (8, "symmetric")])
def test_dot_kernel_and_embedding_match_numpy(bits: int, grid: str) -> None:
    isa = dot_isa(HOST)
    assert isa is not None
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, (OUTPUTS, INPUTS), dtype=np.uint8)
    scales = (rng.random((INPUTS // GROUP, OUTPUTS)) * 0.01 + 0.001).astype(np.float16)
    zeros = {"offset": (-rng.random(scales.shape) * 0.08).astype(np.float16),
             "zero point": rng.integers(0, 1 << bits, scales.shape, dtype=np.uint8), "symmetric": None}[grid]
    weights = _weights(codes, scales, zeros, bits)
    device = tvm.cpu()

    plane = te.placeholder(_packed(codes, bits).shape, "uint8")
    tiles_func = te.create_prim_func([plane, tiles_te(plane, bits, isa)]).with_attr("global_symbol", "tiles")
    tiles = tvm.runtime.empty((OUTPUTS // isa.lanes, INPUTS // (8 if bits == 4 else 4), isa.lanes * 4), "uint8", device)
    tvm.compile(tiles_func, target=HOST)(tvm.runtime.tensor(_packed(codes, bits), device), tiles)
    # Lane l of a tile row holds 4 consecutive inputs of output l (module doc of tvm_dot).
    first = tiles.numpy()[0, 0, :4]
    expected = codes[0, :4] | (codes[0, 4:8] << 4) if bits == 4 else codes[0, :4]
    np.testing.assert_array_equal(first, expected)

    # The kernel and the embedding read scales and zeros in tile order (tvm_dot.scale_tiles).
    params = [tvm.runtime.tensor(_tile_order(scales, isa.lanes), device),
              tvm.runtime.tensor(_tile_order(scales if zeros is None else zeros, isa.lanes), device)]
    kernel = qlinear_dot_func(isa, bits, GROUP, OUTPUTS, INPUTS, "float16", None if zeros is None else str(zeros.dtype))
    library = tvm.compile(tvm.IRModule({"dot": kernel.with_attr("global_symbol", "dot")}), target=HOST)
    x = rng.standard_normal((ROWS, INPUTS)).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((ROWS, OUTPUTS), np.float32), device)
    library["dot"](tvm.runtime.tensor(x, device), tiles, *params, y)
    want = x @ weights.T
    # int8 inputs per group of 32: within about 1% of the output's scale, not exact.
    error = np.abs(y.numpy() - want).max() / np.abs(want).max()
    assert error < 0.02, error
    # The products run in the parallel tasks, which make no workspace-pool call (a named
    # value in TVMScript would be one per task).
    tasks = parallel_bodies(library.mod.inspect_source("asm"))
    assert "vpdpbusd" in tasks and "TVMBackendAllocWorkspace" not in tasks

    ids = te.placeholder((2,), "int64")
    scale_in = te.placeholder(params[0].shape, "float16")
    zeros_in = None if zeros is None else te.placeholder(params[1].shape, str(zeros.dtype))
    table = te.placeholder(tiles.shape, "uint8")
    rows = qembedding_tiles_te(ids, table, scale_in, zeros_in, bits, GROUP, isa)
    gather = tvm.compile(te.create_prim_func([ids, table, scale_in, *([zeros_in] if zeros_in is not None else []), rows])
                         .with_attr("global_symbol", "gather"), target=HOST)
    out = tvm.runtime.tensor(np.zeros((2, INPUTS), np.float32), device)
    gather(tvm.runtime.tensor(np.array([5, OUTPUTS - 1]), device), tiles, *params[: 1 if zeros is None else 2], out)
    np.testing.assert_allclose(out.numpy(), weights[[5, OUTPUTS - 1]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_arm64_kernel_multiplies_with_sdot(bits: int) -> None:
    kernel = qlinear_dot_func(ARM_DOTPROD, bits, GROUP, OUTPUTS, INPUTS, "float16", "uint8")
    listing = tvm.compile(tvm.IRModule({"dot": kernel.with_attr("global_symbol", "dot")}), target=RPI5).mod.inspect_source("asm")
    assert re.search(r"\bsdot\s+v\d+\.4s, v\d+\.16b, v\d+\.16b", listing)
