"""Conversion between our TransformerLM and Hugging Face's Llama (``LlamaForCausalLM``), both ways.

The two are the same network: pre-norm RMSNorm blocks, SwiGLU, RoPE on q and k, no biases, an untied (or tied)
head. Three things differ:

* names: ``layers.{i}.attn.q_proj`` is ``model.layers.{i}.self_attn.q_proj``, ``ffn.w1/w3/w2`` are
  ``mlp.gate_proj/up_proj/down_proj``, ``ln1/ln2`` are ``input_layernorm/post_attention_layernorm`` (see
  :func:`_name_pairs`);
* RoPE's channel pairing: ours rotates adjacent channels (2k, 2k+1) of a head, Llama rotates halves
  (k, k + d/2), both by angle ``position / theta^(2k/d)``. Permuting the rows of q_proj and k_proj within each
  head (:func:`to_half_split`, inverse :func:`to_adjacent_pairs`) turns one into the other; q.k is unchanged
  because q and k are permuted alike, and v, o are untouched;
* the config: ours is ``config["model"]`` of a run, theirs a ``config.json`` (:func:`llama_config_kwargs`,
  :func:`read_llama_config`).

Export writes ``model.safetensors`` (or shards with ``model.safetensors.index.json``) plus ``config.json`` and
``generation_config.json`` through transformers' own classes; import reads ``config.json`` and the safetensors
directly (safetensors only, no transformers), and refuses every Llama feature our model lacks.
Supported transformers: >= 4.45 (4.x writes ``rope_theta`` and ``torch_dtype``, 5 ``rope_parameters`` and
``dtype``; both layouts are read).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lmdata.format import is_int
from lmtrain.errors import CheckpointError, ConfigError
from lmtrain.model import RMSNorm, TransformerLM, shape_problems

INSTALL_HINT = "pip install 'lmstack[hf]'"
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 2**30  # transformers 4's default shard size; a shard past it starts a new file
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_EPS = RMSNorm(1).eps  # the only RMSNorm eps TransformerLM builds
# LlamaConfig's defaults, for keys a config.json may leave out
LLAMA_DEFAULTS = {
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
}


def import_module(name: str):
    """transformers or safetensors, or a ConfigError saying how to install them."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(f"Hugging Face export and import need the {name} package: {INSTALL_HINT}") from None


