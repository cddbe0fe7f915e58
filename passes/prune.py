"""Pruning kernels for the luc pass: Wanda (no reconstruction) and SparseGPT (OBS),
the latter optionally quantizing as it goes (GPTQ).

Both take a weight W[N, K] (rows = outputs) and calibration statistics of its input:
Wanda the per-input-channel sum of squares, SparseGPT the Gram matrix X^T X. Patterns:

- "unstructured": a fraction of each row's weights (Wanda) or of each 128-column
  block (SparseGPT, as published) is zeroed.
- "N:M": N of every M consecutive inputs of a row are kept (2:4 = 50% sparse).
- "channel": whole input columns are zeroed (the lowest total score).

They return the pruned weight; zeros are exact and the mask is `weight != 0`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from edgec.errors import BadInputError
from edgec.packing import decode_codes, group_params, padded_width, round_to_codes

PATTERNS_HELP = "unstructured, N:M (e.g. 2:4: N kept of every M) or channel"


def parse_pattern(pattern: str) -> tuple[str, int, int]:
    """("unstructured"|"nm"|"channel", N, M); N, M are 0 unless the pattern is N:M."""
    if pattern in ("unstructured", "channel"):
        return pattern, 0, 0
    found = re.fullmatch(r"(\d+):(\d+)", pattern.strip())
    if found is None or not 0 < int(found.group(1)) < int(found.group(2)):
        raise BadInputError(f"pruning pattern {pattern!r}: use {PATTERNS_HELP}")
    return "nm", int(found.group(1)), int(found.group(2))


def pattern_sparsity(pattern: str) -> float | None:
    """The sparsity an N:M pattern fixes (None: any sparsity can be asked for)."""
    kind, keep, group = parse_pattern(pattern)
    return 1.0 - keep / group if kind == "nm" else None


def _prune_lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Mask (True = prune) of the `count` lowest entries of each row of `score`."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if count > 0:
        mask.scatter_(1, torch.topk(score, count, dim=1, largest=False).indices, True)
    return mask


def _nm_mask(score: torch.Tensor, keep: int, group: int) -> torch.Tensor:
    rows, cols = score.shape
    if cols % group != 0:
        raise BadInputError(f"pattern {keep}:{group} needs input widths divisible by {group}; this layer has {cols}")
    grouped = score.reshape(rows * cols // group, group)
    return _prune_lowest(grouped, group - keep).reshape(rows, cols)


def wanda(weight: torch.Tensor, input_sq_sum: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """Zero the weights of lowest |W| x ||x_j|| (per row, per N:M group, or per column)."""
    kind, keep, group = parse_pattern(pattern)
    score = weight.abs() * input_sq_sum.sqrt()[None, :]
    rows, cols = weight.shape
    if kind == "nm":
        mask = _nm_mask(score, keep, group)
    elif kind == "channel":
        columns = _prune_lowest(score.sum(0, keepdim=True), int(cols * sparsity))
        mask = columns.expand(rows, cols)
    else:
        mask = _prune_lowest(score, int(cols * sparsity))
    return weight.masked_fill(mask, 0.0)


@dataclass(frozen=True)
class GroupQuant:
    """Quantize while reconstructing (GPTQ): group scales are fixed when the OBS sweep
    reaches each group, from the weights as updated so far."""

    bits: int
    group: int
    symmetric: bool
    offset: bool = False  # the offset grid (edgec.packing): only without pruning


@dataclass
class ObsResult:
    weight: torch.Tensor  # pruned (and, with quantization, exactly on the grid)
    params: tuple[torch.Tensor, torch.Tensor] | None  # (scale, zero) [N, K / group] if quantized
    pruned: torch.Tensor  # the mask (True = pruned); rounding may zero more weights


def sparsegpt(weight: torch.Tensor, gram: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    return obs_compress(weight, gram, sparsity, pattern).weight


def obs_compress(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float,
    pattern: str,
    quant: GroupQuant | None = None,
    fixed_mask: torch.Tensor | None = None,
    block: int = 128,
    damp: float = 0.01,
) -> ObsResult:
    """SparseGPT: choose the mask by w^2 / [H^-1]_jj^2 and update the remaining weights of
    each row to compensate (optimal brain surgeon), one column at a time, in blocks.
    With `quant`, each kept weight is also rounded to its group's grid before its error
    is spread (GPTQ), so pruning and quantization are compensated together.

    gram: X^T X over the calibration tokens, [K, K]. Channel pruning uses the same OBS
    update with a column mask chosen up front by the summed score. fixed_mask (True =
    pruned, e.g. Wanda's) replaces the mask choice: only the compensation is OBS."""
    kind, keep, group = parse_pattern(pattern)
    if fixed_mask is not None:
        kind = "fixed"
    work = weight.detach().double().clone()
    rows, cols = work.shape
    if quant is not None:
        block = max(block // quant.group, 1) * quant.group
        scales = torch.zeros(rows, padded_width(cols, quant.group) // quant.group, dtype=torch.float64)
        zeros = torch.zeros_like(scales)
    hessian = gram.double().clone()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    work[:, dead] = 0.0
    hessian += torch.eye(cols, dtype=torch.float64) * damp * torch.diag(hessian).mean()
    # Upper Cholesky factor of H^-1: row j holds the OBS update for column j.
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    column_mask: torch.Tensor | None = None
    if kind == "channel":
        score = (work**2 / torch.diag(inverse)[None, :] ** 2).sum(0, keepdim=True)
        column_mask = _prune_lowest(score, int(cols * sparsity))[0]
    for start in range(0, cols, block):
        end = min(start + block, cols)
        chunk = work[:, start:end].clone()
        inv_chunk = inverse[start:end, start:end]
        diag = torch.diag(inv_chunk)
        errors = torch.zeros_like(chunk)
        if kind == "unstructured":
            score = chunk**2 / diag[None, :] ** 2
            count = int(score.numel() * sparsity)
            mask = torch.zeros_like(score, dtype=torch.bool)
            if count > 0:
                threshold = torch.kthvalue(score.flatten(), count).values
                mask = score <= threshold
        elif kind == "channel":
            assert column_mask is not None
            mask = column_mask[start:end][None, :].expand_as(chunk).clone()
        elif kind == "fixed":
            assert fixed_mask is not None
            mask = fixed_mask[:, start:end].clone()
        else:
            mask = torch.zeros_like(chunk, dtype=torch.bool)
        scale = zero = None
        for col in range(end - start):
            if kind == "nm" and col % group == 0:
                score = chunk[:, col : col + group] ** 2 / diag[col : col + group][None, :] ** 2
                mask[:, col : col + group] = _prune_lowest(score, group - keep)
            if quant is not None and (start + col) % quant.group == 0:
                span = slice(col, col + quant.group)
                if kind == "nm":  # the group's N:M masks first, so its scale sees only kept weights
                    for sub in range(col + group, col + quant.group, group):
                        score = chunk[:, sub : sub + group] ** 2 / diag[sub : sub + group][None, :] ** 2
                        mask[:, sub : sub + group] = _prune_lowest(score, group - keep)
                kept_group = chunk[:, span].masked_fill(mask[:, span], 0.0)
                scale, zero = group_params(kept_group.float()[:, None, :], quant.bits, quant.symmetric, quant.offset)
                scale, zero = scale[:, 0].double(), zero[:, 0].double()
                scales[:, (start + col) // quant.group] = scale
                zeros[:, (start + col) // quant.group] = zero
            original = chunk[:, col]
            kept = original.masked_fill(mask[:, col], 0.0)
            if quant is not None:
                assert scale is not None and zero is not None
                codes = round_to_codes(kept, scale, zero, quant.bits, quant.symmetric, quant.offset)
                kept = decode_codes(codes, scale, zero, quant.offset).masked_fill(mask[:, col], 0.0)
            error = (original - kept) / inv_chunk[col, col]
            chunk[:, col:] -= error[:, None] * inv_chunk[col, col:][None, :]
            chunk[:, col] = kept
            errors[:, col] = error
        work[:, start:end] = chunk
        work[:, end:] -= errors @ inverse[start:end, end:]
        pruned[:, start:end] = mask
    params = None if quant is None else (scales.float(), zeros.float())
    return ObsResult(work.to(weight.dtype), params, pruned)
