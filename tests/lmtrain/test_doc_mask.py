"""Document masking: doc_ids' exact numbers, each document of a packed window equal to that document run alone
(both conventions, GQA, tied), the BlockMask against the dense mask, refusals, gradients, doc_ids=None as before,
and generation past an end-of-text in the prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmtrain import DocMask, TransformerLM, doc_ids
from lmtrain import model as model_module
from lmtrain.documents import current_document, document_attention, document_positions
from lmtrain.sample import ContextWindow, generate
from tests.conftest import cuda

EOT = 0
CFG = dict(vocab_size=101, context_length=32, d_model=48, num_layers=2, num_heads=4, d_ff=96, rope_theta=10000.0)
VARIANTS = {
    "mha": {},
    "gqa": {"num_kv_heads": 2},
    "tied": {"tie_embeddings": True},
    "mqa_tied": {"num_kv_heads": 1, "tie_embeddings": True},
}
TOL = dict(rtol=0, atol=1e-5)  # float32


def build(**change) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(**{**CFG, **change}).eval()


def packed(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def window(lengths: list[int], seed: int, delimiter: str) -> list[int]:
    """Documents of the given lengths (eot included) concatenated: with "after" each ends with EOT, with "before"
    each starts with it (except a first one cut mid-document: no leading EOT then)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        body = torch.randint(1, 101, (n,), generator=g).tolist()
        if delimiter == "after":
            body[-1] = EOT
        elif i > 0:
            body[0] = EOT
        out += body
    return out


# -- doc_ids ------------------------------------------------------------------------------------------------------
E = EOT


@pytest.mark.parametrize(
    ("row", "after", "before"),
    [
        ([5, 6, 7, 8], [0, 0, 0, 0], [0, 0, 0, 0]),  # no eot
        ([E, 6, 7, 8], [0, 1, 1, 1], [0, 0, 0, 0]),  # eot first
        ([5, 6, 7, E], [0, 0, 0, 0], [0, 0, 0, 1]),  # eot last
        ([5, E, E, 8], [0, 0, 1, 2], [0, 1, 2, 2]),  # twice in a row
        ([E, E, 7, E], [0, 1, 2, 2], [0, 1, 1, 2]),
        ([E], [0], [0]),
        ([E, E, E], [0, 1, 2], [0, 1, 2]),
    ],
)
def test_doc_ids_exact_values_for_both_conventions(row, after, before):
    x = packed([row, [9] * len(row)])  # a second row without eot: rows are numbered independently
    assert doc_ids(x, EOT).tolist() == [after, [0] * len(row)]
    assert doc_ids(x, EOT, "after").dtype == torch.int64
    assert doc_ids(x, EOT, delimiter="before").tolist() == [before, [0] * len(row)]
    assert doc_ids(x[0], EOT).tolist() == after  # (T,) as well as (B, T)


def test_doc_ids_refuses_a_bad_delimiter_and_non_integer_tokens():
    with pytest.raises(ValueError, match="delimiter must be one of 'after', 'before', got 'bos'"):
        doc_ids(packed([[1, 2]]), EOT, "bos")
    with pytest.raises(ValueError, match="integer token ids, got a torch.float32"):
        doc_ids(torch.zeros(1, 3), EOT)
    with pytest.raises(ValueError, match="got a scalar"):
        doc_ids(torch.tensor(3), EOT)
    for bad in (None, 0.0, True, "0", -1, np.int64(-3)):  # a negative id is no token: all zeros, silently
        with pytest.raises(ValueError, match="eot_id must be an integer token id"):
            doc_ids(packed([[1, 2]]), bad)


@pytest.mark.parametrize("delimiter", ["after", "before"])
def test_doc_ids_of_empty_windows_and_other_integer_dtypes(delimiter):
    assert doc_ids(torch.zeros(2, 0, dtype=torch.int64), EOT, delimiter).shape == (2, 0)
    x = packed([[5, E, 7, E, 9]])
    expected = doc_ids(x, EOT, delimiter)
    for dtype in (torch.int32, torch.uint8, torch.int16):
        assert torch.equal(doc_ids(x.to(dtype), EOT, delimiter), expected)
    model = build()
    with torch.no_grad():  # int32 doc ids: the same logits
        assert torch.equal(model(x, doc_ids=expected.int()), model(x, doc_ids=expected))


