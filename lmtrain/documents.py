"""Documents inside a packed window: which document each token is in, and what attention and RoPE need for a token's
output to depend on its own document only (``--doc-mask``).

A window of T tokens cut from the token stream holds the end of one document, whole documents and the start of
another, separated by the end-of-text token. Two conventions say which document that token is in:

* ``"after"`` (the eot ends each document, as ``prepare`` writes them): the eot belongs to the document it ends;
  its output predicts the first token of the next document from the one it ended.
* ``"before"`` (the eot starts each document, a BOS): the eot is the first token of the document it starts; the
  window's first token is in document 0 whatever it is.

``doc_ids(x, eot_id, delimiter)`` numbers the documents of each row 0, 1, ... (int64 (B, T), non-decreasing along
a row). ``document_attention(doc_ids)`` turns them, once per forward, into what every layer needs: a mask that is
causal and confined to the token's document, and RoPE positions restarting at 0 at each document's first token.
The mask is a dense boolean (B, 1, T, T) for ``F.scaled_dot_product_attention`` on the CPU and MPS (compiled
FlexAttention has no CPU backward), and a FlexAttention ``BlockMask`` on CUDA, for ``flex_attend``: FlexAttention
compiled (its eager form materialises the whole score matrix, an unfused reference), whether or not the model is.

``DocMask`` (the eot id and the convention) is what generation needs to know: see ``current_document``.
``documents_of_config`` reads a run's windows and DocMask back from its saved config (sample, evaluate, export),
``document_ids`` gives the doc ids of a batch for a DocMask or none (the training loop, evaluation).
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from lmdata.docindex import DELIMITERS
from lmdata.sampler import WINDOWS
from lmtrain.errors import CheckpointError


def _check_delimiter(delimiter: str) -> None:
    """ValueError (the model API's error for a bad argument) for a delimiter lmdata does not know."""
    if delimiter not in DELIMITERS:
        raise ValueError(f"delimiter must be one of {', '.join(map(repr, DELIMITERS))}, got {delimiter!r}")


def doc_ids(x: torch.Tensor, eot_id: int, delimiter: str = "after") -> torch.Tensor:
    """The document number of every token of ``x`` (integer (..., T) token ids, any device): int64 of x's shape,
    0 for the row's first document and +1 at each document start (see the module docstring for ``delimiter``).
    On x's device, without a host sync."""
    _check_delimiter(delimiter)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"doc_ids needs integer token ids, got a {x.dtype} tensor")
    if x.dim() == 0:
        raise ValueError("doc_ids needs token ids of shape (..., T), got a scalar")
    try:
        eot = operator.index(eot_id)  # an int (numpy's too), not a float, None or a bool
    except TypeError:
        raise ValueError(f"eot_id must be an integer token id, got {eot_id!r}") from None
    if isinstance(eot_id, bool) or eot < 0:  # a negative id is no token: every row would be one document
        raise ValueError(f"eot_id must be an integer token id (>= 0), got {eot_id!r}")
    is_eot = (x == eot).long()  # (..., T)
    if delimiter == "after":  # a token's id: the eots strictly before it
        return is_eot.cumsum(-1) - is_eot
    starts = is_eot.clone()
    starts[..., :1] = 0  # the row's first token is document 0, an eot or not (T = 0: nothing)
    return starts.cumsum(-1)


class DocumentAttention(NamedTuple):
    """What every layer's attention needs for one forward of document-masked windows (built once, shared)."""

    mask: torch.Tensor | BlockMask
    """bool (B, 1, T, T), True where query t may read key s (s <= t, same document), for SDPA's ``attn_mask``;
    or the same rule as a FlexAttention BlockMask (B, 1, T, T), for ``flex_attend``."""
    positions: torch.Tensor
    """int64 (B, 1, T): each token's RoPE position, its offset from its document's first token (the 1 broadcasts
    over the heads of q and k, (B, H, T, d_head))."""


