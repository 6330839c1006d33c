import gc

import pytest
import torch

import regcollect as rc


@pytest.fixture(autouse=True)
def fresh_default_collection():
    """Every test starts with an empty default collection and deterministic weights."""
    rc.get_collection().clear()
    torch.manual_seed(0)
    yield
    rc.get_collection().clear()
    gc.collect()
    # What survived is long-lived (torch, keras, transformers, their caches): frozen, it is not
    # traversed again, so the next test's collect costs what that test allocated, not the
    # whole heap (0.2-0.8 s a test otherwise).
    gc.freeze()


@pytest.fixture
def run_in_threads():
    """``run(work, n)``: call ``work(k)`` for k in range(n), each in its own thread started
    at once; re-raise the first exception any of them raised."""
    import threading

    def run(work, n):
        errors = []
        start = threading.Barrier(n)

        def target(k):
            try:
                start.wait()
                work(k)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=target, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    return run


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["cpu", pytest.param("cuda:0", marks=CUDA, id="cuda")])
def device(request):
    """The devices a test that takes one runs on: the CPU, and CUDA where a GPU is present."""
    return torch.device(request.param)


def rounding_bound(weights, steps, momentum=0.0):
    """How far two trainings that differ only in rounding may drift apart: 8 ulps of the
    weights' scale a step, summed over ``steps``, and again by a running average of the
    gradient (momentum, Adam's first moment: a factor 1 / (1 - momentum)).

    It scales with the dtype's epsilon, so it is the same argument in float32 and float64;
    a real difference (a wrong coefficient: lr * wd * |w| a step) is orders above it here.
    """
    eps = torch.finfo(weights.dtype).eps
    scale = max(1.0, weights.detach().abs().max().item())
    return steps * 8 * eps * scale / (1.0 - momentum)


@pytest.fixture
def same_to_rounding():
    """``check(want_params, got_params, steps, momentum=0.0)``: each pair of tensors agrees
    within ``rounding_bound``."""

    def check(want, got, steps, momentum=0.0):
        want, got = list(want), list(got)
        assert len(want) == len(got)
        for a, b in zip(want, got):
            bound = rounding_bound(a, steps, momentum)
            diff = (a.detach() - b.detach()).abs().max().item()
            assert diff <= bound, f"{tuple(a.shape)}: differs by {diff:.3g} > {bound:.3g}"

    return check


@pytest.fixture
def tiny_hf_models():
    """``tiny_hf_models(transformers)``: tiny Hugging Face models built from configs."""
    return tiny_models


def tiny_models(transformers):
    """``{name: (model, rows)}``: BERT, GPT-2, T5, CLIP, ConvNeXt and Wav2Vec2, each tiny, with
    16 training rows (Wav2Vec2 without rows: its decay set only)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    text = {"vocab_size": 30}
    # One tiny transformer block, as BERT, CLIP's two towers and Wav2Vec2 name its sizes.
    block = {
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    out = {}
    bert = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            **block,
            max_position_embeddings=16,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=2,
            **text,
        )
    )
    out["bert"] = (
        bert,
        [
            {"input_ids": torch.randint(0, 30, (6,), generator=g), "labels": torch.tensor(i % 2)}
            for i in range(16)
        ],
    )
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_embd=8,
            n_layer=1,
            n_head=2,
            n_positions=16,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **text,
        )
    )
    ids = [torch.randint(0, 30, (6,), generator=g) for _ in range(16)]
    out["gpt2"] = (gpt2, [{"input_ids": i, "labels": i.clone()} for i in ids])
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            d_model=8,
            d_kv=4,
            d_ff=16,
            num_layers=1,
            num_heads=2,
            dropout_rate=0.0,
            decoder_start_token_id=0,
            pad_token_id=0,
            **text,
        )
    )
    out["t5"] = (
        t5,
        [
            {
                "input_ids": torch.randint(1, 30, (6,), generator=g),
                "labels": torch.randint(1, 30, (4,), generator=g),
            }
            for _ in range(16)
        ],
    )
    clip = transformers.CLIPModel(
        transformers.CLIPConfig(
            text_config={**block, "max_position_embeddings": 16, **text},
            vision_config={**block, "image_size": 8, "patch_size": 4},
            projection_dim=8,
        )
    )
    out["clip"] = (
        clip,
        [
            {
                "input_ids": torch.randint(0, 30, (6,), generator=g),
                "pixel_values": torch.randn(3, 8, 8, generator=g),
                "return_loss": True,
            }
            for _ in range(16)
        ],
    )
    convnext = transformers.ConvNextForImageClassification(
        transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2)
    )
    out["convnext"] = (
        convnext,
        [
            {"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": torch.tensor(i % 2)}
            for i in range(16)
        ],
    )
    wav2vec2 = transformers.Wav2Vec2ForCTC(
        transformers.Wav2Vec2Config(
            **block,
            conv_dim=(8, 8),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2,
            vocab_size=10,
        )
    )
    out["wav2vec2"] = (wav2vec2, None)
    return out