def test_positions_restart_at_each_document_start_and_the_mask_is_block_causal():
    ids = packed([[0, 0, 1, 1, 1, 4], [0, 0, 0, 0, 0, 0]])  # ids need not be consecutive, only non-decreasing
    assert document_positions(ids).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    att = document_attention(ids)
    assert att.positions.shape == (2, 1, 6)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[0:2, 0:2] = expected[2:5, 2:5] = expected[5, 5] = True
    expected &= torch.ones(6, 6, dtype=torch.bool).tril()
    assert att.mask.dtype == torch.bool and att.mask.shape == (2, 1, 6, 6)
    assert torch.equal(att.mask[0, 0], expected) and torch.equal(att.mask[1, 0], torch.ones(6, 6).tril().bool())


# -- the model: each document equals that document alone ----------------------------------------------------------
def documents_alone(model: TransformerLM, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The reference: each document of each row run alone through the unmasked model, from position 0."""
    out = torch.empty(*x.shape, CFG["vocab_size"])
    for b in range(x.shape[0]):
        for d in ids[b].unique().tolist():
            where = ids[b] == d
            out[b, where] = model(x[b : b + 1, where])[0]
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("delimiter", ["after", "before"])
@torch.no_grad()
def test_each_document_of_a_packed_window_equals_it_run_alone(variant, delimiter):
    model = build(**VARIANTS[variant])
    x = packed(
        [
            window([5, 1, 9, 12, 5], 1, delimiter),  # a one-token document too
            window([32], 2, delimiter),  # one document filling the window
            window([1] * 32, 3, delimiter),  # every token an eot
            window([20, 12], 4, delimiter),
        ]
    )
    ids = doc_ids(x, EOT, delimiter)
    assert ids[0].max() == 4 and ids[2].max() == 31  # the windows hold what they were built to
    masked = model(x, doc_ids=ids)
    torch.testing.assert_close(masked, documents_alone(model, x, ids), **TOL)
    assert not torch.allclose(masked[0], model(x[:1])[0], **TOL)  # not the unmasked model's


@pytest.mark.parametrize("variant", ["mha", "gqa"])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager, as meant here
@torch.no_grad()
def test_the_flex_block_mask_gives_the_dense_masks_numbers_on_the_cpu(variant, monkeypatch):
    """The CUDA path's BlockMask (mask_mod) and FlexAttention call, run eagerly on the CPU (forward only)."""
    model = build(**VARIANTS[variant])
    x = packed([window([5, 1, 9, 12, 5], 1, "after"), window([20, 12], 4, "after")])
    ids = doc_ids(x, EOT)
    dense = model(x, doc_ids=ids)
    real = model_module.document_attention
    assert type(real(ids, use_flex=True).mask).__name__ == "BlockMask"
    monkeypatch.setattr(model_module, "document_attention", lambda i: real(i, use_flex=True))
    flex = model(x, doc_ids=ids)
    torch.testing.assert_close(flex, dense, **TOL)
    torch.testing.assert_close(flex, documents_alone(model, x, ids), **TOL)


def test_the_mask_is_built_once_per_forward_and_shared_by_every_layer(monkeypatch):
    model = build()
    built, seen = [], []
    real = model_module.document_attention
    monkeypatch.setattr(model_module, "document_attention", lambda i: built.append(real(i)) or built[-1])
    for block in model.layers:
        real_attn = block.attn.forward
        monkeypatch.setattr(block.attn, "forward", lambda x, p, d, f=real_attn: seen.append(d) or f(x, p, d))
    x = packed([window([10, 22], 1, "after")])
    model(x, doc_ids=doc_ids(x, EOT))
    assert len(built) == 1 and len(seen) == 2 and all(d is built[0] for d in seen)


def test_the_loss_with_masking_differs_and_gradients_flow():
    model = build(**VARIANTS["gqa"]).train()
    x = packed([window([7, 9, 17], 1, "after"), window([33], 2, "after")])
    inputs, targets = x[:, :-1], x[:, 1:]

    def loss(**kw):
        return F.cross_entropy(model(inputs, **kw).flatten(0, 1), targets.flatten())

    masked = loss(doc_ids=doc_ids(inputs, EOT))
    assert abs(masked.item() - loss().item()) > 1e-4  # the multi-document row sees less context
    masked.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


def test_a_single_document_window_with_masking_is_the_plain_model():
    model = build()
    x = packed([window([20], 1, "before"), window([20], 2, "before")])
    with torch.no_grad():
        torch.testing.assert_close(model(x, doc_ids=torch.zeros_like(x)), model(x), **TOL)


def test_without_doc_ids_the_model_runs_todays_kernels_bitwise(monkeypatch):
    """doc_ids=None: SDPA with is_causal and no mask, positions arange(T): the same logits as the blocks run by
    hand the way the model ran before masking existed."""
    model = build(**VARIANTS["gqa"])
    x = packed([window([10, 15], 1, "after")] * 2)
    assert torch.equal(model(x, torch.zeros_like(x)), model(x, doc_ids=torch.zeros_like(x)))  # its 2nd argument
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        model_module.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(k) or real_sdpa(*a, **k)
    )
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out, model(x, doc_ids=None))
        h, positions = model.token_embeddings(x), torch.arange(x.shape[1])
        for block in model.layers:
            attn = block.attn
            q, k, v = attn._qkv(block.ln1(h), positions)
            y = real_sdpa(q, k, v, is_causal=True, enable_gqa=True)
            h = h + attn.output_proj(y.transpose(1, 2).flatten(-2))
            h = h + block.ffn(block.ln2(h))
        assert torch.equal(out, model.lm_head(model.ln_final(h)))
    assert calls and all(k == {"enable_gqa": True, "is_causal": True} for k in calls)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda x: x.float(), "must be an integer tensor .* got torch.float32"),
        (lambda x: x.bool(), "must be an integer tensor .* got torch.bool"),
        (lambda x: x[:, :-1], r"doc_ids of shape \(2, 9\) for token ids of shape \(2, 10\)"),
        (lambda x: x[0], r"doc_ids of shape \(10,\) for token ids of shape \(2, 10\)"),
        (lambda x: x.tolist(), "must be a torch.Tensor of document numbers, got list"),
        (lambda x: x.flip(-1), "non-decreasing along each row"),
    ],
)
def test_bad_doc_ids_are_refused_with_what_to_do(bad, message):
    model = build()
    x = packed([window([4, 6], 1, "after")] * 2)
    with pytest.raises(ValueError, match=message):
        model(x, doc_ids=bad(doc_ids(x, EOT)))


