"""Chapter 04's streamed forward passes (replbook.endor.streamed): how the paper preset
computes perplexity and Wanda's input norms of a 70B model on one GPU, its decoder blocks'
weights kept on the host and moved to the device one layer's forward pass at a time.

On the CPU the streamed model must compute exactly what the model in memory computes, from
the host tensors themselves (no copy), with each pruned set swapped in through the hooks'
weights maps and the model's own tensors back afterwards. Checked on a Llama
(``model.layers.N``) and an OPT (``model.decoder.layers.N``, its head tied to its input
embedding), the two architectures of the paper preset."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from replbook import endor, lm


def tiny_llama():
    from replbook import models

    return models.load("tiny-llama", preset="smoke").model


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=97, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    return OPTForCausalLM(config).eval()


BUILDERS = {"llama": tiny_llama, "opt": tiny_opt}


class LinearWeights(TorchFunctionMode):
    """The weight tensor of every ``F.linear`` call made inside the mode."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            self.seen.append(args[1] if len(args) > 1 else kwargs["weight"])
        return func(*args, **kwargs)


def windows_for(model, count=2, length=12):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, model.config.vocab_size, (length,), generator=g) for _ in range(count)]


@pytest.mark.parametrize("arch", BUILDERS)
def test_a_streamed_model_computes_what_the_model_in_memory_computes_from_its_own_tensors(arch):
    model = BUILDERS[arch]()
    windows = windows_for(model)
    linears = endor.prunable_linears(model)
    own = endor.linear_weights(model)
    values = {n: w.clone() for n, w in own.items()}
    dense = lm.perplexity(model, windows)
    norms = endor.input_norms(model, windows)
    pruned = endor.pruned_weights(own, 0.5, "wanda", norms)
    with endor.weights_swapped(model, pruned):
        pruned_perplexity = lm.perplexity(model, windows)
    assert pruned_perplexity != dense

    parameters = sum(p.numel() for p in model.parameters())
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert tied == (arch == "opt")

    endor.streamed(model, "cpu")
    assert sum(p.numel() for p in model.parameters()) == parameters, "a tied head must stay tied (placed once)"
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied
    assert all(linear.weight.device.type == "meta" for linear in linears.values()), \
        "every block's weights must live on the host between forward passes, not on the module"
    assert model.get_input_embeddings().weight.device.type == "cpu", "the embeddings stay resident"
    host = endor.linear_weights(model)
    assert set(host) == set(own)
    assert all(host[n].data_ptr() == own[n].data_ptr() for n in own), "streaming must not copy the weights"

    with LinearWeights() as calls:
        assert lm.perplexity(model, windows) == dense
    used = {w.data_ptr() for w in calls.seen}
    assert {w.data_ptr() for w in own.values()} <= used, "each layer must run from the host tensor itself"
    streamed_norms = endor.input_norms(model, windows)
    assert set(streamed_norms) == set(norms) and all(torch.equal(streamed_norms[n], norms[n]) for n in norms)
    assert all(linear.weight.device.type == "meta" for linear in linears.values()), "each weight dropped after its pass"

    with endor.weights_swapped(model, pruned):
        assert all(torch.equal(own[n], values[n]) for n in own), "the model's own tensors were written into"
        swapped = endor.linear_weights(model)
        assert all(torch.equal(swapped[n], pruned[n].to(own[n].dtype)) for n in pruned)
        assert lm.perplexity(model, windows) == pruned_perplexity
    back = endor.linear_weights(model)
    assert all(back[n].data_ptr() == own[n].data_ptr() and torch.equal(back[n], values[n]) for n in own), \
        "the model's own tensors must come back"
    assert lm.perplexity(model, windows) == dense

    with pytest.raises(RuntimeError, match="inside"):
        with endor.weights_swapped(model, pruned):
            raise RuntimeError("inside the swap")
    assert all(endor.linear_weights(model)[n].data_ptr() == own[n].data_ptr() for n in own)
    assert lm.perplexity(model, windows) == dense


@pytest.mark.parametrize("arch", BUILDERS)
def test_streaming_sends_the_resident_parts_and_every_layers_pass_to_the_device(arch):
    """On the meta device (no GPU here): the embeddings, final norm and head move there; each
    block's weights stay on the host, and its hook executes on the device."""
    model = BUILDERS[arch]()
    own = endor.linear_weights(model)
    endor.streamed(model, "meta")
    for name, linear in endor.prunable_linears(model).items():
        hook = endor._offload_hook(linear)
        assert hook is not None and hook.execution_device == torch.device("meta"), name
        assert hook.weights_map["weight"].device.type == "cpu"
        assert hook.weights_map["weight"].data_ptr() == own[name].data_ptr()
    blocks = {name for name, _ in model.named_modules() if endor.BLOCK.fullmatch(name)}
    assert len(blocks) == model.config.num_hidden_layers
    resident = [(name, p) for name, p in model.named_parameters()
                if not any(name.startswith(f"{block}.") for block in blocks)]
    assert resident and all(p.device.type == "meta" for _, p in resident), "the resident parts belong on the device"
    assert model.get_output_embeddings().weight.device.type == "meta"
    assert model.device.type == "meta", "the windows go where the model's first parameters are: the device"


def test_a_model_without_decoder_blocks_is_refused():
    with pytest.raises(ValueError, match="no decoder blocks"):
        endor.streamed(torch.nn.Sequential(torch.nn.Linear(4, 4)), "cpu")
