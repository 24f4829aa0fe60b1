"""What ``ftt-inspect`` shows: a terminal table from the report dictionary, and a PNG of
the per-layer statistics. The dictionary itself is the JSON (keys: docs/inspect.md)."""

from __future__ import annotations

from pathlib import Path

# (key, header) of the statistics the terminal table shows; the JSON has all of them.
COLUMNS = (
    ("delta_norm", "‖Δ‖"),
    ("gap_norm", "‖D‖"),
    ("gap_to_delta", "‖D‖/‖Δ‖"),
    ("cosine", "cos(Δ,D)"),
    ("relative_gap", "‖D‖/‖M_s‖"),
)


def _number(value: float | None) -> str:
    if value is None:
        return "–"
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.3e}"


def statistics_table(statistics: dict) -> str:
    """Markdown-style table: whole model, module kinds, then layers."""
    rows = [("model", statistics["model"])]
    rows += [(kind, stats) for kind, stats in statistics["module_kinds"].items()]
    rows += [(f"layer {entry['layer']}", entry) for entry in statistics["layers"]]
    header = ["part", *(title for _, title in COLUMNS)]
    body = [[label, *(_number(stats[key]) for key, _ in COLUMNS)] for label, stats in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0])]
        padded += [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join(padded) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), separator, *map(line, body)])


def _models(report: dict) -> list[str]:
    models = report["models"]
    lines = [
        f"  target            {models['target']}",
        f"  source base       {models['source_base']}",
    ]
    for entry in models["source_finetuned"]:
        weight = entry["weight"]
        if isinstance(weight, dict):  # per tensor (gradients, filters)
            weight = f"{min(weight.values()):g} to {max(weight.values()):g} over the tensors"
        lines.append(f"  source finetuned  {entry['model']}  (weight α {weight})")
    return lines


def _compatibility(compatibility: dict) -> list[str]:
    lines = []
    architectures = compatibility["architecture"]
    first = next(iter(architectures.values()))
    lines.append(
        f"  architecture   {first['model_type']} ({', '.join(first['architectures'])}), "
        f"{first['layers']} layers, hidden size {first['hidden_size']}: same in every input"
    )
    tensors = compatibility["tensors"]
    dtypes = "; ".join(
        f"{role} " + ", ".join(f"{d} ×{n}" for d, n in entry["stored_dtypes"].items())
        for role, entry in tensors["inputs"].items()
    )
    lines.append(f"  tensors        {tensors['count']} merged; stored {dtypes}")
    lines.append(f"  merge dtype    {compatibility['merge_dtype'] or 'inputs’ own'}")
    vocabulary = compatibility["vocabulary"]
    sizes = ", ".join(f"{role} {n}" for role, n in vocabulary["sizes"].items())
    lines.append(f"  vocabulary     {sizes} tokens")
    for pair in vocabulary["pairs"]:
        first_role, second_role = pair["models"]
        lines.append(
            f"                 {first_role} / {second_role}: {pair['shared']} shared by string "
            f"({pair['same_id']} at the same id), {pair[f'only_in_{first_role}']['count']} "
            f"only in {first_role}, {pair[f'only_in_{second_role}']['count']} only in {second_role}"
        )
    chat = compatibility["chat"]
    template = chat["chat_template"]
    described = "none" if not template else f"{len(template)} characters"
    lines.append(
        f"  chat template  {described}, from {chat['chat_template_from']}; end of turn: "
        f"{', '.join(map(str, chat['end_of_turn_tokens'])) or 'none'}"
    )
    for note in compatibility["notes"]:
        lines.append(f"  note: {note}")
    return lines


def format_report(report: dict) -> str:
    """The terminal report: models, compatibility, statistics table, verdict."""
    verdict = report["verdict"]
    lines = [
        f"ftt-inspect: {report['recipe'] or 'recipe'}",
        *_models(report),
        "",
        "Compatibility",
        *_compatibility(report["compatibility"]),
        "",
        "Weight-space statistics: Δ = Σ α·(FT − M_s) (the delta the merge adds), "
        "D = M_t − M_s (target minus source base)",
        statistics_table(report["statistics"]),
        "",
        f"Verdict: {verdict['score']:.2f} ({verdict['level']}). {verdict['sentence']}",
        f"  {verdict['evidence']}",
    ]
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> Path:
    """Per-layer ‖Δ‖ and ‖D‖, their ratio and cos(Δ, D), with the whole-model values dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["statistics"]["layers"]
    model = report["statistics"]["model"]
    x = [entry["layer"] for entry in layers]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True)
    norms, ratio, cosine = axes
    norms.plot(x, [e["delta_norm"] for e in layers], "o-", label="‖Δ‖ (delta)")
    norms.plot(x, [e["gap_norm"] for e in layers], "s-", label="‖D‖ (target − source base)")
    norms.set_yscale("log")
    norms.set_ylabel("Frobenius norm")
    norms.legend()
    ratio.plot(x, [e["gap_to_delta"] for e in layers], "o-", color="tab:red")
    if model["gap_to_delta"] is not None:
        ratio.axhline(model["gap_to_delta"], ls="--", color="tab:red", lw=1, label="whole model")
        ratio.legend()
    ratio.set_ylabel("‖D‖ / ‖Δ‖")
    cosine.plot(x, [e["cosine"] for e in layers], "o-", color="tab:green")
    if model["cosine"] is not None:
        cosine.axhline(model["cosine"], ls="--", color="tab:green", lw=1, label="whole model")
        cosine.legend()
    cosine.axhline(0, color="grey", lw=0.5)
    cosine.set_ylabel("cos(Δ, D)")
    cosine.set_xlabel("layer")
    verdict = report["verdict"]
    fig.suptitle(
        f"ftt-inspect: {report['recipe'] or ''}\nverdict {verdict['score']:.2f} ({verdict['level']})"
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
