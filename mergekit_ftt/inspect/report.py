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
    for role, entry in tensors["inputs"].items():
        if entry["read_under_another_name"]:
            lines.append(
                f"                 {role}: {', '.join(entry['read_under_another_name'])} (tied)"
            )
        if entry["not_merged"]["count"]:
            lines.append(
                f"                 {role}: {entry['not_merged']['count']} tensor(s) the merge does "
                f"not read, e.g. {', '.join(entry['not_merged']['examples'])}"
            )
    lines += _vocabulary(compatibility["vocabulary"])
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


def _vocabulary(vocabulary: dict) -> list[str]:
    sizes = vocabulary["sizes"]
    pairs = vocabulary["pairs"]
    if len(set(sizes.values())) == 1 and all(
        p["same_id"] == p["shared"] == next(iter(sizes.values())) for p in pairs
    ):
        return [
            f"  vocabulary     {next(iter(sizes.values()))} tokens, the same at the same ids in every input"
        ]
    lines = [f"  vocabulary     {', '.join(f'{role} {n}' for role, n in sizes.items())} tokens"]
    for pair in pairs:
        first, second = pair["models"]
        lines.append(
            f"                 {first} / {second}: {pair['shared']} shared by string "
            f"({pair['same_id']} at the same id), {pair[f'only_in_{first}']['count']} only in "
            f"{first}, {pair[f'only_in_{second}']['count']} only in {second}"
        )
    if vocabulary["missing_tokenizer"]:
        lines.append(
            f"                 no tokenizer found for {', '.join(vocabulary['missing_tokenizer'])}"
        )
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
        f"Verdict: {_score(verdict)} ({verdict['level']}). {verdict['sentence']}",
        f"  {verdict['evidence']}",
    ]
    return "\n".join(lines)


def _score(verdict: dict) -> str:
    """The score with its uncertainty (the calibration's error on held-out seeds)."""
    if verdict["value"] is None:
        return f"{verdict['score']:.2f}"
    return f"{verdict['score']:.2f} ± {verdict['uncertainty']:.2f}"


PLOT_FORMATS = (".png", ".svg", ".pdf")


def figure(report: dict):
    """Per layer: ‖Δ‖ and ‖D‖; their ratio for the layer, its attention and its MLP, against
    the verdict's three bands; cos(Δ, D) on a fixed −1..1 axis. Whole-model values dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = report["statistics"]["layers"]
    model = report["statistics"]["model"]
    verdict = report["verdict"]
    x = [entry["layer"] for entry in layers]

    def series(key: str, kind: str | None = None) -> list:
        source = layers if kind is None else [e["module_kinds"].get(kind, {}) for e in layers]
        return [entry.get(key) for entry in source]

    fig, (norms, ratio, cosine) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    norms.plot(x, series("delta_norm"), "o-", label="‖Δ‖ (the delta)")
    norms.plot(x, series("gap_norm"), "s-", label="‖D‖ (target − source base)")
    norms.set_yscale("log")
    norms.set_ylabel("Frobenius norm")
    norms.legend()
    ratio.plot(x, series("gap_to_delta"), "o-", color="black", label="layer")
    ratio.plot(x, series("gap_to_delta", "attention"), ".--", color="tab:blue", label="attention")
    ratio.plot(x, series("gap_to_delta", "mlp"), ".--", color="tab:orange", label="MLP")
    limits = verdict["thresholds"]
    ratio.axhspan(0, limits["likely_below"], color="tab:green", alpha=0.12, label="likely")
    ratio.axhspan(
        limits["likely_below"],
        limits["unlikely_above"],
        color="tab:olive",
        alpha=0.10,
        label="partial",
    )
    ratio.axhspan(
        limits["unlikely_above"],
        max(limits["unlikely_above"], *[v or 0 for v in series("gap_to_delta")]) * 1.2,
        color="tab:red",
        alpha=0.10,
        label="unlikely",
    )
    if model["gap_to_delta"] is not None:
        ratio.axhline(model["gap_to_delta"], ls=":", color="black", lw=1, label="whole model")
    ratio.set_ylabel("‖D‖ / ‖Δ‖")
    ratio.legend(fontsize="small", ncol=3)
    cosine.plot(x, series("cosine"), "o-", color="tab:green", label="layer")
    if model["cosine"] is not None:
        cosine.axhline(model["cosine"], ls=":", color="tab:green", lw=1, label="whole model")
    cosine.axhline(0, color="grey", lw=0.5)
    # Fixed limits: cosines near 1e-3 would otherwise autoscale into what looks like a trend.
    cosine.set_ylim(-1, 1)
    cosine.set_ylabel("cos(Δ, D)")
    cosine.set_xlabel("layer")
    cosine.legend(fontsize="small")
    cosine.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(
        f"ftt-inspect: {report['recipe'] or ''}\nverdict {_score(verdict)} "
        f"({verdict['level']}; thresholds calibrated on the miniature Table 3)"
    )
    fig.tight_layout()
    return fig


def plot(report: dict, path: str | Path) -> Path:
    """:func:`figure`, written to ``path`` in the format its suffix names (PLOT_FORMATS)."""
    import matplotlib.pyplot as plt

    fig = figure(report)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
