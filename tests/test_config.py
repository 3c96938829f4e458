import json

import pytest

from dsv4.common.model.config import ConfigError, ModelArgs, load_named_config


def test_published_configs_load():
    flash, pro = load_named_config("flash"), load_named_config("pro")
    assert (flash.dim, flash.n_layers, flash.n_routed_experts, flash.index_topk) == (4096, 43, 256, 512)
    assert (pro.dim, pro.n_layers, pro.n_routed_experts, pro.index_topk) == (7168, 61, 384, 1024)
    # spec 1.2: Flash has 2 window-only, 21 CSA, 20 HCA main layers; Pro 0 / 30 / 31
    for a, counts in ((flash, (2, 21, 20)), (pro, (0, 30, 31))):
        main = a.compress_ratios[: a.n_layers]
        assert (main.count(0), main.count(4), main.count(128)) == counts
        assert a.compress_ratios[-1] == 0  # MTP is window-only


def test_tiny_has_every_feature():
    a = load_named_config("tiny")
    kinds = set(a.compress_ratios[: a.n_layers])
    assert kinds == {0, 4, 128}
    assert a.window_size == 128 and a.hc_mult == 4 and a.hc_sinkhorn_iters == 20
    assert 0 < a.n_hash_layers < a.n_layers  # hash-routed first layers, then biased gates
    assert a.score_func == "sqrtsoftplus" and a.swiglu_limit > 0 and a.n_mtp_layers == 1
    assert a.dim % 128 == 0 and a.moe_inter_dim % 128 == 0 and (a.head_dim - a.rope_head_dim) % 64 == 0


def test_hf_config_round_trip(tmp_path):
    a = load_named_config("flash")
    p = tmp_path / "config.json"
    p.write_text(json.dumps(a.to_hf_config()))
    b = ModelArgs.from_hf_config(p)
    assert b.arch_hash() == a.arch_hash()


def test_hf_official_field_names(tmp_path):
    hf = {"vocab_size": 512, "hidden_size": 256, "num_hidden_layers": 2, "num_nextn_predict_layers": 1,
          "num_hash_layers": 1, "num_attention_heads": 4, "head_dim": 128, "qk_rope_head_dim": 64,
          "q_lora_rank": 128, "o_groups": 2, "o_lora_rank": 128, "sliding_window": 128,
          "compress_ratios": [4, 128, 0], "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
          "moe_intermediate_size": 128, "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5,
          "index_n_heads": 4, "index_head_dim": 128, "index_topk": 16, "rms_norm_eps": 1e-6,
          "swiglu_limit": 10.0, "rope_theta": 10000, "compress_rope_theta": 160000, "hc_mult": 4,
          "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "max_position_embeddings": 1048576, "bos_token_id": 0,
          "eos_token_id": 1,
          "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                           "beta_fast": 32, "beta_slow": 1},
          "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                  "weight_block_size": [128, 128]}}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(hf))
    a = ModelArgs.from_hf_config(p)
    assert (a.dim, a.n_layers, a.window_size, a.n_activated_experts) == (256, 2, 128, 2)
    assert (a.rope_factor, a.original_seq_len, a.dtype, a.expert_dtype) == (16.0, 65536, "fp8", "fp4")


@pytest.mark.parametrize("drop", ["index_topk", "hidden_size", "rope_scaling"])
def test_hf_config_missing_field_is_named_not_defaulted(tmp_path, drop):
    """A missing field must not silently take Flash's value (index_topk would quietly change the model)."""
    hf = load_named_config("tiny").to_hf_config()
    del hf[drop]
    p = tmp_path / "config.json"
    p.write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=f"config.json: missing field.*'{drop}'"):
        ModelArgs.from_hf_config(p)


def test_hf_config_errors_use_the_config_json_names(tmp_path):
    hf = dict(load_named_config("tiny").to_hf_config(), hidden_size=200)  # breaks the FP8 128-blocks
    p = tmp_path / "config.json"
    p.write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="field 'hidden_size': 200 is not a multiple of 128"):
        ModelArgs.from_hf_config(p)


@pytest.mark.parametrize("change, field", [
    ({"compress_ratios": [0, 4, 128, 0]}, "compress_ratios"),  # length != n_layers + MTP
    ({"compress_ratios": [0, 4, 64, 4, 0]}, "compress_ratios"),  # 64 is no V4 ratio
    ({"head_dim": 64}, "head_dim"),  # head_dim <= rope dim
    ({"head_dim": 160}, "head_dim"),  # nope 96 breaks the 64-blocks of the KV FP8 simulation
    ({"dim": 200}, "dim"),  # breaks FP8 128-blocks
    ({"index_head_dim": 96}, "index_head_dim"),  # not a power of two (Hadamard)
    ({"n_activated_experts": 9}, "n_activated_experts"),
    ({"score_func": "relu"}, "score_func"),
    ({"o_groups": 3}, "o_groups"),
])
def test_validation_names_the_field(change, field):
    base = load_named_config("tiny").to_dict()
    base.update(change)
    with pytest.raises(ConfigError, match=f"'{field}'"):
        ModelArgs.from_dict(base, source="test.yaml")


def test_unknown_field_and_bad_yaml(tmp_path):
    base = load_named_config("tiny").to_dict()
    base["n_layer"] = 3
    with pytest.raises(ConfigError, match="unknown field.*n_layer"):
        ModelArgs.from_dict(base)
    bad = tmp_path / "bad.yaml"
    bad.write_text("dim: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        ModelArgs.from_yaml(bad)
    wrong_type = tmp_path / "t.yaml"
    wrong_type.write_text("dim: '256'\n")
    with pytest.raises(ConfigError, match="'dim': expected an integer"):
        ModelArgs.from_yaml(wrong_type)
    with pytest.raises(ConfigError, match="not found"):
        ModelArgs.from_yaml(tmp_path / "missing.yaml")
