"""The options of ``ftt-eval run``, each defined once: ``ftt-eval``'s flags are generated from
these models (:func:`mergekit_ftt.cli.add_options`), and the Python API takes them as is.

Field names are lm-eval's, so its spellings work as flags too (``--batch_size``,
``--include_path``, ``--model_args``) beside ``--batch-size``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Backend = Literal["hf", "vllm"]


class BackendOptions(BaseModel):
    """How each model is loaded and run (lm-eval model arguments).

    Options a backend has no use for are ignored by it (``device`` for vLLM,
    ``tensor_parallel_size`` for hf); ``None`` leaves the default named in its help.
    """

    model_config = ConfigDict(frozen=True)

    device: str | None = Field(
        None, description="hf backend: cpu, cuda, cuda:N (default: cuda if present, else cpu)"
    )
    dtype: str | None = Field(
        None, description="weights dtype (default: float32 on CPU, else the checkpoint's)"
    )
    batch_size: int | str | None = Field(
        None, description="a number or 'auto' (default: 1 for hf, auto for vllm)"
    )
    tensor_parallel_size: int = Field(1, description="vllm: GPUs per model replica")
    data_parallel_size: int = Field(1, description="vllm: model replicas (run by Ray)")
    gpu_memory_utilization: float = Field(0.9, description="vllm: share of GPU memory to use")
    max_model_len: int | None = Field(
        None, description="longest sequence (vllm max_model_len, hf max_length)"
    )
    add_bos_token: bool | None = Field(
        None, description="prepend BOS to every prompt (default: the suite's, else lm-eval's)"
    )
    seed: int = Field(1234, description="sampling and few-shot seed")
    trust_remote_code: bool = Field(False, description="run model code from the Hub")
    model_args: dict[str, Any] | None = Field(
        None,
        description="more lm-eval model arguments, as in lm-eval: key=value,key2=value2 "
        "(or a JSON object); they win over the options above",
    )

    @field_validator("batch_size", mode="before")
    @classmethod
    def _number_or_auto(cls, value: Any) -> Any:
        return int(value) if isinstance(value, str) and value.isdigit() else value

    @field_validator("model_args", mode="before")
    @classmethod
    def _lm_eval_model_args(cls, value: Any) -> Any:
        """lm-eval's forms: ``k=v,k2=v2``, several such strings, or one JSON object."""
        if value is None or isinstance(value, dict):
            return value
        from lm_eval._cli.utils import key_val_to_dict, try_parse_json

        values = [value] if isinstance(value, str) else list(value)
        parsed = try_parse_json(values[0])
        if isinstance(parsed, dict):
            return parsed
        merged: dict[str, Any] = {}
        for text in values:
            merged.update(key_val_to_dict(text))
        return merged


class RunOptions(BaseModel):
    """What to run and how results are kept."""

    model_config = ConfigDict(frozen=True)

    backend: Backend | None = Field(
        None, description="lm-eval model type (default: vllm on a CUDA machine with vLLM, else hf)"
    )
    include_path: list[str] = Field(
        [], description="a folder of lm-eval task YAMLs (suites too); repeat for several"
    )
    limit: float | None = Field(
        None, description="examples per task (a number below 1 is a fraction)"
    )
    apply_chat_template: bool | None = Field(
        None, description="apply the model's chat template (default: the suite's setting)"
    )
    fewshot_as_multiturn: bool | None = Field(
        None, description="few-shot examples as chat turns (default: the suite's setting)"
    )
    force: bool = Field(False, description="recompute tasks that already have results")

    @field_validator("include_path")
    @classmethod
    def _existing_folders(cls, paths: list[str]) -> list[str]:
        missing = [path for path in paths if not Path(path).is_dir()]
        if missing:
            raise ValueError(
                f"no folder {', '.join(missing)} (looked in {Path.cwd()}): give the folder "
                "that holds the task YAMLs"
            )
        return paths

    @field_validator("limit")
    @classmethod
    def _count_or_fraction(cls, value: float | None) -> float | int | None:
        return int(value) if value is not None and value >= 1 else value  # lm-eval's rule
