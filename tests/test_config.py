"""Config: the precedence chain, errors that name the key, LR scaling, the shipped YAML files."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import config
from config import ConfigError, get_config, load_config, parse_option
from tests.helpers import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"
VARIANT_DROP_PATH = {
    "crossformer_t": 0.1, "crossformer_s": 0.2, "crossformer_b": 0.3, "crossformer_l": 0.5,
    "crossformerpp_s": 0.2, "crossformerpp_b": 0.3, "crossformerpp_l": 0.5, "crossformerpp_h": 0.5,
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_are_the_paper_recipe() -> None:
    cfg = load_config(opts=["DATA.BATCH_SIZE", "128"], world_size=4)  # total batch 512
    assert (cfg.TRAIN.EPOCHS, cfg.TRAIN.WARMUP_EPOCHS) == (300, 20)
    assert (cfg.TRAIN.BASE_LR, cfg.TRAIN.WARMUP_LR, cfg.TRAIN.MIN_LR) == (5e-4, 5e-7, 5e-6)
    assert cfg.TRAIN.SCALED_BASE_LR == pytest.approx(5e-4)
    assert tuple(cfg.TRAIN.OPTIMIZER.BETAS) == (0.9, 0.999) and cfg.TRAIN.OPTIMIZER.EPS == 1e-8
    assert cfg.TRAIN.WEIGHT_DECAY == 0.05 and cfg.TRAIN.CLIP_GRAD == 5.0
    assert cfg.AUG.AUTO_AUGMENT == "rand-m9-mstd0.5-inc1" and cfg.AUG.REPROB == 0.25
    assert (cfg.AUG.MIXUP, cfg.AUG.CUTMIX, cfg.MODEL.LABEL_SMOOTHING) == (0.8, 1.0, 0.1)
    assert cfg.DATA.INTERPOLATION == "bicubic" and round(cfg.DATA.IMG_SIZE / cfg.TEST.CROP_PCT) == 256


def test_precedence_defaults_yaml_base_opts_flags(tmp_path: Path) -> None:
    write(tmp_path / "base" / "common.yaml", "TRAIN:\n  EPOCHS: 50\n  WARMUP_EPOCHS: 5\nDATA:\n  BATCH_SIZE: 32\nTAG: base\n")
    cfg_file = write(tmp_path / "run.yaml", "BASE: ['base/common.yaml']\nTRAIN:\n  EPOCHS: 60\nTAG: yaml\nOUTPUT: yaml_out\n")
    # YAML over BASE over defaults.
    cfg = get_config(parse_option(["--cfg", str(cfg_file)]))
    assert (cfg.TRAIN.EPOCHS, cfg.TRAIN.WARMUP_EPOCHS, cfg.DATA.BATCH_SIZE, cfg.TAG) == (60, 5, 32, "yaml")
    assert cfg.TRAIN.AMP == "bf16"  # untouched default
    # --opts over YAML; a flag over --opts; flags not typed change nothing.
    args = parse_option(["--cfg", str(cfg_file), "--opts", "TRAIN.EPOCHS", "70", "DATA.BATCH_SIZE", "16",
                         "TAG", "001", "--batch-size", "8"])
    cfg = get_config(args)
    assert cfg.TRAIN.EPOCHS == 70
    assert cfg.DATA.BATCH_SIZE == 8
    assert cfg.TAG == "001"  # a string key keeps the text as typed
    assert cfg.OUTPUT == "yaml_out" and cfg.TRAIN.ACCUMULATION_STEPS == 1 and not cfg.TRAIN.USE_CHECKPOINT
    assert not cfg.EVAL_MODE and not cfg.THROUGHPUT_MODE and cfg.MODEL.RESUME == ""


def test_every_named_flag_is_wired(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "run.yaml", "TRAIN:\n  EPOCHS: 60\n")
    args = parse_option(["--cfg", str(cfg_file), "--batch-size", "3", "--data-path", "/d", "--output", "/o",
                         "--tag", "t", "--resume", "r.pth", "--eval", "--throughput",
                         "--accumulation-steps", "4", "--use-checkpoint"])
    cfg = get_config(args)
    assert (cfg.DATA.BATCH_SIZE, cfg.DATA.DATA_PATH, cfg.OUTPUT, cfg.TAG) == (3, "/d", "/o", "t")
    assert (cfg.MODEL.RESUME, cfg.EVAL_MODE, cfg.THROUGHPUT_MODE) == ("r.pth", True, True)
    assert (cfg.TRAIN.ACCUMULATION_STEPS, cfg.TRAIN.USE_CHECKPOINT) == (4, True)
    cfg = get_config(parse_option(["--cfg", str(cfg_file), "--pretrained", "p.pth"]))
    assert cfg.MODEL.PRETRAINED == "p.pth"
    cfg = get_config(parse_option(["--cfg", str(cfg_file), "--resume-changed"]))
    assert cfg.TRAIN.RESUME_CHANGED is True
    # A fine-tuned run's config.yaml records the --pretrained file it started from: a typed --resume replaces it
    # (the printed "evaluate it" command), and a typed --pretrained replaces a recorded --resume.
    started = write(tmp_path / "finetuned.yaml", "MODEL:\n  PRETRAINED: imagenet.pth\n")
    cfg = get_config(parse_option(["--cfg", str(started), "--eval", "--resume", "best.pth"]))
    assert (cfg.MODEL.RESUME, cfg.MODEL.PRETRAINED) == ("best.pth", "")
    resumed = write(tmp_path / "resumed.yaml", "MODEL:\n  RESUME: other.pth\n")
    cfg = get_config(parse_option(["--cfg", str(resumed), "--pretrained", "p.pth"]))
    assert (cfg.MODEL.RESUME, cfg.MODEL.PRETRAINED) == ("", "p.pth")


def test_unknown_flag_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parse_option(["--cfg", "x.yaml", "--batch_size", "3"])
    assert "unrecognized arguments: --batch_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no silent prefix matching either
        parse_option(["--cfg", "x.yaml", "--accum", "3"])


@pytest.mark.parametrize("where", ["yaml", "opts"])
def test_unknown_key_names_the_closest(tmp_path: Path, where: str) -> None:
    cfg_file = write(tmp_path / "run.yaml", "TRAIN:\n  WARMUP_EPOCH: 3\n" if where == "yaml" else "{}\n")
    opts = ["TRAIN.WARMUP_EPOCH", "3"] if where == "opts" else []
    with pytest.raises(ConfigError, match=r"unknown config key TRAIN\.WARMUP_EPOCH .*closest valid keys: "
                                          r"TRAIN\.WARMUP_EPOCHS"):
        load_config(str(cfg_file), opts)


def test_wrong_type_names_key_and_rule(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"TRAIN\.EPOCHS='ten' .*expected an integer"):
        load_config(opts=["TRAIN.EPOCHS", "ten"])
    cfg_file = write(tmp_path / "run.yaml", "TRAIN:\n  EMA:\n    ENABLE: 3\n")
    with pytest.raises(ConfigError, match=r"TRAIN\.EMA\.ENABLE=3 .*run\.yaml.*expected true or false"):
        load_config(str(cfg_file))
    with pytest.raises(ConfigError, match=r"TRAIN\.EMA .*is a section"):
        load_config(opts=["TRAIN.EMA", "1"])
    with pytest.raises(ConfigError, match=r"TRAIN\.AMP='fp32' is not supported.*bf16, fp16, none"):
        load_config(opts=["TRAIN.AMP", "fp32"])
    with pytest.raises(ConfigError, match=r"MODEL\.NAME='crossformer_x' is not a registered model"):
        load_config(opts=["MODEL.NAME", "crossformer_x"])
    with pytest.raises(ConfigError, match=r"KEY VALUE pairs"):
        load_config(opts=["TRAIN.EPOCHS"])


@pytest.mark.parametrize("key, value, needle", [
    ("DATA.LOADER", "tf", r"DATA\.LOADER='tf' is not supported; use one of dali, pytorch"),
    ("DATA.DATASET", "imagenett", r"DATA\.DATASET='imagenett' is not supported \(did you mean 'imagenet'\?\)"),
    ("DATA.INTERPOLATION", "nearest", r"DATA\.INTERPOLATION='nearest' is not supported; use one of bicubic, bilinear"),
    ("TRAIN.OPTIMIZER.NAME", "adam", r"TRAIN\.OPTIMIZER\.NAME='adam' is not supported \(did you mean 'adamw'\?\); "
                                     r"use one of adamw, lamb, lion, sgd"),
    ("TRAIN.OPTIMIZER.MOMENTUM", "1.0", r"TRAIN\.OPTIMIZER\.MOMENTUM=1\.0 must be in \[0, 1\)"),
    ("TRAIN.OPTIMIZER.BETAS", "[0.9, 1.0]",
     r"TRAIN\.OPTIMIZER\.BETAS=\(0\.9, 1\.0\) must be two numbers in \[0, 1\) or null"),
    ("TRAIN.OPTIMIZER.EPS", "0.0", r"TRAIN\.OPTIMIZER\.EPS=0\.0 must be > 0 or null"),
    ("TRAIN.FREEZE", "stages-5",
     r"TRAIN\.FREEZE='stages-5' must be none, stages-K with K in 1\.\.4 \(the patch embedding and stages 1\.\.K "
     r"frozen\) or all-but-head"),
    ("TRAIN.FREEZE", "head", r"TRAIN\.FREEZE='head' must be none, stages-K"),
    ("TEST.AMP", "fp8", r"TEST\.AMP='fp8' is not supported; use one of train, bf16, fp16, none"),
    ("AUG.SCALE", "[0.5, 0.2]", r"AUG\.SCALE=\[0\.5, 0\.2\] must be \[lo, hi\] with 0 < lo <= hi <= 1"),
    ("AUG.SCALE", "[0.5, 1.5]", r"AUG\.SCALE=\[0\.5, 1\.5\] must be \[lo, hi\]"),
    ("AUG.RATIO", "[0.0, 1.0]", r"AUG\.RATIO=\[0\.0, 1\.0\] must be \[lo, hi\] with 0 < lo <= hi \(width / height\)"),
    ("AUG.RATIO", "[1.0]", r"AUG\.RATIO=\[1\.0\] must be \[lo, hi\]"),
    ("DATA.IMG_SIZE", "48", r"DATA\.IMG_SIZE=48 must be a multiple of 32"),
    ("DATA.REPEATED_AUG", "0", r"DATA\.REPEATED_AUG=0 must be >= 1 \(1: off; k: each sampled image k times"),
    ("TRAIN.LOSS", "mse", r"TRAIN\.LOSS='mse' is not supported; use one of ce, soft-ce, bce"),
    ("TRAIN.BCE_TARGET_THRESH", "0.5", r"TRAIN\.BCE_TARGET_THRESH=0\.5 must be null unless TRAIN\.LOSS is bce"),
])
def test_value_rules_name_value_rule_and_fix(key: str, value: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(opts=[key, value])


def test_nesterov_needs_momentum() -> None:
    with pytest.raises(ConfigError, match=r"TRAIN\.OPTIMIZER\.NESTEROV=True needs TRAIN\.OPTIMIZER\.MOMENTUM > 0"):
        load_config(opts=["TRAIN.OPTIMIZER.NAME", "sgd", "TRAIN.OPTIMIZER.MOMENTUM", "0.0",
                          "TRAIN.OPTIMIZER.NESTEROV", "True"])


def test_architecture_overrides_default_to_the_variant(tmp_path: Path) -> None:
    """MODEL.CROSSFORMER.* are None (the variant's value) unless given; given values are type-checked."""
    arch = load_config().MODEL.CROSSFORMER
    assert [arch[k] for k in ("EMBED_DIM", "DEPTHS", "NUM_HEADS", "GROUP_SIZE", "CRS_INTERVAL")] == [None] * 5
    cfg = load_config(opts=["MODEL.CROSSFORMER.EMBED_DIM", "64", "MODEL.CROSSFORMER.DEPTHS", "[1, 1, 2, 1]"])
    assert cfg.MODEL.CROSSFORMER.EMBED_DIM == 64 and cfg.MODEL.CROSSFORMER.DEPTHS == [1, 1, 2, 1]
    yaml_file = write(tmp_path / "run.yaml", "MODEL:\n  CROSSFORMER:\n    EMBED_DIM: 32\n    GROUP_SIZE: [7, 7, 7, 7]\n")
    for null in ("null", "None"):  # --opts restores the variant's value over the YAML's
        cfg = load_config(str(yaml_file), ["MODEL.CROSSFORMER.EMBED_DIM", null])
        assert cfg.MODEL.CROSSFORMER.EMBED_DIM is None and cfg.MODEL.CROSSFORMER.GROUP_SIZE == [7, 7, 7, 7]
    with pytest.raises(ConfigError, match=r"MODEL\.CROSSFORMER\.EMBED_DIM='wide' .*expected an integer"):
        load_config(opts=["MODEL.CROSSFORMER.EMBED_DIM", "wide"])
    with pytest.raises(ConfigError, match=r"MODEL\.CROSSFORMER\.DEPTHS\[1\]=1\.5 .*expected an integer"):
        load_config(opts=["MODEL.CROSSFORMER.DEPTHS", "[1, 1.5, 2, 1]"])
    with pytest.raises(ConfigError, match=r"MODEL\.CROSSFORMER\.NUM_HEADS=\[1, 2\] must be null \(the variant's "
                                          r"value\) or 4 integers >= 1"):
        load_config(opts=["MODEL.CROSSFORMER.NUM_HEADS", "[1, 2]"])
    with pytest.raises(ConfigError, match=r"MODEL\.CROSSFORMER\.EMBED_DIM=0 must be null"):
        load_config(opts=["MODEL.CROSSFORMER.EMBED_DIM", "0"])


def test_build_model_keeps_the_variants_value_for_none() -> None:
    from models import build_model

    cfg = load_config(opts=["MODEL.NAME", "crossformerpp_s", "MODEL.CROSSFORMER.EMBED_DIM", "32",
                            "MODEL.CROSSFORMER.DEPTHS", "[1, 1, 2, 1]", "MODEL.CROSSFORMER.NUM_HEADS", "[1, 2, 4, 8]"])
    model = build_model(cfg)
    assert [info["num_chs"] for info in model.feature_info] == [32, 64, 128, 256]
    assert [len(stage.blocks) for stage in model.layers] == [1, 1, 2, 1]
    # GROUP_SIZE / CRS_INTERVAL are None: crossformerpp_s's own (4, 4, 14, 7) and (4, 2, 1, 1).
    assert [(stage.blocks[0].attn.group_size, stage.blocks[0].attn.interval) for stage in model.layers] == \
        [(4, 4), (4, 2), (14, 1), (7, 1)]


def test_yaml_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    # PyYAML reads 5e-4 as a string; a float key accepts it as the number.
    cfg = load_config(str(write(tmp_path / "run.yaml", "TRAIN:\n  BASE_LR: 5e-4\n")))
    assert cfg.TRAIN.BASE_LR == 5e-4


def test_base_cycle_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "BASE: ['b.yaml']\n")
    write(tmp_path / "b.yaml", "BASE: ['a.yaml']\n")
    with pytest.raises(ConfigError, match="BASE cycle"):
        load_config(str(tmp_path / "a.yaml"))


