import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import ViTForImageClassification

from vitlab import models, quant
from vitlab.quant import QuantError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base(checkpoint, bf16):
    return models.load_checkpoint(checkpoint, bf16, CPU)


def _logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x.to(torch.bfloat16)).logits.float()


@pytest.mark.parametrize("bits, cls, bound", [(8, bnb.nn.Linear8bitLt, 0.05), (4, bnb.nn.Linear4bit, 0.25)])
def test_quantized_modules_sizes_and_outputs(checkpoint, base, test_batch, bf16, nf4, bits, cls, bound):
    keep = quant.resolve_keep(base, [1])
    model = quant.quantize(checkpoint, nf4.replace(bits=bits), bf16, CPU, keep)
    for name, module in model.named_modules():
        if name in keep or name == "classifier":
            assert type(module) is nn.Linear, name
        elif name in models.block_linears(model):
            assert isinstance(module, cls), name
    assert len(keep) == 6 and all(".1." in n for n in keep)
    assert models.parameter_bytes(model) < models.parameter_bytes(base)
    ref, got = _logits(base, test_batch), _logits(model, test_batch)
    assert ((got - ref).norm() / ref.norm()).item() < bound


def test_keep_16bit_selectors(base):
    names = models.block_linears(base)
    assert quant.resolve_keep(base, "first_last") == [n for n in names if models.layer_index(base, n) in (0, 2)]
    assert quant.resolve_keep(base, [-1]) == [n for n in names if models.layer_index(base, n) == 2]
    assert quant.resolve_keep(base, [r"mlp\.fc2"]) == [n for n in names if n.endswith("fc2")]
    with pytest.raises(QuantError, match="has 3 encoder layers"):
        quant.resolve_keep(base, [21])
    with pytest.raises(QuantError, match="matches no linear layer"):
        quant.resolve_keep(base, ["dense_h_to_4h"])


def test_saved_quantized_model_reloads_identically(checkpoint, tmp_path, test_batch, bf16, nf4):
    model = quant.quantize(checkpoint, nf4, bf16, CPU)
    quant.save(model, checkpoint, tmp_path / "q")
    assert (tmp_path / "q" / "preprocessor_config.json").is_file()
    again = models.load_checkpoint(tmp_path / "q", bf16, CPU)
    assert isinstance(again.vit.layers[0].mlp.fc1, bnb.nn.Linear4bit)
    torch.testing.assert_close(_logits(again, test_batch), _logits(model, test_batch))
    assert models.disk_bytes(tmp_path / "q") < models.disk_bytes(checkpoint)


def test_layer_table_reports_every_linear(checkpoint, base, bf16, nf4):
    model = quant.quantize(checkpoint, nf4.replace(bits=8), bf16, CPU, quant.resolve_keep(base, [0]))
    table = quant.layer_table(model)
    assert len(table) == 3 * 6 + 1
    assert table.set_index("module").loc["classifier", "quantized"] == False  # noqa: E712
    assert table["quantized"].sum() == 12
    assert set(table.loc[table["quantized"], "weight_dtype"]) == {"int8"}


def test_sixteen_bits_is_the_plain_checkpoint(checkpoint, bf16, nf4):
    model = quant.quantize(checkpoint, nf4.replace(bits=16), bf16, CPU)
    assert isinstance(model, ViTForImageClassification)
    assert not any(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in model.modules())


def test_settings_are_typed_once_from_params(nf4):
    from vitlab import config
    assert nf4.bits == 4 and nf4.compute_dtype is torch.bfloat16 and nf4.keep_16bit == () and nf4.describe() == "nf4+dq"
    q = quant.QuantSettings.from_params(config.resolve(config.PARAMS_DIR / "int8_sdpa.yaml")["quant"])
    assert q.describe() == "int8" and q.replace(bits=16).describe() == "16-bit"
    assert quant.QuantSettings.from_params({**config.defaults()["quant"], "keep_16bit": "first_last"}).keep_16bit == "first_last"
