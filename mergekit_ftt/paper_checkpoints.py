"""The OLMo 2 7B intermediate checkpoints the paper uses, by its names (M1 … M5, M4′): each
is a revision of one Hub repository. ``ftt-fetch-checkpoints`` saves them locally, and the
model lookup names that command as the way to fetch one (:func:`mergekit_ftt.hub.download_hint`).
"""

from __future__ import annotations

from mergekit_ftt.errors import FttError

REPO_ID = "allenai/OLMo-2-1124-7B"

# The paper's names for the checkpoints it uses (Table 3 and the OLMo 2 instruct transfer).
CHECKPOINTS = {
    "M1": "stage1-step300000-tokens1259B",
    "M2": "stage1-step600000-tokens2517B",
    "M3": "stage1-step928646-tokens3896B",
    "M4": "stage2-ingredient1-step6000-tokens26B",
    "M5": "stage2-ingredient1-step11931-tokens50B",
    "M4'": "stage2-ingredient1-step7000-tokens30B",
}


def checkpoint_name(name: str) -> str:
    """Canonical table key: accepts M4′ (prime), M4' and m4p for M4′."""
    canonical = name.strip().upper().replace("′", "'").replace("P", "'")
    if canonical not in CHECKPOINTS:
        raise FttError(f"unknown checkpoint {name!r}; known: {', '.join(CHECKPOINTS)}.")
    return canonical


def folder_name(name: str) -> str:
    """File-system-safe folder name: M4' is saved as M4prime."""
    return name.replace("'", "prime")
