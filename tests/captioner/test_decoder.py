import os
import shutil

import pytest
import torch
import torch.nn.functional as nnf

from captioner.decoder import Decoder, Dropout, TrainedAttentionWeights, attention_weights
from captioner.decoding import DecodeConfig, generate
from tests.conftest import needs_torchscript, tiny_decoder_config

B, P, E = 3, 5, 24


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(B, P, E, generator=g)
    return regions, regions.mean(dim=1)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("layers", [1, 2])
def test_shapes_and_every_parameter_gets_a_gradient(cell, attention, layers):
    torch.manual_seed(0)
    decoder = Decoder(tiny_decoder_config(20, cell=cell, attention=attention, num_layers=layers, dropout=0.1))
    regions, pooled = _inputs()
    tokens = torch.randint(4, 20, (B * 2, 7))  # two captions per image
    logits, alphas = decoder(regions, pooled, tokens)
    assert logits.shape == (B * 2, 7, 20)
    if attention:
        assert alphas.shape == (B * 2, 7, P)
        assert torch.allclose(alphas.sum(dim=-1), torch.ones(B * 2, 7), atol=1e-5)
    else:
        assert alphas is None
    loss = nnf.cross_entropy(logits.flatten(0, 1), torch.randint(0, 20, (B * 2 * 7,)))
    if attention:
        loss = loss + alphas.pow(2).sum()
    loss.backward()
    for name, parameter in decoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("fp16_weights", [False, True])
@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("layers", [1, 2])
def test_step_api_matches_teacher_forcing(attention, fp16_weights, layers):
    """Decoding (cached word-gate table, broadcast image constants, for weights stored in fp16
    the packed fp16-weight products, and for one layer with attention the scripted step)
    computes what training computes."""
    torch.manual_seed(1)
    decoder = Decoder(tiny_decoder_config(20, attention=attention, num_layers=layers)).eval()
    if fp16_weights:  # as loaded from an exported or bundled checkpoint
        decoder.load_state_dict({k: v.half().float() for k, v in decoder.state_dict().items()})
    regions, pooled = _inputs(1)
    tokens = torch.randint(4, 20, (B, 6))
    with torch.no_grad():
        forced, forced_alpha = decoder(regions, pooled, tokens)
        state = decoder.init_state(regions, pooled)
        packed = state.fast.top.parts[0] is not None
        assert packed == (fp16_weights and "fbgemm" in torch.backends.quantized.supported_engines)
        for t in range(tokens.shape[1]):
            logits, state, alpha = decoder.step(tokens[:, t], state)
            assert torch.allclose(logits, forced[:, t], atol=1e-5)
            if attention:
                assert torch.allclose(alpha, forced_alpha[:, t], atol=1e-6)


@needs_torchscript
@pytest.mark.parametrize("products", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("images", [1, 6])  # 3 and 18 rows: bf16 takes its own product from 16 rows
@pytest.mark.parametrize("fp16_weights, tie", [(True, True), (False, True), (True, False)])
def test_scripted_step_computes_the_python_step_exactly(products, images, fp16_weights, tie):
    """The default decoder's inference step runs as one TorchScript function; it must give the
    numbers the Python step gives, bit for bit, in every precision of the products."""
    torch.manual_seed(0)
    decoder = Decoder(tiny_decoder_config(20, attention=True, num_layers=1, tie_embeddings=tie)).eval()
    if fp16_weights:  # as loaded from an exported or bundled checkpoint
        decoder.load_state_dict({k: v.half().float() for k, v in decoder.state_dict().items()})
    decoder.products = products
    regions = torch.randn(images, P, E)
    with torch.no_grad():
        state = decoder.init_state(regions, regions.mean(dim=1)).repeat(3)
        assert isinstance(state.fast.step, torch.jit.ScriptFunction)  # compiled, not the Python fallback
        for tokens in torch.randint(4, 20, (4, images * 3)):
            logits, scripted, alpha = decoder.step(tokens, state)
            fast = state.fast
            expected, state, expected_alpha = decoder._advance(fast.word_table.index_select(0, tokens), state, fast)
            assert torch.equal(logits, expected) and torch.equal(alpha, expected_alpha)
            assert torch.equal(scripted.h, state.h) and torch.equal(scripted.c, state.c)


@needs_torchscript
@pytest.mark.parametrize("cell, layers, runtime", [("lstm", 1, "torchscript"), ("lstm", 2, "python"), ("gru", 1, "python")])
def test_decoder_reports_how_its_step_runs(cell, layers, runtime):
    """`captioner info` says whether decoding takes the scripted step, which is about 20% faster."""
    decoder = Decoder(tiny_decoder_config(20, cell=cell, attention=True, num_layers=layers))
    assert decoder.step_runtime == runtime


def test_small_model_overfits_images_to_their_exact_captions():
    torch.manual_seed(0)
    captions = [[4, 5, 7, 8], [4, 6, 9, 10, 11], [12, 13, 14], [4, 5, 15, 9, 6, 7]]
    decoder = Decoder(tiny_decoder_config(20, dropout=0.0))
    regions = torch.randn(4, P, E)
    pooled = regions.mean(dim=1)
    inputs = torch.zeros(4, 7, dtype=torch.long)
    targets = torch.zeros(4, 7, dtype=torch.long)
    for row, caption in enumerate(captions):
        sequence = [1, *caption, 2]
        inputs[row, : len(sequence) - 1] = torch.tensor(sequence[:-1])
        targets[row, : len(sequence) - 1] = torch.tensor(sequence[1:])
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    for _ in range(150):
        logits, _ = decoder(regions, pooled, inputs)
        loss = nnf.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    decoder.eval()
    config = DecodeConfig(num_beams=1, no_repeat_ngram_size=0)
    results = generate(decoder, regions, pooled, config, bos_id=1, eos_id=2, banned_ids=(0, 1, 3))
    assert [r[0].tokens for r in results] == captions
    assert all(r[0].finished for r in results)


@pytest.mark.parametrize("overrides", [{}, {"num_layers": 2}, {"attention": False}, {"cell": "gru"},
                                       {"tie_embeddings": False}])
def test_fused_training_step_computes_the_plain_loss_and_gradients(overrides):
    """The fused forward (one product for the top layer's projections, one output product for all
    steps) against the step-by-step, module-by-module one, with dropout drawn from the same seed."""
    import torch.nn.functional as nnf

    torch.manual_seed(0)
    decoder = Decoder(tiny_decoder_config(20, dropout=0.3, **overrides)).train()
    regions = torch.randn(3, 5, 24)
    tokens = torch.randint(4, 20, (6, 7))
    results = []
    for fused in (True, False):
        decoder.zero_grad()
        torch.manual_seed(1)
        logits, _ = decoder(regions, regions.mean(dim=1), tokens[:, :-1], fused=fused)
        loss = nnf.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in decoder.named_parameters() if p.grad is not None}))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_keeps_each_unit_with_probability_one_minus_p_and_the_expectation():
    torch.manual_seed(0)
    x = torch.full((400, 500), 3.0, requires_grad=True)
    dropout = Dropout(0.3).train()
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 3.0 / 0.7))
    y.sum().backward()  # the gradient flows through the kept units only, scaled alike
    torch.testing.assert_close(x.grad, kept.float() / 0.7)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    assert Dropout(0.3).eval()(x) is x


