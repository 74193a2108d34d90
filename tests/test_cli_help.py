"""The command line starts at once and offers each command only the settings that apply to it."""

import subprocess
import sys

from fedbrain.cli import build_parser
from fedbrain.tasks.classification_config import ClassificationConfig
from fedbrain.tasks.config import GROUPS
from fedbrain.tasks.segmentation_config import SegmentationConfig


def _help(argv: list[str], capsys) -> str:
    try:
        build_parser(argv).parse_args(argv)
    except SystemExit:
        pass
    return capsys.readouterr().out


def test_building_every_parser_imports_no_torch():
    """What made `fedbrain --help` take 3.6 s: the task modules import torch and MONAI."""
    code = ("import sys; from fedbrain.cli import build_parser\n"
            "for argv in (['--help'], ['train', '--task', 'classify'], ['demo'], ['job']):\n"
            "    build_parser(argv)\n"
            "heavy = sorted(m for m in ('torch', 'monai', 'nvflare', 'numpy') if m in sys.modules)\n"
            "assert not heavy, heavy")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_central_training_lists_training_settings_with_the_tasks_defaults(capsys):
    out = _help(["train", "--central", "--task", "classify", "--help"], capsys)
    for name in ("--lr", "--batch-size", "--fusion", "--dp-epsilon"):
        assert name in out, name
    for name in ("--he", "--aggregation", "--guard", "--round-timeout", "--min-responses", "--rounds",
                 "--client-dp-clip", "--algorithm"):
        assert f"{name} " not in out and f"{name}," not in out, name
    lr_line = next(line for line in out.splitlines() if line.strip().startswith("--lr"))
    assert f"default: {ClassificationConfig().lr}" in lr_line and "0.01" not in lr_line
    seg = _help(["train", "--central", "--help"], capsys)
    assert f"default: {SegmentationConfig().lr}" in next(l for l in seg.splitlines() if l.strip().startswith("--lr"))


def test_help_shows_one_kebab_spelling_and_the_snake_alias_still_works(capsys):
    out = _help(["job", "export-classify", "--help"], capsys)
    assert "--round-timeout" in out and "--round_timeout" not in out
    a = build_parser().parse_args(["job", "export-segment", "--round_timeout", "45", "--no-guard"])
    assert a.config_round_timeout == 45 and a.config_guard is False


def test_every_setting_belongs_to_one_group():
    for cls in (SegmentationConfig, ClassificationConfig):
        named = [n for names in cls.FIELD_GROUPS.values() for n in names]
        assert len(named) == len(set(named)) and set(cls.FIELD_GROUPS) <= set(GROUPS)
        fields = set(cls.__dataclass_fields__)
        assert set(named) <= fields, set(named) - fields
        assert set(cls.CENTRAL_PRIVACY) <= set(cls.FIELD_GROUPS["privacy"])


def test_demo_flags_are_the_task_configs_own(capsys):
    out = _help(["demo", "--task", "classify", "--help"], capsys)
    assert "--epochs-per-round" in out and "--local-epochs" not in out
    assert f"default: {ClassificationConfig().rounds}" in next(l for l in out.splitlines() if l.strip().startswith("--rounds"))
    a = build_parser(["demo"]).parse_args(["demo", "--local-epochs", "2", "--rounds", "3"])
    assert a.config_epochs_per_round == 2 and a.config_rounds == 3


