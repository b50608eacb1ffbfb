"""``--init-from SOURCE``: a new run's first weights, from a Hugging Face Llama directory or one of our runs.

SOURCE is a directory with an HF ``config.json`` (``model_type``; weights in safetensors) or one of our run
directories or checkpoint files. The model's shape is SOURCE's: :func:`shape_flags` fills the model flags from
it before the config is built, and every model flag given that disagrees is a problem naming both values
(``--context-length`` may be shorter than SOURCE's, never longer: RoPE was trained on those positions only).
:func:`load_into` copies the weights after the trainer chose where to start: a run that resumes a checkpoint
keeps it (resume wins), so running the same command again after a kill continues the run, not a new one.
Only the weights are taken: the optimizer, the step and the data order start afresh.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmtrain import hf
from lmtrain.errors import CheckpointError, LmTrainError
from lmtrain.sample import load_run


def source_shape(source: str) -> dict:
    """Our ``config["model"]`` fields of SOURCE (reading its config only, for an HF directory)."""
    path = Path(source)
    if hf.is_hf_dir(path):
        shape = hf.read_llama_config(path)
        if not any((path / name).is_file() for name in (hf.WEIGHTS_NAME, hf.INDEX_NAME)):
            raise CheckpointError(f"{path}: no {hf.WEIGHTS_NAME} or {hf.INDEX_NAME} (only safetensors are read)")
        return shape
    return dict(load_run(path)[1]["model"])


def source_weights(source: str) -> dict[str, torch.Tensor]:
    """SOURCE's weights under our names, float32 on the CPU."""
    path = Path(source)
    model = hf.load_hf(path) if hf.is_hf_dir(path) else load_run(path)[0]
    state = {k: v.float() for k, v in model.state_dict().items()}
    bad = next((k for k, v in state.items() if not bool(torch.isfinite(v).all())), None)
    if bad is not None:  # training would stop at step 1 as if the learning rate were too high
        raise CheckpointError(f"--init-from {source}: weight {bad} holds NaN or inf; it is no model to start from")
    return state


def _disagreements(shape: dict, given: dict, source: str) -> list[str]:
    problems = []
    heads = given.get("num_heads", shape.get("num_heads"))
    if given.get("num_kv_heads") == heads and shape.get("num_kv_heads") is None:
        given = {**given, "num_kv_heads": None}  # --num-kv-heads equal to the heads is multi-head, as SOURCE is
    for key, value in given.items():
        flag = "--" + key.replace("_", "-")
        if key == "context_length":
            if isinstance(value, int) and value > shape[key]:
                problems.append(
                    f"{flag} {value} is longer than the {shape[key]} positions of --init-from {source} "
                    "(its max_position_embeddings / context_length)"
                )
        elif key in shape and value != shape[key]:
            problems.append(f"{flag} {value} disagrees with --init-from {source}, whose {key} is {shape[key]}")
    return problems


def shape_flags(file_values: dict[str, dict], flags: dict[str, dict]) -> tuple[dict[str, dict], list[str]]:
    """(flags with SOURCE's model shape filled in, problems), if --init-from is given (in the file or a flag);
    else ``flags`` unchanged. A context length given (shorter) is kept."""
    source = flags.get("run", {}).get("init_from", file_values.get("run", {}).get("init_from"))
    if not isinstance(source, str) or not source:
        return flags, []  # not given, or a value the config's own checks report
    try:
        shape = source_shape(source)
    except (LmTrainError, OSError) as e:
        return flags, [f"--init-from {source}: {e}"]
    given = {**file_values.get("model", {}), **flags.get("model", {})}
    problems = _disagreements(shape, given, source)
    model = {**shape, **({"context_length": given["context_length"]} if "context_length" in given else {})}
    return {**flags, "model": {**flags.get("model", {}), **model}}, problems


def load_into(model: torch.nn.Module, source: str) -> None:
    """Copy SOURCE's weights into ``model`` in place (the optimizer keeps its references to the parameters)."""
    with torch.no_grad():
        model.load_state_dict(source_weights(source))