def document_positions(ids: torch.Tensor) -> torch.Tensor:
    """int64 (B, T) offsets of each token from its document's first token, from doc ids (B, T), non-decreasing.

    Vectorised on ids' device, no host sync: a document starts where the id changes (and at t = 0); the running
    maximum of the start indices is each token's document start."""
    T = ids.shape[-1]
    t = torch.arange(T, device=ids.device).expand_as(ids)  # (B, T)
    is_start = torch.ones_like(ids, dtype=torch.bool)
    is_start[:, 1:] = ids[:, 1:] != ids[:, :-1]
    start = torch.where(is_start, t, torch.zeros_like(t)).cummax(dim=-1).values  # (B, T)
    return t - start


def document_attention(ids: torch.Tensor, use_flex: bool | None = None) -> DocumentAttention:
    """The mask and positions for doc ids (B, T) (from ``doc_ids``), on ids' device. ``use_flex``: a BlockMask
    for FlexAttention (default: on CUDA), else a dense bool mask for SDPA; the tests force it on the CPU to check
    the BlockMask against the dense mask."""
    use_flex = ids.is_cuda if use_flex is None else use_flex
    positions = document_positions(ids)[:, None, :]  # (B, 1, T)
    B, T = ids.shape
    if use_flex:
        return DocumentAttention(_block_mask(ids, B, T), positions)
    causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()  # (T, T), [t, s]: s <= t
    same_doc = ids[:, None, :, None] == ids[:, None, None, :]  # (B, 1, T, T)
    return DocumentAttention(same_doc & causal, positions)


def _block_mask(ids: torch.Tensor, B: int, T: int) -> BlockMask:
    def causal_same_document(b, h, q_idx, kv_idx):  # scalar index tensors, vmapped (eager) or fused (compiled)
        return (q_idx >= kv_idx) & (ids[b, q_idx] == ids[b, kv_idx])

    # Compiled on CUDA: eager, create_block_mask evaluates mask_mod on the dense (B, T, T) grid. Inside a model
    # under torch.compile it is traced into the model's graph instead (a nested compile is not needed there).
    compile_it = ids.is_cuda and not torch.compiler.is_compiling()
    return create_block_mask(causal_same_document, B, None, T, T, device=ids.device, _compile=compile_it)


_compiled_flex = None


def flex_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, enable_gqa: bool
) -> torch.Tensor:
    """FlexAttention of q (B, H, T, d) over k, v (B, Hkv, T, d) under ``block_mask`` -> (B, H, T, d). On CUDA
    compiled (once, on first use; a new T recompiles), whatever ``--compile`` says: the eager form is an unfused
    reference; inside a model under torch.compile, traced into its graph. On the CPU eager (forward only:
    FlexAttention has no CPU backward), for the tests."""
    global _compiled_flex
    if not q.is_cuda or torch.compiler.is_compiling():  # CPU: eager; in a compiled model: fused into its graph
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def check_doc_ids(ids: torch.Tensor, tokens: torch.Tensor) -> None:
    """ValueError unless ``ids`` fits token ids ``tokens`` (B, T): an integer tensor of the same shape and device.
    That ids are non-decreasing along each row is checked on the CPU only, outside torch.compile (elsewhere it
    would cost a host sync, or a graph break): a decreasing id would restart positions as a new document without
    masking it from the earlier one."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"doc_ids must be a torch.Tensor of document numbers, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"doc_ids must be an integer tensor (from lmtrain.doc_ids), got {ids.dtype}")
    if tokens.dim() != 2 or ids.shape != tokens.shape:
        raise ValueError(
            f"doc_ids of shape {tuple(ids.shape)} for token ids of shape {tuple(tokens.shape)}: both must be (B, T)"
        )
    if ids.device != tokens.device:
        raise ValueError(f"doc_ids on {ids.device} for token ids on {tokens.device}: put them on the same device")
    if ids.device.type != "cpu" or torch.compiler.is_compiling():  # would sync, or break the compiled graph
        return
    if bool((ids[:, 1:] < ids[:, :-1]).any()):
        raise ValueError("doc_ids must be non-decreasing along each row (document numbers, as lmtrain.doc_ids gives)")


class DocMask(NamedTuple):
    """Generation with a document-masked model: the end-of-text id and its convention (``"after"`` or
    ``"before"``), so that an eot in the context is a document boundary."""

    eot_id: int
    delimiter: str = "after"

    def starts_document(self, previous: int, token: int) -> bool:
        """Whether ``token``, coming after ``previous``, is the first token of a new document."""
        return previous == self.eot_id if self.delimiter == "after" else token == self.eot_id


def current_document(tokens: list[int], doc_mask: DocMask) -> list[int]:
    """The tail of ``tokens`` in the last document: with ``"after"`` the tokens after the last eot that is not the
    final token (a final eot ends the current document, and its output predicts the next one's first token from
    it), with ``"before"`` from the last eot on. A masked model's output at a token depends on these only, at
    positions 0.. from the document's first token: generation can keep them alone, with an unmasked cache."""
    _check_delimiter(doc_mask.delimiter)
    search = tokens[:-1] if doc_mask.delimiter == "after" else tokens
    last = next((i for i in range(len(search) - 1, -1, -1) if search[i] == doc_mask.eot_id), None)
    if last is None:
        return list(tokens)
    return list(tokens[last + 1 :] if doc_mask.delimiter == "after" else tokens[last:])


