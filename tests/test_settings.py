"""Settings are checked when a config is read, before any model loads: every error names the key
(its full path as written) and the value; a resumed training run refuses settings other than
those its checkpoint was written with (unless allowed) and a model of other shapes (one error)."""

from __future__ import annotations

import math
import os

import pytest

from dreamr_jax.config import ConfigError, load_config
from dreamr_jax.training.sapo_trainer import SAPOConfig, load_sapo_config
from dreamr_jax.cli import main as dreamr_main
from dreamr_jax.training.scaffold import changed_settings, settings_of
from dreamr_jax.training.sft import SFTConfig, load_sft_config, train
from dreamr_jax.speculative.config import REJECT_ALL, SpeculationConfig
from dreamr_jax.speculative.steps import StepConfig

from helpers.training import TINY_WORLD_ARCH, tiny_sft_config

ROOT = os.path.join(os.path.dirname(__file__), "..")
PAIR = os.path.join(ROOT, "configs", "synthetic.yaml")
SFT = os.path.join(ROOT, "configs", "sft_synthetic_target.yaml")
SAPO = os.path.join(ROOT, "configs", "sapo_synthetic.yaml")


# ---- each bad setting is an error naming its key and value -----------------------------------------------

# (overrides on configs/synthetic.yaml, text the error must hold: the key's full path and the value)
PAIR_CASES = [
    (["spec.alpha=1.5"], ["spec.alpha", "1.5"]),
    (["spec.alpha=-0.2"], ["spec.alpha", "-0.2"]),
    (["spec.alpha="], ["spec.alpha", "empty"]),
    (["spec.alpha=.nan"], ["spec.alpha", "nan"]),
    (["spec.top_p=2.0"], ["spec.top_p", "2.0"]),
    (["spec.top_p=0"], ["spec.top_p", "0"]),
    (["spec.draft_temperature=-1"], ["spec.draft_temperature", "-1"]),
    (["spec.steps.max_step_tokens=0"], ["spec.steps.max_step_tokens", "0"]),
    (["spec.steps.token_budget=0"], ["spec.steps.token_budget", "0"]),
    (["spec.steps.token_budget=-4"], ["spec.steps.token_budget", "-4"]),
    (["spec.steps.max_steps=0"], ["spec.steps.max_steps", "0"]),
    (["spec.window=0"], ["spec.window", "0"]),
    (["spec.window=two"], ["spec.window", "'two'"]),
    (["spec.window=2.5"], ["spec.window", "2.5"]),
    (["spec.sd_tokens=0"], ["spec.sd_tokens", "0"]),
    (["spec.fallback_chunk=0"], ["spec.fallback_chunk", "0"]),
    (["spec.specreason_threshold=11"], ["spec.specreason_threshold", "11"]),
    (["spec.gather_checks=1"], ["spec.gather_checks", "1"]),
    (["spec.alpha.deep=3"], ["spec.alpha", "deep"]),
    (["spec.steps=5"], ["spec.steps", "5"]),
    (["spec.keywords.negative=no"], ["spec.keywords.negative", "False", "quote"]),
    (["spec.keywords.policy=all"], ["spec.keywords.policy", "'all'"]),
    (["spec.alpah=0.5"], ["spec.alpah"]),
    (["spec.steps.budget=5"], ["spec.steps.budget"]),
    (["draft_devices=0"], ["draft_devices", "0"]),
    (["dtype=float64"], ["dtype", "float64"]),
]


@pytest.mark.parametrize("overrides,wanted", PAIR_CASES, ids=[c[0][0] for c in PAIR_CASES])
def test_pair_config_errors_name_the_key(overrides, wanted):
    with pytest.raises(ConfigError) as got:
        load_config(PAIR, overrides)
    message = str(got.value)
    for text in wanted:
        assert text in message, (text, message)
    assert "\n" not in message and got.value.__cause__ is None


@pytest.mark.parametrize("text,wanted", [
    ("target: t\nspec:\n  alpha:\n", ["spec.alpha", "empty"]),  # empty in YAML: None, not a silent NaN
    ("target: t\nspec:\n  keywords: {positive: yes, negative: 'no'}\n", ["spec.keywords.positive", "True"]),
    ("target: t\nspec:\n  keywords:\n    negative: no\n", ["spec.keywords.negative", "False"]),
    ("target: t\nspec: 3\n", ["spec", "3"]),
    ("spec: {alpha: 0.5}\n", ["missing", "target"]),
    ("- a\n- b\n", ["mapping"]),
], ids=["alpha-empty", "keyword-yes", "keyword-no", "spec-not-mapping", "missing-target", "not-a-mapping"])
def test_yaml_file_errors_name_the_key(tmp_path, text, wanted):
    path = tmp_path / "pair.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as got:
        load_config(str(path))
    assert str(path) in str(got.value)
    for part in wanted:
        assert part in str(got.value), (part, str(got.value))