def test_lr_scales_with_total_batch_including_accumulation() -> None:
    cfg = load_config(opts=["DATA.BATCH_SIZE", "64", "TRAIN.ACCUMULATION_STEPS", "2"], world_size=8)
    assert cfg.TRAIN.BASE_LR == 5e-4  # the entered value is kept
    factor = 64 * 8 * 2 / 512
    assert cfg.TRAIN.SCALED_BASE_LR == pytest.approx(5e-4 * factor)
    assert cfg.TRAIN.SCALED_WARMUP_LR == pytest.approx(5e-7 * factor)
    assert cfg.TRAIN.SCALED_MIN_LR == pytest.approx(5e-6 * factor)
    off = load_config(opts=["DATA.BATCH_SIZE", "64", "TRAIN.LR_REFERENCE_BATCH", "0"], world_size=8)
    assert off.TRAIN.SCALED_BASE_LR == 5e-4


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(str(CONFIGS / "demo.yaml"), ["TRAIN.EPOCHS", "3"], world_size=2)
    config.dump_config(cfg, str(tmp_path / "config.yaml"))
    again = load_config(str(tmp_path / "config.yaml"), world_size=2)
    assert config.config_to_dict(again) == config.config_to_dict(cfg)
    assert again.MODEL.CROSSFORMER.EMBED_DIM == 32 and again.MODEL.CROSSFORMER.GROUP_SIZE is None  # null round-trips