def test_positions_and_doc_ids_together_are_refused():
    model, x = build(), packed([[1, 2, 3]])
    with pytest.raises(ValueError, match="pass positions or doc_ids, not both"):
        model(x, torch.zeros_like(x), positions=torch.arange(3))


def test_a_one_dimensional_batch_with_doc_ids_is_refused():
    model, x = build(), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=r"both must be \(B, T\)"):
        model(x, doc_ids=torch.zeros_like(x))


# -- generation ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tokens", "after", "before"),
    [
        ([5, 6, 7], [5, 6, 7], [5, 6, 7]),
        ([5, E, 7, 8], [7, 8], [E, 7, 8]),
        ([5, 6, E], [5, 6, E], [E]),  # "after": a final eot is still the current document's
        ([E, E], [E], [E]),
        ([E], [E], [E]),
        ([5, E, E, 8, E], [8, E], [E]),
    ],
)
def test_current_document_for_both_conventions(tokens, after, before):
    assert current_document(tokens, DocMask(EOT)) == after
    assert current_document(tokens, DocMask(EOT, "before")) == before
    with pytest.raises(ValueError, match="delimiter must be one of"):
        current_document(tokens, DocMask(EOT, "bos"))


def masked_reference(model: TransformerLM, stream: list[int], delimiter: str) -> torch.Tensor:
    """Next-token logits (V,) after ``stream`` from the full masked forward of all of it (it fits the context)."""
    x = packed([stream])
    return model(x, doc_ids=doc_ids(x, EOT, delimiter))[0, -1]