@pytest.mark.parametrize("overrides,wanted", [
    (["steps=abc"], ["steps", "'abc'"]),
    (["steps=-3"], ["steps", "-3"]),
    (["batch_size=0"], ["batch_size", "0"]),
    (["learning_rate=0"], ["learning_rate", "0"]),
    (["learning_rate=fast"], ["learning_rate must be a number", "'fast'"]),
    (["warmup_steps=-1"], ["warmup_steps", "-1"]),
    (["data.seq_len=0"], ["data.seq_len", "0"]),
    (["data.judging_fraction=1.5"], ["data.judging_fraction", "1.5"]),
    (["model.hidden_sise=8"], ["model.hidden_sise"]),
    (["model.hidden_size=0"], ["model.hidden_size", "0"]),
])
def test_sft_config_errors_name_the_key(overrides, wanted):
    with pytest.raises(ConfigError) as got:
        load_sft_config(SFT, overrides)
    for text in wanted:
        assert text in str(got.value), (text, str(got.value))


def test_sft_command_line_reports_a_bad_setting_without_a_traceback(capsys):
    for bad in ("steps=abc", "steps=-3"):
        assert dreamr_main(["train", "sft", "--config", SFT, bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dreamr: error: ") and "steps" in err and "Traceback" not in err


def test_sapo_checks_its_settings_and_its_spec():
    """SAPO's check threshold and sampling live in `spec` only, and are checked there."""
    for overrides, key in ((["spec.alpha=1.5"], "spec.alpha"), (["spec.top_p=2"], "spec.top_p"),
                           (["spec.draft_temperature=-1"], "spec.draft_temperature"),
                           (["spec.target_temperature=-1"], "spec.target_temperature"),
                           (["reward_weights=[1, 1]"], "reward_weights"), (["epsilon=0"], "epsilon"),
                           (["steps=abc"], "steps"), (["allow_changed_settings=maybe"], "allow_changed_settings")):
        with pytest.raises(ConfigError, match=f": {key} "):
            load_sapo_config(SAPO, overrides)


def test_sapo_settings_have_one_place(tmp_path):
    """A SAPO config that still sets the old top-level copies of the check threshold or the
    draft's sampling is refused, each key named with the place it lives now; a partial `spec:`
    keeps SAPO's sampled default; greedy rollouts are refused (GRPO needs different rollouts)."""
    for key, place in (("alpha", "spec.alpha"), ("temperature", "spec.draft_temperature"), ("top_p", "spec.top_p")):
        with pytest.raises(ConfigError, match=f"{key} is no longer a setting here: it is {place} "):
            load_sapo_config(SAPO, [f"{key}=0.5"])
        path = tmp_path / f"{key}.yaml"
        path.write_text(f"output_dir: out\ndraft: asset:draft\ntarget: asset:target\n{key}: 0.5\n")
        with pytest.raises(ConfigError, match=f"{path}: {key} is no longer a setting here: it is {place}"):
            load_sapo_config(str(path))
    path = tmp_path / "partial.yaml"
    path.write_text("output_dir: out\ndraft: asset:draft\ntarget: asset:target\nspec: {alpha: 0.5}\n")
    cfg = load_sapo_config(str(path))
    assert (cfg.spec.alpha, cfg.spec.draft_temperature, cfg.settings().alpha, cfg.settings().temperature) == \
        (0.5, 1.0, 0.5, 1.0)
    with pytest.raises(ConfigError, match="spec.draft_temperature must be > 0 for SAPO"):
        load_sapo_config(str(path), ["spec.draft_temperature=0"])
    # the engine's own config keeps its greedy default when built on its own
    assert load_config(PAIR).spec.draft_temperature == 0.0
    # the reward needs a threshold in [0, 1]: the engine's reject-all value is named under its key
    with pytest.raises(ConfigError, match="spec.alpha must be a finite number, got inf"):
        load_sapo_config(SAPO, ["spec.alpha=.inf"])


def test_a_checkpoint_from_before_the_move_resumes_with_the_same_config():
    """Settings stored before alpha / temperature / top_p moved into spec: the old keys held what
    the run used (its spec.* copies were unused), so the same config shows no change; another
    value still does."""
    from dreamr_jax.training.scaffold import moved_settings

    cfg = load_sapo_config(SAPO)
    stored = settings_of(cfg)
    stored.update({"alpha": 0.7, "temperature": 1.0, "top_p": 1.0, "spec.draft_temperature": 0.0})
    assert changed_settings(moved_settings(stored, SAPOConfig), settings_of(cfg)) == []
    stored["temperature"] = 0.8
    assert changed_settings(moved_settings(stored, SAPOConfig), settings_of(cfg)) == [
        "spec.draft_temperature: 0.8 -> 1.0"]


def test_old_public_names_still_import_with_a_warning():
    import importlib
    import sys

    import dreamr_jax as dr

    with pytest.warns(DeprecationWarning, match="SpeculationConfig"):
        assert dr.SpecConfig is SpeculationConfig
    sys.modules.pop("dreamr_jax.rl", None)
    with pytest.warns(DeprecationWarning, match="dreamr_jax.training"):
        rl = importlib.import_module("dreamr_jax.rl")
    assert rl.SAPOConfig is SAPOConfig and rl.grpo_loss is dr.training.grpo_loss


def test_python_api_checks_the_same_ranges():
    with pytest.raises(ValueError, match="alpha must be in"):
        SpeculationConfig(alpha=1.5)
    with pytest.raises(ValueError, match="token_budget must be >= 1, got 0"):
        StepConfig(token_budget=0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        SFTConfig(output_dir="x", tokenizer="x", steps=-3)
    with pytest.raises(ValueError, match="alpha"):
        SAPOConfig(output_dir="x", draft="x", target="x", spec=SpeculationConfig(alpha=-0.1))
    # the documented way to reject every drafted step (tests of target equivalence)
    assert SpeculationConfig(alpha=REJECT_ALL).alpha == math.inf
    assert load_config(PAIR, ["spec.alpha=.inf"]).spec.alpha == math.inf
    # the shipped configs all pass
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        path = os.path.join(ROOT, "configs", name)
        (load_sapo_config if name.startswith("sapo") else load_sft_config if name.startswith("sft")
         else load_config)(path)


def test_changed_settings_are_listed_by_key():
    base = SAPOConfig(output_dir="a", draft="d", target="t")
    other = SAPOConfig(output_dir="b", draft="d", target="t", batch_size=8, steps=5,
                       spec=SpeculationConfig(alpha=0.5, draft_temperature=1.0, steps=StepConfig(token_budget=99)))
    changes = changed_settings(settings_of(base), settings_of(other))
    # output_dir and steps may change on resume; the rest is named with old and new values
    assert changes == ["batch_size: 64 -> 8", "spec.alpha: 0.7 -> 0.5", "spec.steps.token_budget: 2048 -> 99"]
    sft = settings_of(SFTConfig(output_dir="a", tokenizer="t", model=dict(TINY_WORLD_ARCH)))
    wider = settings_of(SFTConfig(output_dir="a", tokenizer="t", model=dict(TINY_WORLD_ARCH, head_dim=8)))
    assert changed_settings(sft, wider) == ["model.head_dim: (not set) -> 8"]


# ---- resuming a run -------------------------------------------------------------------------------------


def _cfg(tmp, **kw) -> SFTConfig:
    return tiny_sft_config(tmp, **{"steps": 2, "warmup_steps": 1, "checkpoint_every": 1, **kw})


def test_resume_refuses_changed_settings_and_other_shapes(tmp_path, capfd):
    """A run stopped after its step-1 checkpoint: resumed with another batch_size and learning_rate
    it is refused (both named, old and new value) unless allow_changed_settings; resumed with a
    model of other shapes it is one error naming the arrays, with no traceback printed."""
    first = train(_cfg(tmp_path), progress=False, stop_after=1, export=False)
    assert first["step"] == 1

    with pytest.raises(ConfigError) as got:
        train(_cfg(tmp_path, batch_size=2, learning_rate=1e-3), progress=False, export=False)
    message = str(got.value)
    assert "batch_size: 4 -> 2" in message and "learning_rate: 0.003 -> 0.001" in message, message
    assert "allow_changed_settings" in message

    narrow = dict(TINY_WORLD_ARCH, intermediate_size=48)
    with pytest.raises(ConfigError, match="model.intermediate_size: 64 -> 48"):
        train(_cfg(tmp_path, model=narrow), progress=False, export=False)
    capfd.readouterr()
    with pytest.raises(ConfigError) as got:
        train(_cfg(tmp_path, model=narrow, allow_changed_settings=True), progress=False, export=False)
    message = str(got.value)
    assert "other shapes" in message and "(32, 64)" in message and "(32, 48)" in message, message
    assert "\n" not in message and got.value.__cause__ is None and len(message) < 2000
    assert "Traceback" not in capfd.readouterr().err

    resumed = train(_cfg(tmp_path, batch_size=2, learning_rate=1e-3, allow_changed_settings=True), progress=False,
                    export=False)
    assert resumed["step"] == 2 and [r["step"] for r in resumed["history"]] == [2]


def test_relative_input_paths_resolve_beside_the_config_then_the_working_directory(tmp_path, monkeypatch):
    """A config's relative input path is found beside the config first (a config folder that
    travels with its files), else in the working directory; one found in neither is an error
    naming the key and both places, before anything loads; hub ids and asset names pass."""
    from dreamr_jax.config import ConfigError, load_config

    cfgdir, elsewhere = tmp_path / "cfgs", tmp_path / "run"
    (cfgdir / "models" / "t").mkdir(parents=True)
    elsewhere.mkdir()
    (cfgdir / "pair.yaml").write_text("target: models/t\ndraft: asset:draft\n")
    monkeypatch.chdir(elsewhere)
    assert load_config(str(cfgdir / "pair.yaml")).target == str(cfgdir / "models" / "t")
    (cfgdir / "hub.yaml").write_text("target: Qwen/Qwen3-VL-2B-Instruct\n")
    assert load_config(str(cfgdir / "hub.yaml")).target == "Qwen/Qwen3-VL-2B-Instruct"
    (cfgdir / "typo.yaml").write_text("target: ./modls/t\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: target: './modls/t' exists neither beside the config"):
        load_config(str(cfgdir / "typo.yaml"))