def document_ids(x: torch.Tensor, doc_mask: DocMask | None) -> torch.Tensor | None:
    """The doc ids of token ids ``x`` (B, T) for a document-masked model (on x's device, no host sync), or None
    (no masking) when ``doc_mask`` is None: what ``TransformerLM.forward`` takes as its second argument."""
    return None if doc_mask is None else doc_ids(x, doc_mask.eot_id, doc_mask.delimiter)


def saved_document_key(config: dict) -> DocMask | None:
    """The eot id and delimiter a run's saved config (a checkpoint's ``config``) records, as a DocMask: a run with
    a document option (``--windows document``, ``--doc-mask``) saves those preflight resolved; a run without one
    saves neither (None). CheckpointError for anything else (a bool, negative or float id, an unknown delimiter,
    one without the other): lmtrain.main would not have saved it."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    eot_id, delimiter = data.get("eot_id"), data.get("delimiter")
    if eot_id is None and delimiter is None:
        return None
    if not (isinstance(eot_id, int) and not isinstance(eot_id, bool) and eot_id >= 0) or delimiter not in DELIMITERS:
        raise CheckpointError(
            f"the checkpoint records eot_id {eot_id!r} and delimiter {delimiter!r}; lmtrain.main saves a "
            f"non-negative int and one of {', '.join(map(repr, DELIMITERS))} (or neither): it was not written by it"
        )
    return DocMask(eot_id, delimiter)


def documents_of_config(config: dict) -> tuple[str, DocMask | None]:
    """(windows, DocMask or None) the run of ``config`` (a checkpoint's) trained with: its ``--windows`` and, for
    a ``--doc-mask`` run, the eot id and delimiter preflight resolved (``saved_document_key``). A run from before
    these options: ("any", None). CheckpointError for values lmtrain.main would not have saved."""
    run = config.get("run") if isinstance(config.get("run"), dict) else {}
    windows, masked = run.get("windows", "any"), run.get("doc_mask", False)
    if windows not in WINDOWS or not isinstance(masked, bool):
        raise CheckpointError(f"the checkpoint's windows {windows!r} / doc_mask {masked!r} are not lmtrain.main's")
    key = saved_document_key(config)
    if masked and key is None:
        raise CheckpointError(
            "the checkpoint is of a --doc-mask run but records no eot_id and delimiter; it was not written by "
            "lmtrain.main"
        )
    return windows, key if masked else None