# -- RoPE: adjacent pairs <-> halves ------------------------------------------------------------------------
def to_half_split(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (num_heads * d, C) from our adjacent-pair order to Llama's half-split order.

    Within a head, our channel 2k+b (b = 0, 1) is Llama's channel b*d/2 + k: our pair (2k, 2k+1) is rotated by
    the same angle as Llama's pair (k, k+d/2), and in the same sense (the first of the pair gets -sin). So a
    head's rows, viewed as (d/2, 2) [k, b], are transposed to (2, d/2) [b, k]."""
    rows, cols = w.shape
    return w.reshape(num_heads, rows // num_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def to_adjacent_pairs(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of :func:`to_half_split`: a head's rows viewed as (2, d/2) [b, k] go back to (d/2, 2)."""
    rows, cols = w.shape
    return w.reshape(num_heads, 2, rows // num_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# -- names ----------------------------------------------------------------------------------------------------
def _name_pairs(num_layers: int) -> list[tuple[str, str]]:
    """(our name, Llama's name) of every weight, lm_head included."""
    pairs = [("token_embeddings.weight", "model.embed_tokens.weight")]
    for i in range(num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        pairs += [
            (ours + "ln1.weight", theirs + "input_layernorm.weight"),
            (ours + "ln2.weight", theirs + "post_attention_layernorm.weight"),
            *((ours + f"attn.{p}_proj.weight", theirs + f"self_attn.{p}_proj.weight") for p in "qkv"),
            (ours + "attn.output_proj.weight", theirs + "self_attn.o_proj.weight"),
            (ours + "ffn.w1.weight", theirs + "mlp.gate_proj.weight"),
            (ours + "ffn.w3.weight", theirs + "mlp.up_proj.weight"),
            (ours + "ffn.w2.weight", theirs + "mlp.down_proj.weight"),
        ]
    return [*pairs, ("ln_final.weight", "model.norm.weight"), ("lm_head.weight", "lm_head.weight")]


def _heads_of(name: str, num_heads: int, num_kv_heads: int) -> int | None:
    """How many heads a weight's rows split into, for the q and k projections (the ones RoPE reads); else None."""
    return num_heads if name.endswith("q_proj.weight") else num_kv_heads if name.endswith("k_proj.weight") else None


def to_llama_state_dict(
    state: dict[str, torch.Tensor], num_layers: int, num_heads: int, num_kv_heads: int, tied: bool
) -> dict[str, torch.Tensor]:
    """Our state dict -> Llama's names and RoPE order, contiguous (safetensors stores no views). A tied model
    has no lm_head in Llama's file (transformers ties it to embed_tokens)."""
    out = {}
    for ours, theirs in _name_pairs(num_layers):
        if ours == "lm_head.weight" and tied:
            continue
        w = state[ours]
        if (heads := _heads_of(ours, num_heads, num_kv_heads)) is not None:
            w = to_half_split(w, heads)
        out[theirs] = w.contiguous()
    return out


def from_llama_state_dict(
    state: dict[str, torch.Tensor], num_layers: int, num_heads: int, num_kv_heads: int, tied: bool
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_llama_state_dict`; CheckpointError naming missing or unexpected weights."""
    pairs = [(o, t) for o, t in _name_pairs(num_layers) if not (tied and o == "lm_head.weight")]
    if tied:  # a tied model's file has no lm_head, or one equal to the embedding (its state_dict() has both names)
        head, embedding = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
        if head is not None and not (embedding is not None and torch.equal(head, embedding)):
            raise CheckpointError(
                "config.json says tie_word_embeddings=true but the weights hold an lm_head.weight of their own, "
                "other than model.embed_tokens.weight; which is the model? Fix the config (false) or the weights"
            )
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    expected = {t for _, t in pairs}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"the Llama weights do not fit its config.json: {len(missing)} missing (first: "
            f"{missing[:1]}), {len(unexpected)} unexpected (first: {unexpected[:1]})"
        )
    out = {}
    for ours, theirs in pairs:
        w = state[theirs].float()
        if (heads := _heads_of(ours, num_heads, num_kv_heads)) is not None:
            if w.ndim != 2 or w.shape[0] % (2 * heads):
                raise CheckpointError(f"{theirs}: shape {tuple(w.shape)} does not fit {heads} heads of even width")
            w = to_adjacent_pairs(w, heads)
        out[ours] = w
    if tied:
        out["lm_head.weight"] = out["token_embeddings.weight"]
    return out


# -- config -----------------------------------------------------------------------------------------------------
def llama_config_kwargs(model: dict, eot_id: int | None, dtype: str) -> dict:
    """LlamaConfig(...) arguments for our ``config["model"]``. num_kv_heads and tie_embeddings are read if the
    model has them (options being added), else num_heads and untied."""
    transformers = import_module("transformers")
    heads = model["num_heads"]
    major = int(transformers.__version__.split(".")[0])
    return {
        "vocab_size": model["vocab_size"],
        "hidden_size": model["d_model"],
        "intermediate_size": model["d_ff"],
        "num_hidden_layers": model["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": model.get("num_kv_heads") or heads,
        "head_dim": model["d_model"] // heads,
        "hidden_act": "silu",
        "max_position_embeddings": model["context_length"],
        "rms_norm_eps": MODEL_EPS,
        "rope_theta": float(model["rope_theta"]),  # transformers 5 turns it into rope_parameters
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": bool(model.get("tie_embeddings", False)),
        "bos_token_id": eot_id,  # documents are separated (and a new one started) by end-of-text only
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
        ("dtype" if major >= 5 else "torch_dtype"): dtype,
    }


def _rope_theta(config: dict, path: Path) -> float:
    """RoPE's base from either layout (5: rope_parameters; 4: rope_theta with rope_scaling), refusing scaling."""
    params = config.get("rope_parameters")
    scaling = config.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{path}: rope_parameters {params!r} is not an object")
    if isinstance(params, dict):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise ConfigError(f"{path}: RoPE scaling (rope_parameters rope_type {kind!r}) is not supported")
        return float(params.get("rope_theta", config.get("rope_theta", LLAMA_DEFAULTS["rope_theta"])))
    if scaling:
        raise ConfigError(f"{path}: RoPE scaling (rope_scaling {scaling!r}) is not supported")
    return float(config.get("rope_theta", LLAMA_DEFAULTS["rope_theta"]))


def _refusals(c: dict, path: Path) -> list[str]:
    """Every feature of this Llama config that TransformerLM does not have."""
    heads, hidden = c.get("num_attention_heads"), c.get("hidden_size")
    problems = []
    if c.get("model_type") != "llama":
        problems.append(f"model_type {c.get('model_type')!r} (only llama is supported)")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key, False):
            problems.append(f"{key}=true (our model has no biases)")
    if (act := c.get("hidden_act", "silu")) != "silu":
        problems.append(f"hidden_act {act!r} (only silu: SwiGLU)")
    if (
        isinstance(heads, int)
        and isinstance(hidden, int)
        and heads > 0
        and c.get("head_dim") not in (None, hidden // heads)
    ):
        problems.append(f"head_dim {c['head_dim']} other than hidden_size/num_attention_heads={hidden // heads}")
    if (eps := c.get("rms_norm_eps", LLAMA_DEFAULTS["rms_norm_eps"])) != MODEL_EPS:
        problems.append(f"rms_norm_eps {eps} (our RMSNorm's eps is {MODEL_EPS})")
    return problems


def read_llama_config(directory: Path) -> dict:
    """Our ``config["model"]`` fields of the Llama model in ``directory``; ConfigError listing every feature it
    has that TransformerLM lacks, CheckpointError if there is no readable config.json."""
    path = Path(directory) / "config.json"
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read a Hugging Face config.json ({e})") from None
    if not isinstance(c, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers") if k not in c]
    missing += [] if "num_attention_heads" in c else ["num_attention_heads"]
    if missing:
        raise CheckpointError(f"{path}: lacks {', '.join(missing)}; is it a Llama model's config.json?")
    problems = _size_problems(c) or _refusals(c, path)
    theta = None
    try:
        theta = _rope_theta(c, path)
    except ConfigError as e:
        problems.append(str(e).removeprefix(f"{path}: "))
    except (TypeError, ValueError):
        problems.append("rope_theta is not a number")
    if theta is not None and not (math.isfinite(theta) and theta > 0):
        problems.append(f"rope_theta {theta} is not a positive number")
    if problems:
        raise ConfigError(f"{path}: cannot import this model: " + "; ".join(problems))
    return {
        "vocab_size": c["vocab_size"],
        "context_length": c.get("max_position_embeddings", LLAMA_DEFAULTS["max_position_embeddings"]),
        "d_model": c["hidden_size"],
        "num_layers": c["num_hidden_layers"],
        "num_heads": c["num_attention_heads"],
        "d_ff": c["intermediate_size"],
        "rope_theta": theta,
        "num_kv_heads": _kv_heads(c),
        "tie_embeddings": bool(c.get("tie_word_embeddings", LLAMA_DEFAULTS["tie_word_embeddings"])),
    }


MAX_POSITIONS = 1 << 20  # RoPE tables are built for every position: a larger max_position_embeddings is a typo


def _size_problems(c: dict) -> list[str]:
    """What is wrong with the config's sizes (each a positive int; the heads dividing as our model needs)."""
    sizes = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
    sizes += [k for k in ("num_key_value_heads", "max_position_embeddings") if c.get(k) is not None]
    problems = [f"{k} {c[k]!r} is not a positive integer" for k in sizes if not (is_int(c[k]) and c[k] > 0)]
    if problems:
        return problems
    if c.get("max_position_embeddings", 0) > MAX_POSITIONS:
        problems.append(f"max_position_embeddings {c['max_position_embeddings']} is above {MAX_POSITIONS:,}")
    kv = c.get("num_key_value_heads") or c["num_attention_heads"]
    return problems + shape_problems(c["hidden_size"], c["num_attention_heads"], kv)


def _kv_heads(c: dict) -> int | None:
    """num_key_value_heads as our option: None (multi-head) when it is absent or equals the heads."""
    kv = c.get("num_key_value_heads")
    return None if kv is None or kv == c["num_attention_heads"] else kv


# -- weights files -----------------------------------------------------------------------------------------------
def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """``state`` in order, cut into groups of at most ``max_bytes`` (a larger tensor is a group alone)."""
    groups, size = [{}], 0
    for name, w in state.items():
        nbytes = w.numel() * w.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups, size = [*groups, {}], 0
        groups[-1][name], size = w, size + nbytes
    return groups


def save_weights(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` and the index transformers reads; returns
    the file names written."""
    save_file = import_module("safetensors.torch").save_file
    groups = _shards(state, max_shard_bytes)
    if len(groups) == 1:
        save_file(groups[0], str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return [WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(names, groups, strict=True):
        save_file(group, str(directory / name), metadata={"format": "pt"})
    total = sum(w.numel() * w.element_size() for w in state.values())
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: n for n, g in zip(names, groups, strict=True) for k in g},
    }
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_NAME]


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors`` or of the shards its index names, on the CPU."""
    load_file = import_module("safetensors.torch").load_file
    damaged = (OSError, ValueError, KeyError, RuntimeError, import_module("safetensors").SafetensorError)
    directory = Path(directory)
    try:
        if (directory / WEIGHTS_NAME).is_file():
            state = load_file(str(directory / WEIGHTS_NAME))
        elif (directory / INDEX_NAME).is_file():
            state = {k: v for f in _shard_files(directory) for k, v in load_file(str(directory / f)).items()}
        else:
            raise CheckpointError(
                f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}; only safetensors weights are read (re-save with "
                "save_pretrained(..., safe_serialization=True))"
            )
    except damaged as e:  # a cut-short download, a header that is not safetensors'
        raise CheckpointError(f"{directory}: cannot read its safetensors weights ({e})") from None
    for name, w in state.items():
        if not w.is_floating_point() or not bool(torch.isfinite(w).all()):
            raise CheckpointError(f"{directory}: weight {name} is {w.dtype} or holds NaN/inf; not a trained model")
    return state


def _shard_files(directory: Path) -> list[str]:
    """The shard files an index names: plain names inside ``directory`` (never a path out of it)."""
    try:
        weight_map = json.loads((directory / INDEX_NAME).read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory / INDEX_NAME}: not a readable safetensors index ({e!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{directory / INDEX_NAME}: weight_map must map weight names to file names")
    files = sorted(set(weight_map.values()))
    outside = [f for f in files if Path(f).name != f or f in ("", ".", "..")]
    if outside:
        raise CheckpointError(f"{directory / INDEX_NAME}: names {outside[0]!r}, not a file of the directory")
    return files


def load_hf(directory: str | Path) -> TransformerLM:
    """Our TransformerLM (float32, on the CPU, eval mode) with the weights of the HF Llama model in ``directory``
    (config.json + safetensors). Raises ConfigError for a Llama feature our model lacks."""
    directory = Path(directory)
    shape = read_llama_config(directory)
    state = load_weights(directory)
    model = TransformerLM(**shape)
    heads = shape["num_heads"]
    kv_heads = shape["num_kv_heads"] or heads
    ours = from_llama_state_dict(state, shape["num_layers"], heads, kv_heads, tied=shape["tie_embeddings"])
    try:
        model.load_state_dict(ours)
    except RuntimeError as e:  # a weight of another shape than config.json says
        raise CheckpointError(f"{directory}: the weights do not fit its config.json ({e})") from None
    return model.eval()


def is_hf_dir(path: Path) -> bool:
    """``path`` is a directory holding a Hugging Face config.json (not one of our run directories)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    try:
        return "model_type" in json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