@pytest.mark.parametrize("name", sorted(VARIANT_DROP_PATH))
def test_variant_configs(name: str) -> None:
    cfg = load_config(str(CONFIGS / f"{name}.yaml"))
    assert cfg.MODEL.NAME == name
    assert cfg.MODEL.DROP_PATH_RATE == VARIANT_DROP_PATH[name]


def test_demo_config_is_small_and_on_toy_data() -> None:
    cfg = load_config(str(CONFIGS / "demo.yaml"), world_size=2)
    assert cfg.DATA.DATASET == "toy" and cfg.DATA.IMG_SIZE in (32, 64)
    assert cfg.MODEL.NAME.startswith("crossformerpp") and cfg.MODEL.CROSSFORMER.EMBED_DIM <= 64


def test_every_config_key_is_read() -> None:
    """Each leaf key's last two parts (e.g. ``EMA.DECAY``) appear in the code outside config.py."""
    sources = [p for p in REPO_ROOT.rglob("*.py") if "tests" not in p.parts and p.name != "config.py"]
    code = "\n".join(p.read_text() for p in sources)
    # models/build.py reads the MODEL.CROSSFORMER overrides through ``arch = config.MODEL.CROSSFORMER``,
    # the trainer and the epoch some TRAIN keys through ``train = config.TRAIN``.
    unread = []
    for key in config.flat_keys(config.get_defaults()):
        if key == "BASE":  # consumed by the YAML loader itself
            continue
        parts = key.split(".")
        tail = ".".join(parts[-2:]) if len(parts) > 1 else parts[0]
        patterns = [re.escape(tail), re.escape(f'"{parts[-1]}"'), rf"\barch\.{parts[-1]}\b"]
        if parts[0] == "TRAIN" and len(parts) == 2:
            patterns.append(rf"\btrain\.{parts[-1]}\b")
        if not any(re.search(p, code) for p in patterns):
            unread.append(key)
    assert not unread, f"config keys never read: {unread}"


