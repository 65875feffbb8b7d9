import pytest

from effopd.config import Config, ConfigError, from_yaml_text, load_config, to_yaml


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("optim:\n  lr: 0.001\ntrain:\n  steps: 7\n")
    cfg = load_config([f], ["train.steps=9", "loss.method=gopd", "loss.lam=1.25", "optim.betas=[0.9,0.95]"])
    assert isinstance(cfg, Config)
    assert cfg.optim.lr == 0.001 and cfg.train.steps == 9
    assert cfg.loss.method == "gopd" and cfg.loss.lam == 1.25 and cfg.optim.betas == [0.9, 0.95]
    assert from_yaml_text(to_yaml(cfg)) == cfg


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown key.*optim\.lrr.*did you mean `optim\.lr`"):
        load_config([], ["optim.lrr=1e-5"])


@pytest.mark.parametrize(
    "override, key",
    [("optim.lr=-1e-5", "optim.lr"), ("rollout.temperature=0", "rollout.temperature"), ("loss.lam=-0.5", "loss.lam"),
     ("loss.method=ppo", "loss.method"), ("loss.aggregation=sum", "loss.aggregation"), ("loss.dual_clip_c=1.0", "loss.dual_clip_c"),
     ("train.steps=0", "train.steps"), ("rollout.top_p=1.5", "rollout.top_p"), ("rollout.backend=vllm", "rollout.backend")],
)
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([], [override])


def test_wrong_type_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="train.steps"):
        load_config([], ["train.steps=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config([], ["train.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "missing.yaml"])


def test_packing_follows_the_device_unless_set():
    """train.pack null: on for a CPU device (with one update bucket), off on CUDA (two
    buckets); explicit values win, and the resolved values are what config.yaml holds."""
    cpu = load_config([], ["train.device=cpu"])
    assert cpu.train.pack is True and cpu.train.update_buckets == 1
    cuda = load_config([], ["train.device=cuda"])
    assert cuda.train.pack is False and cuda.train.update_buckets == 2
    mine = load_config([], ["train.device=cpu", "train.pack=false", "train.update_buckets=4"])
    assert mine.train.pack is False and mine.train.update_buckets == 4
    assert from_yaml_text(to_yaml(cpu)).train.pack is True


def test_sampling_ahead_turns_the_importance_weight_on_unless_set():
    assert load_config([], []).loss.rollout_is is False
    assert load_config([], ["rollout.off_policy_steps=1"]).loss.rollout_is is True
    assert load_config([], ["rollout.off_policy_steps=1", "loss.rollout_is=false"]).loss.rollout_is is False
