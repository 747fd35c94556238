"""The front door: every params value is typed and checked without torch, in one line, before any folder.

Refusals are checked in-process through the CLI's own `main` (no interpreter start per case); one test
runs the real `python -m vitlab` to hold the message format, the exit code, the time and the imports."""
import shutil
import subprocess
import sys
import time

import pytest

from vitlab import __main__ as cli
from vitlab import config, machine, settings

SMOKE = str(config.PARAMS_DIR / "smoke.yaml")

REFUSED = [  # (--set value, what the one line says)
    ("finetune.epochs=0", "'finetune.epochs' is 0; it must be at least 1"),
    ("finetune.batch_size=0", "at least 1"),
    ("finetune.lr=-0.1", "positive"),
    ("finetune.lr=.inf", "finite number"),
    ("finetune.lr=.nan", "finite number"),
    ("finetune.epochs=two", "must be int"),
    ("finetune.epochs=true", "must be int"),
    ("finetune.lr=fast", "must be float"),
    ("finetune.lora=5", "'finetune.lora' must be a mapping"),
    ("finetune.lora.target_modules=[1, 2]", "list of names"),
    ("finetune.lora.target_modules=[]", "list of names"),
    ("finetune.method=probe", "set model.id"),
    ("finetune.lora.dropout=1.5", "0 <= x < 1"),
    ("finetune.processes=3", "split evenly"),
    ("data.max_per_class=-1", "null for all"),
    ("data.classes=odd", r"choose one of ['all', 'half_a', 'half_b']"),
    ("data.train_image_size=8", "set data.pipeline: gpu"),
    ("data.crop_scale=[0.9, 0.1]", "0 < low <= high <= 1"),
    ("data.valid_fraction=0.7", "between 0 and 0.5"),
    ("eval.iters=0", "'eval.iters'"),
    ("eval.latency_batch_sizes=[]", "non-empty list"),
    ("ablation.quant_types=[nf3]", "'nf4', 'fp4', 'int8'"),
    ("ablation.budget_mb=-1", "positive size in MB"),
    ("ablation.max_top1_drop_pt=150", "top-1 points"),
    ("ablation.split=validation", "choose one of"),
    ("quant.bits=3", "'quant.bits' is 3; choose one of [16, 8, 4]"),
    ("quant.bits=4.0", "choose one of [16, 8, 4]"),
    ("quant.keep_16bit=[99]", "has 2 encoder layers"),
    ("quant.keep_16bit=middle", "must be 'first_last'"),
    ("quant.bitz=4", "did you mean 'quant.bits'"),
    ("quant.bits=[8", "not valid YAML"),
    ("model.attention=flash", "choose one of"),
    ("model.attention=sdpa_cudnn", "needs a CUDA GPU"),
    ("speed.cuda_graph=true", "speed.cuda_graph (the forward replayed as a CUDA graph) needs a CUDA GPU"),
    ("model.config=null", "'model.config' must be a mapping"),
    ("model.config.hiden_size=64", "did you mean 'model.config.hidden_size'"),
    ("model.config.hidden_size=-4", "'model.config.hidden_size' is -4"),
    ("model.config.hidden_size=33", "split evenly into num_attention_heads"),
    ("model.config.image_size=18", "multiple of model.config.patch_size"),
    ("model.config.hidden_dropout_prob=2", "0 <= x < 1"),
    ("model.init=mimetic", None),  # valid: a config model may start mimetic
    ("device=null", "'device' must be str"),
    ("device=tpu", "auto, cpu, cuda or cuda:N"),
    ("seed=-1", "0 or more"),
    ("steps=[]", "at least one of"),
    ("steps=[finetune,deploy]", "unknown step"),
    ("variant=../escape", "names the run folder"),
    ("variant=a/b", "names the run folder"),
    ("speed.fp8=static", "set quant.bits: 16"),
    ("speed.fp8_gemm=triton", "set speed.fp8: static, speed.int4: w4a8"),
    ("speed.compile=reduce-overhead", "choose one of ['none', 'model', 'blocks', 'linears']"),
    ("nonsense", "--set expects key=value"),
    ("steps=[quantize,finetune]", "in the order they run: ['finetune', 'quantize']"),
    ("steps=[finetune,finetune]", "name each step once"),
    ("data.source=imagefolder", "has no train/valid/test folder"),  # data.root 'data' holds none in a clone
]


@pytest.mark.parametrize("override, message", REFUSED, ids=[r[0] for r in REFUSED])
def test_every_bad_value_gets_one_line_before_any_folder(tmp_path, capsys, override, message):
    if message is None:  # the valid control: past every check the command line makes before a run starts
        machine.check(config.validate(config.resolve(SMOKE, [override])))
        return
    code = cli.main(["run", SMOKE, "--runs-dir", str(tmp_path / "runs"), "--set", override])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("vitlab: error: ")
    assert not (tmp_path / "runs").exists()


def test_a_params_file_key_given_twice_is_refused_with_its_line(tmp_path):
    bad = tmp_path / "twice.yaml"
    bad.write_text("finetune:\n  epochs: 3\nquant:\n  bits: 8\nfinetune:\n  lr: 0.1\n")
    with pytest.raises(config.ParamsError, match=r"twice.yaml, line 5, column 1: not valid YAML \(the key 'finetune' is given twice\)"):
        config.resolve(bad)