@pytest.mark.parametrize("name", sorted(VARIANT_DROP_PATH))
def test_384_finetune_configs_are_swins_recipe_on_each_variant(name: str) -> None:
    cfg = load_config(str(CONFIGS / f"{name}_384_finetune.yaml"), world_size=8, opts=["DATA.BATCH_SIZE", "64"])
    assert (cfg.MODEL.NAME, cfg.MODEL.DROP_PATH_RATE, cfg.DATA.IMG_SIZE, cfg.TEST.CROP_PCT) == \
        (name, VARIANT_DROP_PATH[name], 384, 1.0)
    train = cfg.TRAIN
    assert (train.EPOCHS, train.WARMUP_EPOCHS, train.WEIGHT_DECAY) == (30, 5, 1e-8)
    assert (train.SCALED_BASE_LR, train.SCALED_WARMUP_LR, train.SCALED_MIN_LR) == (2e-5, 2e-8, 2e-7)  # 8 x 64 = 512


def test_transfer_config_decays_lower_layers_and_needs_a_folder() -> None:
    cfg = load_config(str(CONFIGS / "transfer_small.yaml"), opts=["MODEL.NUM_CLASSES", "102"])
    assert cfg.DATA.DATASET == "imagenet" and cfg.TRAIN.LAYER_DECAY == 0.75 and cfg.TRAIN.EMA.ENABLE
    assert cfg.MODEL.NUM_CLASSES == 102 and cfg.AUG.MIXUP == cfg.AUG.CUTMIX == 0.0


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_config_loads_and_validates(path: Path) -> None:
    # What a config's header says to pass on the command line (any existing file stands for the teacher's weights).
    given = {"crossformerpp_s_distill.yaml": ["MODEL.DISTILL.TEACHER_WEIGHTS", str(path)]}
    load_config(str(path), given.get(path.name, []), world_size=8)


