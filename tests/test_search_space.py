"""results/search_space.py: each method's own `search:` grid becomes its own stage-1 sweep.

The jobs an invocation launches are expanded by Hydra's own BasicSweeper (the sweeper train.py -m
uses), from the experiment's sweeper params followed by the invocation's command line, so the
tests check what Hydra would run, not our text."""
import shutil
from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from common.errors import UserError
from results import search_space as ss

ROOT = Path(__file__).resolve().parents[1]
TASKS3 = "dtd,eurosat,kitti"

VIT_FIELD = ["full", "linear", "bitfit", "vpt_shallow", "vpt_deep", "ssf", "fact_tt", "fact_tk", "repadapter",
             "convpass", "adapter_houlsby", "adapter_pfeiffer", "lora", "dora", "vera", "moslora", "hydralora",
             "adaptformer", "peft_lily", "lily_qv", "lily_qvffn", "lily_kvffn", "lily_ffn"]
VIM_FIELD = ["full", "linear", "vim_lora_in_proj", "vim_lorap_x", "vim_lorap_z", "vim_lora_out_proj",
             "vim_lora_x_proj", "vim_lorap_d", "vim_lorap_b", "vim_lorap_c", "vim_lora_dt", "vim_lora_embed",
             "vim_dora_x", "vim_a_tuning", "vim_d_tuning", "vim_conv1d_tuning", "vim_bias_tuning", "vim_cls_tuning",
             "vim_pos_tuning", "vim_parallel_adapter", "vim_prompt", "vim_prompt_proj", "vim_affix",
             "vim_affix_proj", "vim_additional_scan", "vim_hybrid", "lily_vim", "deltafit", "deltainfit"]


@pytest.fixture
def configs(tmp_path):
    """A copy of configs/ with three toy methods (their own spaces) and a toy field experiment."""
    root = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", root)
    (root / "method" / "toy_a.yaml").write_text(
        "name: lora\ntargets: [q, v]\nrank: 8\nscale: 1.0\n"
        "search:\n  method.rank: [4, 8]\n  optim.lr: [1e-3, 1e-2]\n")
    (root / "method" / "toy_b.yaml").write_text(
        "name: adaptformer\ntargets: [ffn]\nrank: 8\nscale: 0.1\n"
        "search:\n  method.scale: [0.01, 0.1, 10.0]\n")
    (root / "method" / "toy_c.yaml").write_text("name: linear\n")
    (root / "experiment" / "toy_field.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n"
        f"      task: {TASKS3}\n      method: toy_a,toy_b,toy_c\n")
    return root


