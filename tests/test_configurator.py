import pytest

import configurator

PHOTOS = ("photos", "PHOTO", "images")


def constants():
    return dict(lr=2e-4, epochs=10, backbone="resnet50", pretrained=False, image_size=(112, 96),
                _private=1, helper=print)


def test_flags_override_constants_with_their_types():
    ns = constants()
    config = configurator.parse(ns, ["--lr=1e-3", "--epochs", "3", "--backbone=resnet18",
                                     "--pretrained=True", "--image_size=64,48"])
    assert config == dict(lr=1e-3, epochs=3, backbone="resnet18", pretrained=True, image_size=(64, 48))
    assert ns["epochs"] == 3 and isinstance(ns["lr"], float)
    assert configurator.parse(constants(), ["--image_size=80"])["image_size"] == (80,)
    assert configurator.parse(constants(), ["--image_size=80x70"])["image_size"] == (80, 70)
    assert configurator.parse(constants(), ["--lr=1"])["lr"] == 1.0


@pytest.mark.parametrize("word,value", [("false", False), ("0", False), ("No", False), ("TRUE", True),
                                        ("yes", True), ("1", True)])
def test_booleans(word, value):
    assert configurator.parse(constants(), [f"--pretrained={word}"])["pretrained"] is value


def fails(argv, capsys, **kwargs):
    """The error line of a parse that must stop as a command-line error (exit status 2); the usage above it
    lists every flag, so assertions look at the error line alone."""
    with pytest.raises(SystemExit) as info:
        configurator.parse(constants(), argv, **kwargs)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv,flag", [
    (["--learning_rate=1"], "--learning_rate"),
    (["--lrr=1"], "--lrr"),  # no abbreviations either way
    (["--epochs=2.5"], "--epochs"),
    (["--lr=fast"], "--lr"),
    (["--pretrained=maybe"], "--pretrained"),
    (["--image_size=big"], "--image_size"),
    (["--_private=2"], "--_private"),
])
def test_bad_flags_are_errors_that_name_them(argv, flag, capsys):
    assert flag in fails(argv, capsys)


def test_config_files_apply_in_order_and_flags_win(tmp_path):
    first = tmp_path / "first.py"
    first.write_text("import math\nlr = 1e-3\nepochs = 20\n")
    second = tmp_path / "second.py"
    second.write_text("epochs = 30\nimage_size = [64, 64]\n")
    config = configurator.parse(constants(), [str(first), str(second), "--lr=5e-4"])
    assert (config["lr"], config["epochs"], config["image_size"]) == (5e-4, 30, (64, 64))


def test_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("learning_rate = 1\n")
    assert "learning_rate" in fails([str(bad)], capsys)
    assert "missing.py" in fails([str(tmp_path / "missing.py")], capsys)
    typo = tmp_path / "typo.py"
    typo.write_text("epochs = 'ten'\n")
    assert "--epochs" in fails([str(typo)], capsys)


def test_positional_inputs_among_the_flags(tmp_path, capsys):
    ns = constants()
    config = configurator.parse(ns, ["a.jpg", "--epochs=3", "b.png", "c.gif"], positional=PHOTOS)
    assert config["photos"] == ["a.jpg", "b.png", "c.gif"] and config["epochs"] == 3 and ns["epochs"] == 3
    assert "photos" not in ns
    assert configurator.parse(constants(), ["--lr=1"], positional=PHOTOS)["photos"] == []
    # a python file is an input like any other, not a config file
    config_file = tmp_path / "first.py"
    config_file.write_text("epochs = 20\n")
    config = configurator.parse(constants(), [str(config_file)], positional=PHOTOS)
    assert config["photos"] == [str(config_file)] and config["epochs"] == 10
    assert "--epoch=3" in fails(["a.jpg", "--epoch=3"], capsys, positional=PHOTOS)


MODES = dict(mode=("Fast", "exact"), layout=configurator.TRISTATE)


def with_modes():
    return dict(constants(), mode="Fast", layout="auto")


@pytest.mark.parametrize("word,stored", [("fast", "Fast"), ("FAST", "Fast"), ("Exact", "exact")])
def test_choices_match_case_insensitively_and_keep_the_declared_spelling(word, stored):
    ns = with_modes()
    assert configurator.parse(ns, [f"--mode={word}"], choices=MODES)["mode"] == stored
    assert ns["mode"] == stored
    assert configurator.parse(with_modes(), [], choices=MODES)["mode"] == "Fast"


@pytest.mark.parametrize("argv,flag", [(["--mode=slow"], "--mode"), (["--layout=maybe"], "--layout"),
                                       (["--layout=1"], "--layout")])
def test_a_value_outside_the_choices_is_an_error_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        configurator.parse(with_modes(), argv, choices=MODES)
    assert info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in error and argv[0].split("=")[1] in error


def test_choices_are_checked_in_config_files_too(tmp_path, capsys):
    config = tmp_path / "modes.py"
    config.write_text("mode = 'slow'\n")
    with pytest.raises(SystemExit) as info:
        configurator.parse(with_modes(), [str(config)], choices=MODES)
    assert info.value.code == 2 and "--mode" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("word,stored", [("True", "true"), ("true", "true"), ("TRUE", "true"), ("auto", "auto"),
                                         ("AUTO", "auto"), ("False", "false"), ("false", "false")])
