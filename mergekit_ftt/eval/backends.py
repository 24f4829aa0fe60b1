"""Model arguments for lm-eval's ``hf`` and ``vllm`` backends, from one set of options."""

from __future__ import annotations

from importlib.util import find_spec
from typing import Any, get_args

from mergekit_ftt.errors import FttError
from mergekit_ftt.eval.options import Backend, BackendOptions

BACKENDS: tuple[Backend, ...] = get_args(Backend)

VLLM_INSTALL_HINT = (
    "the vllm backend needs vLLM, which is not installed. On a CUDA machine run "
    "`pip install 'mergekit-ftt[vllm]'` (it pins vLLM 0.33 with a transformers it "
    "accepts), or use `--backend hf`."
)


class BackendUnavailable(FttError):
    """The requested backend's package is missing."""


def _cuda_available() -> bool:
    if find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def default_backend() -> Backend:
    """vLLM when it is installed and a CUDA device is visible, else transformers."""
    return "vllm" if find_spec("vllm") is not None and _cuda_available() else "hf"


def require_backend(backend: str, options: BackendOptions | None = None) -> None:
    """Fail early, before any model loads, when ``backend`` cannot run here."""
    if backend not in BACKENDS:
        raise FttError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "vllm":
        return
    if find_spec("vllm") is None:
        raise BackendUnavailable(VLLM_INSTALL_HINT)
    # lm-eval runs vLLM data parallelism as Ray workers.
    if options is not None and options.data_parallel_size > 1 and find_spec("ray") is None:
        raise BackendUnavailable(
            "data_parallel_size > 1 needs Ray: `pip install 'mergekit-ftt[vllm]'` brings it, "
            "or use --data-parallel-size 1"
        )


def model_args(
    backend: Backend, pretrained: str, options: BackendOptions, cuda: bool | None = None
) -> dict[str, Any]:
    """lm-eval ``model_args`` for ``backend``: ``options.model_args`` over the other options;
    ``cuda`` overrides the device probe (for tests)."""
    cuda = _cuda_available() if cuda is None else cuda
    args: dict[str, Any] = {
        "pretrained": pretrained,
        "trust_remote_code": options.trust_remote_code,
    }
    if options.add_bos_token is not None:
        args["add_bos_token"] = options.add_bos_token
    if backend == "hf":
        # lm-eval's HFLM defaults to device "cuda" even on machines without one.
        device = options.device or ("cuda" if cuda else "cpu")
        args["device"] = device
        # Half precision on CPU is slow and inexact; checkpoints saved in bf16 load as float32.
        args["dtype"] = options.dtype or ("float32" if device == "cpu" else "auto")
        if options.max_model_len is not None:
            args["max_length"] = options.max_model_len
        return {**args, **(options.model_args or {})}
    args.update(
        dtype=options.dtype or "auto",
        tensor_parallel_size=options.tensor_parallel_size,
        data_parallel_size=options.data_parallel_size,
        gpu_memory_utilization=options.gpu_memory_utilization,
        seed=options.seed,
    )
    if options.max_model_len is not None:
        args["max_model_len"] = options.max_model_len
    return {**args, **(options.model_args or {})}


def batch_size(backend: Backend, options: BackendOptions) -> int | str:
    if options.batch_size is not None:
        return options.batch_size
    return "auto" if backend == "vllm" else 1