def hydra_jobs(configs, inv):
    """The jobs Hydra's BasicSweeper launches for one invocation (experiment params, then the command line)."""
    cfg = ss.compose([o for o in ss._fixed(inv.overrides)], configs)
    params = [f"{k}={v}" for k, v in (OmegaConf.select(cfg, "hydra.sweeper.params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides(params + inv.overrides)
    [batch] = BasicSweeper.split_arguments(overrides, None)
    return [dict(o.split("=", 1) for o in job) for job in batch]


def test_sweep_overrides_parse_back_to_the_same_values():
    space = {"optim.lr": [1e-3, 1e-2, 5e-5], "method.rank": [4, 16], "method.act": ["relu", "quick gelu"],
             "method.bias": [True, False], "method.ranks": [[8, 16], [4, 8]], "method.p": [None, 0.5]}
    texts = ss.sweep_overrides(space)
    parsed = OverridesParser.create().parse_overrides(texts)
    for (key, values), o in zip(space.items(), parsed):
        assert o.key_or_group == key and o.is_sweep_override()
        got = [getattr(v, "text", v) for v in o.sweep_iterator()]  # Hydra keeps quoted strings as QuotedString
        assert got == values
    [single] = OverridesParser.create().parse_overrides(ss.sweep_overrides({"optim.lr": [3e-4]}))
    assert not single.is_sweep_override() and single.value() == 3e-4


def test_each_method_is_swept_on_its_own_grid_not_the_product(configs):
    invs = ss.stage1_invocations(["experiment=toy_field", "seed=42,43"], configs)
    assert [i.method for i in invs] == ["toy_a", "toy_b", "toy_c"]
    jobs = {i.method: hydra_jobs(configs, i) for i in invs}
    # toy_a: 3 tasks x 2 seeds x (2 ranks x 2 lrs); never toy_b's scale, never another method
    assert len(jobs["toy_a"]) == 3 * 2 * 4
    assert {j["method"] for j in jobs["toy_a"]} == {"toy_a"}
    assert {(j["method.rank"], j["optim.lr"]) for j in jobs["toy_a"]} == {
        ("4", "0.001"), ("4", "0.01"), ("8", "0.001"), ("8", "0.01")}
    assert all("method.scale" not in j for j in jobs["toy_a"])
    assert {j["task"] for j in jobs["toy_a"]} == set(TASKS3.split(","))
    assert {j["seed"] for j in jobs["toy_a"]} == {"42", "43"}
    # toy_b: its three scales only; toy_c: no search key, one point per task and seed
    assert len(jobs["toy_b"]) == 3 * 2 * 3 and all("optim.lr" not in j for j in jobs["toy_b"])
    assert {j["method.scale"] for j in jobs["toy_b"]} == {"0.01", "0.1", "10.0"}
    assert len(jobs["toy_c"]) == 3 * 2 and {j["method"] for j in jobs["toy_c"]} == {"toy_c"}
    # 4 + 3 + 1 grid points, not the 12 of a cartesian product of the two grids (times 3 methods)
    assert [i.n_points for i in invs] == [4, 3, 1]
    assert "8 grid points" in ss.describe(invs)


def test_a_method_named_on_the_command_line_wins_over_the_experiments_list(configs):
    assert ss.field_methods(["experiment=toy_field", "method=toy_b"], configs) == ["toy_b"]
    invs = ss.stage1_invocations(["experiment=toy_field", "method=toy_c,toy_a"], configs)
    assert [i.method for i in invs] == ["toy_c", "toy_a"]
    assert {j["method"] for j in hydra_jobs(configs, invs[1])} == {"toy_a"}
    # no experiment, no method=: the config's default method
    assert ss.field_methods([], configs) == ["lily_kvffn"]


def test_unknown_search_key_is_rejected_before_anything_runs(configs):
    (configs / "method" / "toy_bad.yaml").write_text("name: lora\nrank: 8\nsearch:\n  method.rnak: [4, 8]\n")
    with pytest.raises(UserError, match=r"toy_bad: unknown search key 'method.rnak'"):
        ss.stage1_invocations(["experiment=toy_field", "method=toy_a,toy_bad"], configs)


def test_a_searched_key_also_given_on_the_command_line_is_rejected(configs):
    with pytest.raises(UserError, match=r"toy_a: 'optim.lr' is searched .* also set on the command line"):
        ss.stage1_invocations(["experiment=toy_field", "optim.lr=0.005"], configs)


@pytest.mark.parametrize("body, match", [
    ("search:\n  method.rank: 8\n", "non-empty list"),
    ("search:\n  method.rank: []\n", "non-empty list"),
    ("search:\n  task: [dtd, kitti]\n", "not a hyper-parameter"),
    ("search: [1, 2]\n", "must map override keys"),
    ("search:\n  method.rank: [4, 4]\n", "repeated value"),
])
def test_malformed_spaces_name_the_method_and_the_key(configs, body, match):
    (configs / "method" / "toy_bad.yaml").write_text("name: lora\nrank: 8\n" + body)
    with pytest.raises(UserError, match=match) as e:
        ss.method_search("toy_bad", configs)
    assert "toy_bad.yaml" in str(e.value)


def test_unknown_method_is_named(configs):
    with pytest.raises(UserError, match="method 'vpt_deeep' has no config"):
        ss.method_search("vpt_deeep", configs)


def test_the_field_experiments_run_the_documented_methods():
    assert ss.field_methods(["experiment=field_vit"]) == VIT_FIELD
    assert ss.field_methods(["experiment=field_vim"]) == VIM_FIELD
    for exp, backbone in (("field_vit", "vit_b16_in21k"), ("field_vim", "vim_s")):
        cfg = ss.compose([f"experiment={exp}", "method=linear"])
        assert cfg.backbone.name == backbone
        assert len(str(cfg.hydra.sweeper.params.task).split(",")) == 19


def test_every_field_method_with_a_config_has_a_valid_space():
    """The spaces the field command would search, for every method whose config has landed."""
    for exp, methods in (("field_vit", VIT_FIELD), ("field_vim", VIM_FIELD)):
        present = [m for m in methods if (ROOT / "configs" / "method" / f"{m}.yaml").is_file()]
        assert present, exp
        invs = ss.stage1_invocations([f"experiment={exp}", f"method={','.join(present)}"])
        assert [i.method for i in invs] == present


def test_clean_protocol_runs_one_stage1_sweep_per_method(monkeypatch, tmp_path):
    """scripts/clean_protocol.py --search-space method: one train.py -m per method, each with its own
    grid, the launcher kept, protocol=search; a bad key stops it before any command runs."""
    from results import clean
    spaces = {"lora": {"method.scale": [0.1, 1.0]}, "adaptformer": {"method.rank": [8, 16], "optim.lr": [1e-3, 1e-2]}}
    monkeypatch.setattr(ss, "method_search", lambda m, configs=ss.CONFIGS: spaces.get(m, {}))
    commands = []
    monkeypatch.setattr(clean, "run_stage", lambda name, cmd, runs_dir: commands.append(cmd) or {})
    argv = ["experiment=table1_baselines", "task=dtd", f"paths.output_dir={tmp_path}", "hydra/launcher=joblib",
            "--seeds", "42,43", "--search-space", "method"]
    with pytest.raises(SystemExit, match="no finished search run"):  # nothing ran: the selection stops
        clean.main(argv)
    assert [c[c.index("-m") + 1:] for c in commands] == [
        ["experiment=table1_baselines", "task=dtd", f"paths.output_dir={tmp_path}", "method=full",
         "hydra/launcher=joblib", "protocol=search"],
        ["experiment=table1_baselines", "task=dtd", f"paths.output_dir={tmp_path}", "method=linear",
         "hydra/launcher=joblib", "protocol=search"],
        ["experiment=table1_baselines", "task=dtd", f"paths.output_dir={tmp_path}", "method=adaptformer",
         "method.rank=8,16", "optim.lr=0.001,0.01", "hydra/launcher=joblib", "protocol=search"],
        ["experiment=table1_baselines", "task=dtd", f"paths.output_dir={tmp_path}", "method=lora",
         "method.scale=0.1,1.0", "hydra/launcher=joblib", "protocol=search"]]
    commands.clear()
    spaces["lora"] = {"method.sclae": [0.1, 1.0]}
    with pytest.raises(SystemExit, match="lora: unknown search key 'method.sclae'"):
        clean.main(argv)
    assert commands == []