def test_tristate_from_flags_and_config_files(word, stored, tmp_path):
    assert configurator.parse(with_modes(), [f"--layout={word}"], choices=MODES)["layout"] == stored
    config = tmp_path / "layout.py"
    config.write_text(f"layout = {word!r}\n")
    assert configurator.parse(with_modes(), [str(config)], choices=MODES)["layout"] == stored
    if word in ("True", "False"):  # a Python bool, as old config files and checkpoints hold
        config.write_text(f"layout = {word}\n")
        assert configurator.parse(with_modes(), [str(config)], choices=MODES)["layout"] == stored


def test_choices_for_a_name_that_is_not_a_constant_or_a_default_outside_them_are_mistakes():
    with pytest.raises(ValueError):
        configurator.parse(with_modes(), [], choices=dict(MODES, colour=("red",)))
    with pytest.raises(ValueError):
        configurator.parse(dict(with_modes(), mode="slow"), ["--mode=fast"], choices=MODES)


def test_normalize_choices_of_saved_values():
    saved = dict(mode="EXACT", layout=True, epochs=3)  # e.g. an older run's config; no value for some names
    assert configurator.normalize_choices(saved, dict(MODES, missing=("a",))) == dict(mode="exact", layout="true",
                                                                                        epochs=3)
    assert saved["mode"] == "EXACT"  # a new dict; the input is left alone
    with pytest.raises(configurator.ConfigError) as info:
        configurator.normalize_choices(dict(layout="yes"), MODES)
    assert info.value.flag == "layout"


@pytest.mark.parametrize("argv,value", [(["--pretrained"], True), (["--pretrained", "false"], False),
                                        (["--pretrained", "False"], False), (["--pretrained=false"], False),
                                        (["--pretrained", "--epochs=3"], True), (["--epochs=3", "--pretrained"], True)])
def test_a_bare_bool_flag_means_true(argv, value):
    assert configurator.parse(constants(), argv)["pretrained"] is value


def test_a_bare_bool_flag_before_inputs_leaves_them_inputs(tmp_path):
    ns = dict(constants(), verify=False)
    config = configurator.parse(ns, ["--verify", "a.jpg", "b.jpg"], positional=PHOTOS)
    assert config["verify"] is True and config["photos"] == ["a.jpg", "b.jpg"]
    config = configurator.parse(dict(ns), ["a.jpg", "--verify", "b.jpg"], positional=PHOTOS)
    assert config["verify"] is True and config["photos"] == ["a.jpg", "b.jpg"]
    config = configurator.parse(dict(ns), ["--verify", "False", "a.jpg", "b.jpg"], positional=PHOTOS)
    assert config["verify"] is False and config["photos"] == ["a.jpg", "b.jpg"]
    # config files likewise
    first = tmp_path / "first.py"
    first.write_text("epochs = 20\n")
    config = configurator.parse(constants(), ["--pretrained", str(first)])
    assert config["pretrained"] is True and config["epochs"] == 20


def test_help_lists_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as info:
        configurator.parse(dict(with_modes(), note="50%"), ["--help"], choices=MODES)
    assert info.value.code == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("--")}
    assert "resnet50" in lines["--backbone"] and "50%" in lines["--note"]
    assert all(choice in lines["--mode"] for choice in ("Fast", "exact"))
    assert all(choice in lines["--layout"] for choice in configurator.TRISTATE)


def test_config_error():
    err = configurator.ConfigError("lr", "must be positive")
    assert isinstance(err, ValueError) and err.flag == "lr" and str(err) == "--lr: must be positive"
    with pytest.raises(configurator.ConfigError) as info:
        configurator.convert("epochs", 10, "ten")
    assert info.value.flag == "epochs" and str(info.value).startswith("--epochs: ")


def test_a_note_goes_on_in_indented_comment_lines_right_below(tmp_path):
    script = tmp_path / "script.py"
    script.write_text('lr = 0.1  # learning rate:\n#   the peak of\n#   the schedule\n\n#   not this\n'
                      'epochs = 3  # passes\n# a header, not a continuation\nseed = 0\n#   nor this\n')
    assert configurator.constant_notes(str(script)) == {"lr": "learning rate: the peak of the schedule",
                                                        "epochs": "passes"}


def test_help_shows_the_comment_beside_each_constant_and_upper_case_names_are_no_flags(tmp_path, capsys):
    script = tmp_path / "script.py"
    script.write_text('LIMITS = (1, 2)  # a fixed value\nlr = 0.1  # learning rate, the peak of the schedule\n'
                      'name = "a # b"  # a string holding a hash\nepochs = 3\n')
    assert configurator.constant_notes(str(script)) == {"LIMITS": "a fixed value",
                                                        "lr": "learning rate, the peak of the schedule",
                                                        "name": "a string holding a hash"}
    namespace = dict(__file__=str(script), LIMITS=(1, 2), lr=0.1, name="a # b", epochs=3)
    assert set(configurator.constants(namespace)) == {"lr", "name", "epochs"}
    with pytest.raises(SystemExit) as info:
        configurator.parse(namespace, ["--help"])
    assert info.value.code == 0
    shown = capsys.readouterr().out
    assert "learning rate, the peak of the schedule" in shown and "--LIMITS" not in shown
    with pytest.raises(SystemExit) as info:
        configurator.parse(namespace, ["--LIMITS=3"])
    assert info.value.code == 2