def test_the_segmentation_demo_runs_its_own_rounds_unless_told(monkeypatch, capsys):
    """The demo's tiny hospitals need more rounds than the task's default: its help shows the demo's number, a
    plain `fedbrain demo` runs it, a given --rounds wins, and the other settings stay the task's."""
    import fedbrain.demo as demo
    from fedbrain.cli import main

    assert demo.SEGMENTATION_ROUNDS != SegmentationConfig().rounds
    out = _help(["demo", "--help"], capsys)
    assert f"default: {demo.SEGMENTATION_ROUNDS}" in next(l for l in out.splitlines() if l.strip().startswith("--rounds"))
    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda runs, settings, console=None: seen.append(settings.task))
    for argv in (["demo"], ["demo", "--dp-epsilon", "8"], ["demo", "--rounds", "3"], ["demo", "--task", "classify"]):
        assert main(argv) == 0
    assert [t.rounds for t in seen] == [demo.SEGMENTATION_ROUNDS, demo.SEGMENTATION_ROUNDS, 3,
                                        ClassificationConfig().rounds]
    assert seen[0].replace(rounds=SegmentationConfig().rounds) == SegmentationConfig()
    assert demo.DemoSettings().task.rounds == demo.SEGMENTATION_ROUNDS  # what `make bench` runs as the demo


def test_the_classify_demo_fine_tunes_the_public_start_unless_told(monkeypatch):
    """From random weights the classify demo's small sites stayed below 0.60; it starts from the public start.
    Segmentation starts there only under DP-SGD; --no-public-start, a named --start-model and algorithm mixed
    (a start has no shared head) win."""
    import fedbrain.demo as demo
    from fedbrain.cli import main

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda runs, settings, console=None: seen.append(settings))
    cases = {
        ("demo", "--task", "classify"): True,
        ("demo", "--task", "classify", "--no-public-start"): False,
        ("demo", "--task", "classify", "--start-model", "mine/start.pt"): False,  # the user's start, as given
        ("demo", "--task", "classify", "--algorithm", "mixed"): False,  # a start has no shared head
        ("demo",): False,
        ("demo", "--dp-epsilon", "8"): True,
        ("demo", "--public-start"): True,
        ("demo", "--dp-epsilon", "8", "--no-public-start"): False,
    }
    for argv in cases:
        assert main(list(argv)) == 0
    assert [demo.uses_public_start(s) for s in seen] == list(cases.values())
    assert seen[2].task.start_model == "mine/start.pt"


def test_a_dp_demo_takes_the_dp_batch_unless_a_batch_is_given(monkeypatch):
    """DP-SGD's noise is added per batch: the DP demo's default batch is the larger DP one; a given batch wins."""
    import fedbrain.demo as demo
    from fedbrain.cli import main

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda runs, settings, console=None: seen.append(settings.task.batch_size))
    for argv in (["demo", "--dp-epsilon", "8"], ["demo", "--task", "classify", "--dp-epsilon", "8"],
                 ["demo", "--dp-epsilon", "8", "--batch-size", "3"], ["demo"]):
        assert main(argv) == 0
    assert seen == [demo.DP_BATCH_SIZE, demo.DP_BATCH_SIZE, 3, SegmentationConfig().batch_size]


def test_pretrain_uses_the_tasks_recipe_unless_told_otherwise(monkeypatch, tmp_path):
    """`fedbrain pretrain` makes the start the demo and the benchmark make (same batch, lr, epochs) by default."""
    from types import SimpleNamespace

    import fedbrain.tasks.pretrain as pretrain_mod
    from fedbrain.cli import main

    seen = []

    def fake(config, datalists, out, *, epochs, trainer_cls):
        seen.append((config.batch_size, config.lr, epochs))
        return SimpleNamespace(record={"public_validation": {}}, weights=tmp_path / "start.pt", sha256="0" * 64)

    monkeypatch.setattr(pretrain_mod, "pretrain", fake)
    monkeypatch.setattr(pretrain_mod, "synthesize_public", lambda *a, **k: [])
    assert main(["pretrain", "--task", "classify", "--out", str(tmp_path)]) == 0
    assert main(["pretrain", "--task", "segment", "--out", str(tmp_path), "--batch-size", "2", "--epochs", "3"]) == 0
    assert seen == [(pretrain_mod.BATCH["classification"], pretrain_mod.LR["classification"],
                     pretrain_mod.EPOCHS["classification"]), (2, pretrain_mod.LR["segmentation"], 3)]