def test_trained_attention_has_the_gradients_of_the_plain_formula():
    """Training's attention weights (a hand-written backward) are the inference function's
    values, and their gradients pass gradcheck in float64 for every input, with several
    sequences per image (the sum over K) and a softmax over regions (the sum over P)."""
    g = torch.Generator().manual_seed(0)
    memory_att = torch.randn(2, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)  # (B, P, A)
    query = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)  # (B, K, A)
    score = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    torch.testing.assert_close(TrainedAttentionWeights.apply(memory_att, query, score),
                               attention_weights(memory_att, query, score))
    assert torch.autograd.gradcheck(TrainedAttentionWeights.apply, (memory_att, query, score))
    alpha = TrainedAttentionWeights.apply(memory_att.float(), query.float(), score.float())
    assert alpha.dtype == torch.float32 and torch.allclose(alpha.sum(-1), torch.ones(2, 3))


@pytest.mark.integration  # torch.compile builds C++ kernels (~5 s)
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_elementwise_work_computes_the_eager_loss_and_gradients():
    """`compile_elementwise()` (training.run.compile_elementwise): the fused LSTM cell gives the
    eager step's loss and gradients, with dropout drawn alike (it stays eager)."""
    torch.manual_seed(0)
    eager = Decoder(tiny_decoder_config(20, dropout=0.3)).train()
    compiled = Decoder(tiny_decoder_config(20, dropout=0.3)).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_elementwise()
    regions, tokens = torch.randn(3, 5, 24), torch.randint(4, 20, (6, 7))
    results = []
    for decoder in (eager, compiled):
        torch.manual_seed(1)
        logits, alphas = decoder(regions, regions.mean(dim=1), tokens[:, :-1])
        loss = nnf.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + alphas.sum(1).var()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in decoder.named_parameters()}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # decoding keeps the eager functions: no compilation for its shapes
        state = compiled.eval().init_state(regions, regions.mean(dim=1))
        assert compiled.step(tokens[:, 0][:3], state)[0].shape == (3, 20)


def test_recorded_gates_reproduce_the_lstm_step():
    """record_gates: the top layer's i, f, g, o of each step give that step's c and h back, and
    a state that does not ask for them carries none."""
    decoder = Decoder(tiny_decoder_config(20)).eval()
    regions = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        state = decoder.init_state(regions, regions.mean(dim=1), record_gates=True)
        _, after, _ = decoder.step(torch.tensor([1, 1]), state)
        i, f, g, o = after.gates.unbind(1)  # each (N, D)
        assert torch.allclose(f * state.c[-1] + i * g, after.c[-1], atol=1e-6)
        assert torch.allclose(o * torch.tanh(after.c[-1]), after.h[-1], atol=1e-6)
        _, plain, _ = decoder.step(torch.tensor([1, 1]), decoder.init_state(regions, regions.mean(dim=1)))
        assert plain.gates is None