def test_numbers_are_read_as_a_person_means_them(tmp_path):
    f = tmp_path / "lr.yaml"
    f.write_text("finetune:\n  lr: 1e-3\n  weight_decay: 5E-2\n")
    p = config.resolve(f, ["finetune.warmup_ratio=2e-1"])
    assert (p["finetune"]["lr"], p["finetune"]["weight_decay"], p["finetune"]["warmup_ratio"]) == (0.001, 0.05, 0.2)
    assert isinstance(config.resolve(f, ["finetune.epochs=3"])["finetune"]["epochs"], int)


def test_the_typed_params_are_what_the_dict_says():
    p = config.validate(config.resolve(SMOKE))
    assert isinstance(p, settings.Params) and p.finetune.lora.r == 16 and p.model.layers == 2
    assert p.speed == settings.Speed() and not p.speed.active and p.quant.describe() == "nf4+dq"
    with pytest.raises(Exception):  # frozen: a section is read, never changed in place
        p.finetune.epochs = 3


def test_the_vit_config_fields_are_transformers_own():
    from transformers import ViTConfig

    assert settings.VIT_CONFIG_FIELDS == set(ViTConfig().to_dict())


@pytest.mark.e2e
def test_the_command_line_refuses_in_a_blink_without_importing_torch(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "vitlab", "run", SMOKE, "--runs-dir", str(tmp_path),
                           "--set", "finetune.epochs=0"], capture_output=True, text=True, cwd=config.REPO_ROOT)
    seconds = time.monotonic() - t0
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert proc.returncode == 2 and lines == ["vitlab: error: parameter 'finetune.epochs' is 0; it must be at least 1"]
    assert not imported & {"torch", "transformers", "torchvision", "pandas"}, imported & {"torch", "transformers"}
    assert seconds < 2.0 and not list(tmp_path.iterdir())
    help_start = time.monotonic()
    assert subprocess.run([sys.executable, "-m", "vitlab", "--help"], capture_output=True, cwd=config.REPO_ROOT).returncode == 0
    assert time.monotonic() - help_start < 2.0


@pytest.mark.parametrize("spoil, message", [
    (lambda root: shutil.rmtree(root / "test" / "c9"), "hold different class folders: ['c9']"),
    (lambda root: [p.unlink() for p in (root / "train" / "c4").iterdir()], "['train/c4'] under"),
    (lambda root: [shutil.rmtree(root / s / f"c{i}") for s in ("train", "valid", "test") for i in range(1, 10)],
     "1 class folder(s)"),
    (lambda root: (root / "train" / "c1" / "loop").symlink_to(root / "train"), "is a link to a folder above it"),
])
def test_an_imagefolder_is_checked_from_its_listing_before_any_folder(folder, tmp_path, capsys, spoil, message):
    root = tmp_path / "root"
    shutil.copytree(folder, root)
    sets = ["--set", "data.source=imagefolder", "--set", f"data.root={root}"]
    machine.check(config.validate(config.resolve(SMOKE, sets[1::2])))  # the folder as it came: fine
    spoil(root)
    code = cli.main(["run", SMOKE, "--runs-dir", str(tmp_path / "runs"), *sets])
    err = capsys.readouterr().err
    assert code == 2 and message in err and not (tmp_path / "runs").exists(), err


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [f"{prefix}{key}"]
    return out


# Values a typo, a paste or a hostile file can put anywhere: every one of them, in every field.
FUZZ = ["null", "-1", "0", "1e30", ".inf", "-.nan", "x", "[]", "{}", "[1, [2]]", "'[1'", "../../x", "true", "3.5",
        "1e-3", "' '", "{a: 1}", "999999999999999999999", "~", "'\\u0000'"]


@pytest.mark.parametrize("key", _leaves(config.defaults()))
def test_every_field_takes_any_value_without_a_traceback(tmp_path, capsys, key):
    """A fuzz of every params field: each value is either run or refused in one line, before any folder."""
    for i, value in enumerate(FUZZ):
        runs_dir = tmp_path / f"runs{i}"
        code = cli.main(["run", SMOKE, "--runs-dir", str(runs_dir), "--steps", "finetune", "--set",
                         f"{key}={value}", "--time-limit", "0.001"])  # an accepted value stops before any step runs
        err = capsys.readouterr().err
        assert code in (2, 3), f"{key}={value}: exit {code}: {err}"
        if code == 2:
            assert err.startswith("vitlab: error: ") and len(err.strip().splitlines()) == 1, f"{key}={value}: {err}"
            assert not runs_dir.exists(), f"{key}={value} made a folder before it was refused"
        else:
            (run_dir,) = runs_dir.iterdir()
            assert not (run_dir / ".heartbeat").exists() and not (run_dir / ".lock").exists()


def test_a_model_folder_that_is_not_a_safetensors_checkpoint_is_refused_before_any_folder(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"a pickle someone handed over")
    code = cli.main(["run", SMOKE, "--runs-dir", str(tmp_path / "runs"), "--set", f"model.id={model}",
                     "--set", "finetune.method=none"])
    err = capsys.readouterr().err
    assert code == 2 and "has no model.safetensors (it holds a pickled pytorch_model.bin" in err, err
    assert not (tmp_path / "runs").exists()
    code = cli.main(["run", SMOKE, "--runs-dir", str(tmp_path / "runs"), "--set", f"model.id={tmp_path / 'gone'}",
                     "--set", "finetune.method=none"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