def test_distillation_and_deit3_configs_are_their_recipes() -> None:
    cfg = load_config(str(CONFIGS / "crossformerpp_s_distill.yaml"), ["MODEL.DISTILL.TEACHER_WEIGHTS", __file__])
    distill = cfg.MODEL.DISTILL
    assert (distill.TYPE, distill.TEACHER, distill.ALPHA, distill.TAU) == ("hard", "regnety_160.deit_in1k", 0.5, 1.0)
    cfg = load_config(str(CONFIGS / "crossformerpp_s_deit3.yaml"), world_size=8, opts=["DATA.BATCH_SIZE", "256"])
    train = cfg.TRAIN
    assert (train.LOSS, train.OPTIMIZER.NAME, cfg.DATA.REPEATED_AUG, cfg.MODEL.LABEL_SMOOTHING) == ("bce", "lamb", 3, 0.0)
    assert train.SCALED_BASE_LR == pytest.approx(4e-3) and (train.EPOCHS, cfg.AUG.REPROB) == (400, 0.0)
    cfg = load_config(str(CONFIGS / "crossformerpp_s_multilabel.yaml"), ["MODEL.NUM_CLASSES", "17"])
    assert (cfg.DATA.FORMAT, cfg.TRAIN.LOSS, cfg.TRAIN.LAYER_DECAY) == ("multilabel", "bce", 0.75)


