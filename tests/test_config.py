import pytest
import torch

from vitlab import config, machine
from vitlab.config import ParamsError
from vitlab.errors import DataError


def test_variant_overrides_only_what_it_names():
    p = config.resolve(config.PARAMS_DIR / "nf4_flash.yaml")
    d = config.defaults()
    assert p["variant"] == "nf4_flash"
    assert p["quant"]["bits"] == 4 and p["model"]["attention"] == "sdpa_flash"
    assert p["finetune"] == d["finetune"] and p["data"] == d["data"]


def _on_this_machine(params: dict) -> None:
    machine.check(config.validate(params))


def test_every_shipped_variant_is_valid():
    for path in config.PARAMS_DIR.glob("*.yaml"):
        params = config.resolve(path)
        root = config.REPO_ROOT / params["data"]["root"]
        if (params["finetune"]["cuda_graph"] or params["speed"]["cuda_graph"]) and not torch.cuda.is_available():
            with pytest.raises(ParamsError, match="needs a CUDA GPU"):  # refused here, before any work
                _on_this_machine(params)
        elif params["data"]["source"] == "imagefolder" and not (root / "train").is_dir():
            with pytest.raises(DataError, match="has no train/valid/test folder"):  # the data is not on this machine
                _on_this_machine(params)
        else:
            _on_this_machine(params)


def test_cuda_graph_training_is_checked_before_any_work():
    with pytest.raises(ParamsError, match="does not combine"):
        config.resolve(config.PARAMS_DIR / "smoke.yaml", ["finetune.cuda_graph=true", "finetune.mixed_precision=fp16"])
    with pytest.raises(ParamsError, match="compile: blocks it does"):  # a whole-model compile is not captured
        config.resolve(config.PARAMS_DIR / "smoke.yaml", ["finetune.cuda_graph=true", "finetune.compile=true"])
    config.resolve(config.PARAMS_DIR / "smoke.yaml", ["finetune.cuda_graph=true", "finetune.compile=blocks"])
    with pytest.raises(ParamsError, match="qlora_base: torchao it does"):  # bitsandbytes' 4-bit base is a library call
        config.resolve(config.PARAMS_DIR / "smoke.yaml", ["finetune.cuda_graph=true", "finetune.method=qlora", "model.id=x/vit"])
    config.resolve(config.PARAMS_DIR / "smoke.yaml",
                   ["finetune.cuda_graph=true", "finetune.method=qlora", "finetune.qlora_base=torchao", "model.id=x/vit"])
    with pytest.raises(ParamsError, match="method full has none"):
        config.resolve(config.PARAMS_DIR / "smoke.yaml", ["finetune.qlora_base=torchao"])
    with pytest.raises(ParamsError, match="finetune.compile"):
        config.resolve(config.PARAMS_DIR / "smoke.yaml", ["finetune.compile=block"])
    with pytest.raises(ParamsError, match="needs a CUDA GPU"):
        _on_this_machine(config.resolve(config.PARAMS_DIR / "smoke.yaml", ["finetune.cuda_graph=true", "device=cpu"]))
    # Steps that do not train do not care.
    _on_this_machine(config.resolve(config.PARAMS_DIR / "smoke.yaml",
                                    ["finetune.cuda_graph=true", "device=cpu", "steps=[evaluate]"]))


def test_set_overrides_parse_yaml_values():
    p = config.resolve(config.PARAMS_DIR / "smoke.yaml", ["quant.bits=8", "quant.keep_16bit=[0, 1]", "model.id=null"])
    assert p["quant"]["bits"] == 8 and p["quant"]["keep_16bit"] == [0, 1] and p["model"]["id"] is None


def test_model_config_is_merged_key_by_key():
    p = config.resolve(config.PARAMS_DIR / "offline.yaml", ["model.config.patch_size=8"])
    assert p["model"]["config"]["patch_size"] == 8 and p["model"]["config"]["image_size"] == 32


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant:\n  bitz: 4\n")
    with pytest.raises(ParamsError, match=r"unknown parameter 'quant.bitz'; did you mean 'quant.bits'"):
        config.resolve(bad)


def test_unknown_model_config_field():
    with pytest.raises(ParamsError, match="model.config.hiden_size.*hidden_size"):
        config.resolve(config.PARAMS_DIR / "smoke.yaml", ["model.config.hiden_size=64"])


def test_progressive_resizing_is_checked_before_any_work():
    gpu = ["data.pipeline=gpu"]
    assert config.resolve(config.PARAMS_DIR / "smoke.yaml", gpu + ["data.train_image_size=8"])["data"]["train_image_size"] == 8
    with pytest.raises(ParamsError, match=r"multiple of the patch size \(4\)"):
        config.resolve(config.PARAMS_DIR / "smoke.yaml", gpu + ["data.train_image_size=10"])
    with pytest.raises(ParamsError, match="full_size_epochs"):
        config.resolve(config.PARAMS_DIR / "smoke.yaml", gpu + ["data.train_image_size=8", "finetune.full_size_epochs=3"])


def test_lora_needs_a_pretrained_model():
    with pytest.raises(ParamsError, match="set model.id"):
        config.resolve(config.PARAMS_DIR / "smoke.yaml", ["finetune.method=lora"])


def test_missing_params_file_lists_variants(tmp_path):
    with pytest.raises(ParamsError, match="offline"):
        config.resolve(tmp_path / "nope.yaml")
