"""``ftt-delta info``: what a delta folder holds and how well it reconstructs Δ."""

from __future__ import annotations

import math
from pathlib import Path

from mergekit_ftt.card import format_bytes
from mergekit_ftt.delta.format import DeltaConfig, DeltaFolder
from mergekit_ftt.modules import module_kind


def describe(delta: DeltaConfig, path: str | Path) -> dict:
    """The facts ``ftt-delta info`` prints, as JSON-ready data."""
    elements = sum(math.prod(info.shape) for info in delta.tensors.values())
    corrections = sum(info.corrections for info in delta.tensors.values())
    folder = Path(path)
    total_error = math.sqrt(sum(i.error**2 for i in delta.tensors.values()))
    total_norm = math.sqrt(sum(i.norm**2 for i in delta.tensors.values()))
    return {
        "path": str(folder),
        "format_version": delta.format_version,
        "created_by": delta.created_by,
        "finetuned": delta.finetuned.model_dump(),
        "base": delta.base.model_dump(),
        "architecture": {"model_type": delta.model_type, "architectures": delta.architectures},
        "encoding": delta.encoding.model_dump(exclude_none=True),
        "tensors": len(delta.tensors),
        "elements": elements,
        "exact_corrections": corrections,
        "stored_bytes": delta.stored_bytes,
        "bytes_per_element": delta.stored_bytes / elements if elements else 0.0,
        "files": len(delta.files),
        "config_sha256": delta.config_sha256,
        "vocabulary": delta.vocabulary.model_dump(),
        "tokenizer": (folder / "tokenizer_config.json").exists(),
        "chat_template": _has_chat_template(folder),
        "generation_config": (folder / "generation_config.json").exists(),
        "relative_error": total_error / total_norm if total_norm else 0.0,
        "modules": [
            {
                "module": module,
                "kind": module_kind(module),
                "tensors": count,
                "relative_error": error,
            }
            for module, count, error in delta.module_errors()
        ],
        "per_tensor": {
            name: {
                "shape": info.shape,
                "stored": {s or "(dense)": c.dtype for s, c in info.components.items()},
                "corrections": info.corrections,
                "full_rows": len(info.full_rows),
                "relative_error": info.relative_error,
            }
            for name, info in delta.tensors.items()
        },
    }


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    config = folder / "tokenizer_config.json"
    return config.exists() and '"chat_template"' in config.read_text(encoding="utf-8")


def render(facts: dict, per_tensor: bool = False) -> str:
    """The human-readable report."""
    encoding = facts["encoding"]
    kind = encoding["kind"]
    if kind == "dense":
        stored = f"dense {encoding['dtype']}, " + (
            f"exact: {facts['exact_corrections']:,} elements "
            f"({facts['exact_corrections'] / max(facts['elements'], 1):.3%}) stored exactly beside "
            "the rounded tensors"
            if encoding.get("exact")
            else "rounded (no exact corrections)"
        )
    elif kind == "sparse":
        method = "DARE (random)" if encoding["method"] == "random" else "magnitude"
        stored = (
            f"sparse {method} through mergekit's sparsify, density {encoding['density']:g}, "
            f"rescale {'on' if encoding.get('rescale') else 'off'}, {encoding['dtype']} values"
        )
    else:
        stored = (
            f"1-bit sign, a float32 scale per {encoding['scale']}, decoded as {encoding['dtype']}"
        )
    vocabulary = facts["vocabulary"]
    added = vocabulary["added_tokens"]
    lines = [
        f"{facts['path']}: fine-tuning delta, format version {facts['format_version']} "
        f"({facts['created_by']})",
        f"  fine-tuned   {_source(facts['finetuned'])}",
        f"  base         {_source(facts['base'])}",
        f"  architecture {facts['architecture']['model_type']} "
        f"({', '.join(facts['architecture']['architectures'])}), {facts['tensors']} tensors, "
        f"{facts['elements']:,} elements",
        f"  stored as    {stored}",
        f"  size         {format_bytes(facts['stored_bytes'])} in {facts['files']} file(s), "
        f"{facts['bytes_per_element']:.3f} bytes per element",
        "  integrity    sha256 of every file; of delta_config.json: "
        + (
            f"{facts['config_sha256'][:16]}…"
            if facts["config_sha256"]
            else "not recorded (extracted by an older mergekit-ftt; extract again to cover it)"
        ),
        "  vocabulary   "
        + (
            f"{len(added)} tokens only the fine-tuned model has, stored as full rows: "
            + ", ".join(added[:6])
            + (" …" if len(added) > 6 else "")
            if added
            else f"rows aligned by {vocabulary['aligned_by']}, no added tokens"
        ),
        "  tokenizer    "
        + ", ".join(
            f"{label} {'yes' if facts[key] else 'no'}"
            for label, key in (
                ("tokenizer", "tokenizer"),
                ("chat template", "chat_template"),
                ("generation config", "generation_config"),
            )
        ),
        f"  relative reconstruction error ‖decoded − Δ‖/‖Δ‖: {facts['relative_error']:.4g} overall",
        "",
        "| module | kind | tensors | relative error |",
        "|---|---|---:|---:|",
        *(
            f"| {m['module']} | {m['kind']} | {m['tensors']} | {m['relative_error']:.4g} |"
            for m in facts["modules"]
        ),
    ]
    if per_tensor:
        lines += [
            "",
            "| tensor | shape | stored | exact corrections | full rows | relative error |",
        ]
        lines.append("|---|---|---|---:|---:|---:|")
        for name, entry in facts["per_tensor"].items():
            stored_as = ", ".join(f"{s} {d}" for s, d in entry["stored"].items())
            lines.append(
                f"| {name} | {entry['shape']} | {stored_as} | {entry['corrections']} | "
                f"{entry['full_rows']} | {entry['relative_error']:.4g} |"
            )
    return "\n".join(lines)


def _source(source: dict) -> str:
    parts = [source["model"]]
    if source.get("revision"):
        parts.append(f"@{source['revision']}")
    if source.get("commit"):
        parts.append(f"commit {source['commit']}")
    parts.append(source["dtype"])
    if source.get("weights_sha256"):
        parts.append(f"weights sha256 {source['weights_sha256'][:16]}…")
    return ", ".join(parts)


def open_and_describe(path: str | Path, verify: bool) -> dict:
    folder = DeltaFolder(path)
    folder.check_files(hashes=verify, remembered=False)
    return describe(folder.config, path)
