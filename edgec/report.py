"""`edgec report DIR`: a compiled artifact's compression and scheduling, for people.

Writes, into a new directory next to the artifact (the artifact itself stays as
verified): `policy.png` (per-layer bits and sparsity with the measured sensitivity
behind them), for a DiT compiled with token skipping `mod_ratios.png` (keep ratio per
layer and timestep region) and `keep_maps.png` (the tokens each block keeps, next to
the drawn item), and `report.html` (the per-layer table, sizes, parity, perplexity and
the kernel chosen per workload by the schedule pass).
"""

from __future__ import annotations

import html
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgec.artifact import read_manifest
from edgec.errors import BadInputError


def luc_record(manifest: dict[str, Any]) -> dict[str, Any] | None:
    for entry in manifest.get("passes", []):
        if entry["name"] == "luc":
            return dict(entry["record"])
    return None


def plot_policy(record: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = record["layers"]
    index = [row["layer"] for row in layers]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.3 * len(layers) + 3), 6), sharex=True)
    top.bar(index, [row["bits"] for row in layers], color="#4477aa")
    top.set_ylabel("weight bits")
    top.axhline(record["budget"]["bits"], color="black", linestyle="--", linewidth=1, label=f"budget {record['budget']['bits']:g}")
    top.legend(loc="upper right")
    top.set_title(title)
    bottom.bar(index, [row["measured_sparsity"] for row in layers], color="#cc6677")
    bottom.set_ylabel("sparsity")
    bottom.set_xlabel("decoder layer")
    bottom.axhline(record["budget"]["sparsity"], color="black", linestyle="--", linewidth=1)
    probe = sorted(layers[0].get("sensitivity", {}).get("bits", {}))
    lowest = next((b for b in probe if b != "8"), None)
    if lowest is not None:
        twin = top.twinx()
        twin.plot(index, [row["sensitivity"]["bits"][lowest] for row in layers], color="#222222", marker="o", markersize=3)
        twin.set_ylabel(f"loss +Δ at {lowest} bits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_mod_ratios(mod: dict[str, Any], path: Path, title: str) -> None:
    """The keep ratio of every block (rows) in every timestep region (columns, noisiest last)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ratios = np.asarray(mod["ratios"], dtype=float).T  # [layers, regions]
    fig, ax = plt.subplots(figsize=(1.2 * ratios.shape[1] + 3, 0.45 * ratios.shape[0] + 1.8))
    shown = ax.imshow(ratios, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for (layer, region), value in np.ndenumerate(ratios):
        ax.text(region, layer, f"{value:.1f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(ratios.shape[1]), [f"t {lo}-{hi - 1}" for lo, hi in mod["regions"]], fontsize=8)
    ax.set_yticks(range(ratios.shape[0]), [f"block {i}" for i in range(ratios.shape[0])], fontsize=8)
    ax.set_xlabel("timestep region (noisier to the right)")
    fig.colorbar(shown, ax=ax, label="share of tokens kept")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_keep_maps(maps: list[dict[str, Any]], mod: dict[str, Any], path: Path, title: str) -> None:
    """Per drawn sample: the image, then per timestep region (columns) and block (rows) the
    tokens that block keeps (bright) over the patch grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    regions = len(mod["regions"])
    layers = len(mod["capacities"][0])
    cols = 1 + regions
    fig, axes = plt.subplots(layers, cols * len(maps), figsize=(1.15 * cols * len(maps), 1.15 * layers + 0.8), squeeze=False)
    for m, sample in enumerate(maps):
        image = np.asarray(sample["image"], dtype=np.uint8)
        for layer in range(layers):
            first = axes[layer, m * cols]
            if layer == 0:
                first.imshow(image, cmap="gray", vmin=0, vmax=255)
                first.set_title(f"{sample['label']}", fontsize=7)
            for region in range(regions):
                ax = axes[layer, m * cols + 1 + region]
                kept = sample["kept"][region]
                if kept is not None:
                    bits = np.unpackbits(np.frombuffer(bytes.fromhex(kept[layer]), dtype=np.uint8))
                    side = int(round(len(bits) ** 0.5))
                    ax.imshow(bits[: side * side].reshape(side, side), cmap="magma", vmin=0, vmax=1)
                if layer == 0:
                    ax.set_title(f"t={sample['t'][region]}", fontsize=7)
                if region == 0 and m == 0:
                    ax.set_ylabel(f"block {layer}", fontsize=7)
        for layer in range(layers):
            for c in range(cols):
                axes[layer, m * cols + c].set_xticks([])
                axes[layer, m * cols + c].set_yticks([])
                if c == 0 and layer > 0:
                    axes[layer, m * cols].axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mod_section(section: dict[str, Any], images: list[str]) -> list[str]:
    mod = section["mod"]
    kept = sum(map(sum, mod["capacities"])) / (section["tokens"] * section["layers"] * len(mod["capacities"]))
    parts = ["<h2>Token skipping (mod)</h2>",
             f"<p>policy {html.escape(mod['policy'])}: {len(mod['regions'])} timestep region(s), {kept:.1%} of block-tokens kept "
             f"({section['tokens']} tokens per image)</p>"]
    rows = [[entry, f"{lo}-{hi - 1}", " ".join(map(str, caps))] for entry, (lo, hi), caps in zip(mod["entries"], mod["regions"], mod["capacities"])]
    parts.append(_table(["graph", "timesteps", "tokens kept per block"], rows))
    parts.extend(f'<p><img src="{html.escape(image)}" alt="{html.escape(image)}"></p>' for image in images)
    return parts


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def render_html(manifest: dict[str, Any], record: dict[str, Any] | None, image: str | None, dit_images: list[str] | None = None) -> str:
    model = manifest["model"]
    parity = manifest.get("parity", {})
    evaluation = manifest.get("evaluation") or {}
    facts = [
        ["model", model["name"]],
        ["target / backend", f"{manifest['target']['name']} / {manifest['backend']}"],
        ["artifact size", f"{manifest['size_bytes']:,} bytes"],
        ["parity", f"{parity.get('ok')} (max |diff| {_fmt(parity.get('max_abs_diff'))}, tolerance {_fmt(parity.get('tolerance'))})"],
    ]
    if "perplexity" in evaluation:
        facts.append(["held-out perplexity", f"{evaluation['perplexity']:.3f} over {evaluation['tokens']} tokens"])
    parts = [f"<h1>edgec report: {html.escape(model['name'])}</h1>", _table(["", ""], facts)]
    if record is not None:
        parts.append("<h2>Layer-wise unified compression (luc)</h2>")
        summary = [
            ["policy", record["policy"]],
            ["budget", f"{record['budget']['bits']:g} bits, sparsity {record['budget']['sparsity']:g}"
             + (f", {record['budget']['size_bytes']:,} weight bytes" if record["budget"].get("size_bytes") else "")],
            ["achieved", f"{record['achieved']['bits']:g} bits, sparsity {record['achieved']['sparsity']:g}"
             + (f", {record['achieved']['weight_bytes']:,} weight bytes" if "weight_bytes" in record["achieved"] else "")],
            ["pruning / pattern", f"{record['pruning']} / {record['pattern']}"],
            ["quantizer", f"{record.get('quantizer', 'rtn')}, group {record['group_size']}, {'symmetric' if record['symmetric'] else 'asymmetric'}"],
            ["weight bytes", f"{record['weight_bytes_before']:,} -> {record['weight_bytes_after']:,}"],
            ["sensitivity", f"{record['sensitivity_profile']['measure']} ({record['sensitivity_profile']['source']})"],
        ]
        parts.append(_table(["", ""], summary))
        if image is not None:
            parts.append(f'<p><img src="{html.escape(image)}" alt="per-layer policy"></p>')
        rows = []
        for row in record["layers"]:
            sens = row.get("sensitivity", {})
            rows.append(
                [
                    row["layer"], row["bits"], f"{row['measured_sparsity']:.3f}", f"{row['bytes']:,}",
                    " / ".join(f"{k}: {v:.4f}" for k, v in sorted(sens.get("bits", {}).items())),
                    " / ".join(f"{k}: {v:.4f}" for k, v in sorted(sens.get("sparsity", {}).items())),
                    "yes" if row.get("fixed_by_override") else "",
                ]
            )
        parts.append(_table(["layer", "bits", "sparsity", "bytes", "loss +Δ by bits", "loss +Δ by sparsity", "override"], rows))
        embeddings = record.get("embeddings", {})
        parts.append(f"<p>embedding: {html.escape(str(embeddings.get('embedding')))}; lm_head: {html.escape(str(embeddings.get('lm_head')))}</p>")
    if (manifest.get("dit") or {}).get("mod"):
        parts.extend(_mod_section(manifest["dit"], dit_images or []))
    act = next((entry["record"] for entry in manifest.get("passes", []) if entry["name"] == "act"), None)
    if act is not None:
        parts.extend(_act_section(act))
    tuning = manifest.get("backend_record", {}).get("tuning")
    if tuning:
        parts.append("<h2>Kernel choice per workload (schedule)</h2>")
        for entry, info in tuning.items():
            if not info.get("tuned"):
                parts.append(f"<p>{html.escape(entry)}: not tuned: {html.escape(info.get('reason', ''))}</p>")
                continue
            rows = [
                [k["function"], k.get("shapes", ""), k.get("source", ""), k.get("choice", {}).get("tile_rows", ""),
                 k.get("choice", {}).get("tile_vectors", ""), k.get("choice", {}).get("panel", ""),
                 k.get("template_us", ""), k.get("choice", {}).get("us", "")]
                for k in info["kernels"]
            ]
            parts.append(f"<h3>{html.escape(entry)} ({info['rows']} rows, {info['measured_now']} measured in this compile)</h3>")
            parts.append(_table(["kernel", "buffers", "source", "tile rows", "tile vectors", "panel", "template µs", "chosen µs"], rows))
    style = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>edgec report</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"


def _act_section(record: dict[str, Any]) -> list[str]:
    """The calibrated heads, the rule, and the head search's log when there was one."""
    rule = record["rule"]
    parts = ["<h2>Attention calibration (act)</h2>", _table(["", ""], [
        ["rule", f"beta {rule['beta']}, {rule['threshold_mode']} {rule['threshold']}, keep first {rule['keep_first']}, stat {rule['stat']}"],
        ["phases", " + ".join(record["phases"])],
        ["calibrated heads", record["calibrated_heads"]],
    ])]
    parts.append(_table(["layer", "heads"], [[row["layer"], ", ".join(map(str, row["heads"]))] for row in record["table"]]))
    search = record.get("search")
    if search:
        parts.append(
            f"<p>search ({html.escape(search['source'])}) on {html.escape(', '.join(search['tasks']))}, seed {search['seed']}, "
            f"{search['samples_per_task']} prompts per task: calibration accuracy {search['baseline']['accuracy']:.3f} -> "
            f"{search['calibrated']['accuracy']:.3f}; {search['candidates']} of {search['heads_with_hidden_sinks']} heads with hidden sinks tried</p>"
        )
        rows = [[r["layer"], r["head"], r["moved_mass"], r["accuracy"], r["label_nll"], "yes" if r["helps"] else ""] for r in search["per_head"]]
        parts.append(_table(["layer", "head", "moved mass", "accuracy", "label NLL", "helps"], rows))
    return parts


def write_report(artifact: Path, out: Path | None) -> dict[str, Any]:
    """Write policy.png (if the artifact was compressed by luc), the token-skipping pictures
    (a DiT compiled with mod) and report.html into `out`
    (default: DIR-report next to the artifact), replacing it whole."""
    manifest = read_manifest(artifact)
    target = out or artifact.with_name(artifact.name + "-report")
    if target.resolve() == artifact.resolve() or artifact.resolve() in target.resolve().parents:
        raise BadInputError(f"--out {target}: write the report outside the artifact (it would no longer verify)")
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        record = luc_record(manifest)
        image = None
        if record is not None and record.get("layers"):
            image = "policy.png"
            plot_policy(record, stage / image, f"{manifest['model']['name']}: luc {record['policy']}")
        dit_images = []
        section = manifest.get("dit") or {}
        if section.get("mod"):
            name = manifest["model"]["name"]
            plot_mod_ratios(section["mod"], stage / "mod_ratios.png", f"{name}: keep ratio per block and timestep region ({section['mod']['policy']})")
            dit_images.append("mod_ratios.png")
            if section.get("keep_maps"):
                plot_keep_maps(section["keep_maps"], section["mod"], stage / "keep_maps.png",
                               f"{name}: tokens each block keeps (bright), mid-step of each region, seed 0")
                dit_images.append("keep_maps.png")
        (stage / "report.html").write_text(render_html(manifest, record, image, dit_images))
        if target.exists():
            shutil.rmtree(target)
        stage.rename(target)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    files = sorted(p.name for p in target.iterdir())
    return {"report": str(target), "files": files, "luc": record is not None}