def test_linear_probe_config_trains_the_head_with_sgd_at_maes_lr() -> None:
    cfg = load_config(str(CONFIGS / "crossformerpp_s_linear_probe.yaml"), world_size=8)  # 8 x 256 = 2048 images
    train, aug = cfg.TRAIN, cfg.AUG
    assert (train.FREEZE, train.OPTIMIZER.NAME, train.OPTIMIZER.MOMENTUM, train.WEIGHT_DECAY) == (
        "all-but-head", "sgd", 0.9, 0.0)
    assert (train.EPOCHS, train.WARMUP_EPOCHS) == (90, 10)
    assert train.SCALED_BASE_LR == pytest.approx(0.1 * 2048 / 256)
    assert (aug.MIXUP, aug.CUTMIX, aug.AUTO_AUGMENT, aug.REPROB, aug.COLOR_JITTER) == (0.0, 0.0, "", 0.0, 0.0)
    assert cfg.MODEL.DROP_PATH_RATE == 0.0 and cfg.MODEL.LABEL_SMOOTHING == 0.0


def test_finetune_config_decays_layers_and_freezes_the_first_stage() -> None:
    cfg = load_config(str(CONFIGS / "crossformerpp_s_finetune_layer_decay.yaml"), world_size=8)
    assert (cfg.TRAIN.LAYER_DECAY, cfg.TRAIN.FREEZE, cfg.TRAIN.OPTIMIZER.NAME) == (0.75, "stages-1", "adamw")
    assert cfg.TRAIN.SCALED_BASE_LR == pytest.approx(1e-3)  # 8 x 64 = 512, the reference batch
    assert cfg.DATA.DATASET == "imagenet" and cfg.MODEL.NAME == "crossformerpp_s"


def test_each_key_is_declared_once_and_the_tables_derive_from_it() -> None:
    """config.KEYS is the one declaration: defaults, flags and the resume meaning come from it."""
    from models.crossformer import SIZE_DIVISOR

    names = [key.name for key in config.KEYS]
    assert len(names) == len(set(names)) and names == config.flat_keys(config.get_defaults())
    assert config.IMG_SIZE_MULTIPLE == SIZE_DIVISOR
    flagged = {key.name: key.flag[0] for key in config.KEYS if key.flag is not None}
    assert flagged["DATA.BATCH_SIZE"] == "--batch-size" and flagged["MODEL.PRETRAINED_WEIGHTS"] == "--use-ema"
    args = parse_option(["--cfg", "x.yaml", "--batch-size", "8", "--use-ema", "--eval"])
    assert (args.batch_size, args.use_ema, args.eval) == (8, "ema", True)
    assert set(config.keys_on_resume(config.OnResume.OPTIMIZER)) == {
        "TRAIN.WEIGHT_DECAY", "TRAIN.FREEZE", "TRAIN.LAYER_DECAY", "TRAIN.OPTIMIZER.NAME", "TRAIN.OPTIMIZER.EPS",
        "TRAIN.OPTIMIZER.BETAS", "TRAIN.OPTIMIZER.MOMENTUM", "TRAIN.OPTIMIZER.NESTEROV"}
    assert config.keys_on_resume(config.OnResume.LENGTH) == ("TRAIN.EPOCHS",)
    # What the run computes is a recipe key unless declared otherwise; how it executes is declared runtime.
    assert {"AUG.MIXUP", "MODEL.DROP_PATH_RATE", "SEED", "TRAIN.EMA.DECAY"} <= set(
        config.keys_on_resume(config.OnResume.RECIPE))
    assert {"DATA.NUM_WORKERS", "PRINT_FREQ", "SAVE_STEPS", "TRAIN.STOP_AFTER_STEPS", "TRAIN.COMPILE"} <= set(
        config.keys_on_resume(config.OnResume.RUNTIME))
    assert "DATA.BATCH_SIZE" in config.keys_on_resume(config.OnResume.NOT_COMPARED)