@pytest.mark.parametrize("delimiter", ["after", "before"])
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("variant", ["mha", "gqa"])
@torch.no_grad()
def test_each_step_of_the_window_equals_the_full_masked_forward(delimiter, use_cache, variant):
    """Generation with an unmasked cache over the current document only, at every step, equals the masked model
    over the whole prompt and continuation; appended eots start new documents both ways."""
    model = build(**VARIANTS[variant])
    prompt = window([6, 5, 4], 1, delimiter)  # 15 tokens, two eots inside
    doc_mask = DocMask(EOT, delimiter)
    win = ContextWindow(model, prompt, use_cache, doc_mask)
    stream = list(prompt)
    assert win.tokens == current_document(prompt, doc_mask)
    for token in [7, 8, EOT, 9, EOT, EOT, 10, 11]:  # 23 tokens in all: within the context
        torch.testing.assert_close(win.logits, masked_reference(model, stream, delimiter), **TOL)
        stream.append(token)
        win.append(token)
        assert win.tokens == current_document(stream, doc_mask)
    torch.testing.assert_close(win.logits, masked_reference(model, stream, delimiter), **TOL)


@pytest.mark.parametrize(
    ("delimiter", "tail", "alone_length"),
    [
        ("after", [3, 4, 5], 3),  # mid-document: the tokens after the last eot
        ("after", [3, 4, E], 3),  # a final eot ends the current document: it stays, the next token starts anew
        ("before", [E, 3, 4, 5], 4),  # from the last eot on
        ("before", [E], 1),
    ],
)
def test_generation_after_an_eot_in_the_prompt_is_generation_from_the_last_document(delimiter, tail, alone_length):
    model = build()
    doc_mask = DocMask(EOT, delimiter)
    prompt = window([9, 7], 1, delimiter) + tail
    alone = current_document(prompt, doc_mask)
    assert alone == tail[-alone_length:]
    kwargs = dict(temperature=0.9, top_p=0.95, seed=3, doc_mask=doc_mask)
    got = generate(model, prompt, 40, **kwargs)  # past the context: the policy's refills inside the document
    assert got == generate(model, alone, 40, **kwargs) == generate(model, alone, 40, **{**kwargs, "use_cache": False})
    assert len(got) == 40  # no eot_id given: it never stops early
    assert generate(model, prompt, 40, temperature=0.9, top_p=0.95, seed=3) != got  # the unmasked model differs


@pytest.mark.parametrize("delimiter", ["after", "before"])
def test_a_prompt_of_only_eots_starts_a_document(delimiter):
    model = build()
    kwargs = dict(temperature=0, doc_mask=DocMask(EOT, delimiter))
    assert generate(model, [EOT, EOT, EOT], 5, **kwargs) == generate(model, [EOT], 5, **kwargs)


# -- CUDA ---------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("variant", ["mha", "gqa"])
def test_flex_attention_on_cuda_equals_each_document_alone_and_trains(variant):
    """Compiled FlexAttention with the BlockMask, float32: forward against each document alone, and backward."""
    model = build(**VARIANTS[variant], d_model=64).cuda()  # d_head 16: FlexAttention's smallest tile
    x = packed([window([5, 1, 9, 12, 5], 1, "after"), window([20, 12], 4, "after")]).cuda()
    ids = doc_ids(x, EOT)
    assert not isinstance(document_attention(ids).mask, torch.Tensor)  # a BlockMask on CUDA
    with torch.no_grad():
        masked = model(x, doc_ids=ids)
        # float32 on both, summed in another order by another kernel: looser than the CPU tests
        reference = documents_alone(model.cpu(), x.cpu(), ids.cpu())
        torch.testing.assert_close(masked.cpu(), reference, rtol=0, atol=2e-4)
    model.cuda().train()
    model(x, doc_ids=ids).float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_package_exports_its_documented_names():
    import lmtrain
    from lmtrain import datasources, documents

    assert [getattr(lmtrain, name) for name in lmtrain.__all__]  # every listed name resolves
    assert lmtrain.document_attention is documents.document_attention
    assert lmtrain.current_document is documents.current_document
    assert lmtrain.DocumentAttention is documents.DocumentAttention
    assert lmtrain.parse_sources(["web=a@0.7", "b@0.3"], weighted=True) == [
        lmtrain.DataSource("web", "a", 0.7),
        lmtrain.DataSource("b", "b", 0.3),
    ]
    assert lmtrain.DataSource is datasources.DataSource
