"""`edgec report DIR`: a compiled artifact's compression and scheduling, for people.

Writes, into a new directory next to the artifact (the artifact itself stays as
verified): `policy.png` (per-layer bits and sparsity with the measured sensitivity
behind them) and `report.html` (the per-layer table, sizes, parity, perplexity and the
kernel chosen per workload by the schedule pass).
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


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def render_html(manifest: dict[str, Any], record: dict[str, Any] | None, image: str | None) -> str:
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
    """Write policy.png (if the artifact was compressed by luc) and report.html into `out`
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
        (stage / "report.html").write_text(render_html(manifest, record, image))
        if target.exists():
            shutil.rmtree(target)
        stage.rename(target)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    files = sorted(p.name for p in target.iterdir())
    return {"report": str(target), "files": files, "luc": record is not None}
