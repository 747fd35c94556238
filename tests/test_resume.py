"""--resume tells the truth: what re-runs takes what was built on it along, a change a finished step or a
kept training state would not see is refused, a hand-edited params.yaml is checked as a new one is, and a
finished run has nothing to do. In-process, on run folders made by the real `runs.create`."""
import pytest
import yaml

from vitlab import __main__ as cli
from vitlab import runs

ALL = ["finetune", "quantize", "evaluate", "ablation", "demo"]


@pytest.fixture
def finished(smoke_params, tmp_path):
    """A run whose manifest says every step finished (its products are not needed by what is checked here)."""
    run_dir = runs.create(smoke_params, tmp_path)
    man = runs.manifest(run_dir)
    man["status"] = "ok"
    for entry in man["steps"].values():
        entry["status"] = "ok"
    runs.write_json(run_dir / "manifest.json", man)
    return run_dir


def _cli(capsys, *args):
    code = cli.main(["run", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_step_that_runs_again_takes_the_steps_built_on_it_along():
    assert runs.with_dependents(ALL, ["finetune"]) == ALL
    assert runs.with_dependents(ALL, ["quantize"]) == ["quantize", "evaluate", "demo"]
    assert runs.with_dependents(ALL, ["evaluate"]) == ["evaluate"]
    assert runs.with_dependents(["finetune", "quantize"], ["finetune"]) == ["finetune", "quantize"]


def test_a_finished_run_has_nothing_to_do(finished, capsys):
    before = runs.manifest(finished)
    code, out, err = _cli(capsys, "--resume", str(finished))
    assert code == 0 and "nothing to do" in out and "run folder" not in out and not err
    assert runs.manifest(finished) == before


@pytest.mark.parametrize("args, message", [
    (["--rerun", "evalute"], "cannot re-run 'evalute'; did you mean 'evaluate'?"),
    (["--set", "eval.iters=5"], "evaluate finished with the earlier value: add --rerun evaluate"),
    (["--set", "quant.bits=8", "--rerun", "evaluate"], "quantize finished with the earlier value"),
    (["--set", "variant=../../x"], "'variant' is fixed for an existing run"),
    (["--set", "finetune.epochs=0", "--rerun", "finetune"], "'finetune.epochs' is 0"),
])
def test_a_change_no_step_would_see_is_refused_in_one_line(finished, capsys, args, message):
    before = (finished / "params.yaml").read_text(), runs.manifest(finished)
    code, out, err = _cli(capsys, "--resume", str(finished), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out and ((finished / "params.yaml").read_text(), runs.manifest(finished)) == before  # nothing recorded


def test_a_setting_a_kept_training_state_was_made_without_is_refused(finished, capsys):
    man = runs.manifest(finished)
    man["steps"]["finetune"]["status"] = "failed"  # stopped mid-training: its state is kept for --resume
    runs.write_json(finished / "manifest.json", man)
    runs.resume_folder(finished, "finetune").mkdir(parents=True)
    code, _, err = _cli(capsys, "--resume", str(finished), "--set", "finetune.lr=0.5")
    assert code == 2 and "keeps a training state made with the earlier value" in err and "--rerun finetune" in err
    # eval.iters is not finetune's: the kept state stays valid for it, so it is not refused for finetune's sake
    assert runs.STEPS["finetune"].reads_key("finetune.lr") and not runs.STEPS["finetune"].reads_key("eval.iters")
    assert runs.STEPS["ablation"].reads_key("eval.iters") and not runs.STEPS["ablation"].reads_key("finetune.lr")  # it times the mixed choice


@pytest.mark.parametrize("edit, message", [
    (("finetune", "epochs", 0), "'finetune.epochs' is 0"),
    (("quant", "bits", 3), "'quant.bits' is 3"),
    ((None, "variant", "../../../../x/ESCAPED"), "names the run folder"),
])
def test_a_hand_edited_params_file_is_checked_as_a_new_one(finished, capsys, edit, message):
    params = yaml.safe_load((finished / "params.yaml").read_text())
    section, key, value = edit
    (params[section] if section else params)[key] = value
    (finished / "params.yaml").write_text(yaml.safe_dump(params))
    code, _, err = _cli(capsys, "--resume", str(finished), "--rerun", "evaluate")
    assert code == 2 and "params.yaml" in err and message in err, err


def test_a_time_limit_that_is_up_before_a_step_stops_there_with_exit_3(tmp_path):
    from .conftest import vitlab

    proc = vitlab("run", "params/smoke.yaml", "--runs-dir", str(tmp_path), "--steps", "finetune", "--time-limit", "0.01")
    assert proc.returncode == 3, proc.stderr
    (run_dir,) = runs.list_runs(tmp_path)
    man = runs.manifest(run_dir)
    assert man["status"] == "partial" and man["time_limit"] == "reached before finetune"
    assert man["steps"]["finetune"]["status"] == "pending"
    assert f"continue with: python -m vitlab run --resume {run_dir}" in proc.stdout
